"""Bulk encoding of a text file into a flat array of token ids, in parallel processes.

The file is cut into chunks at document boundaries (the start of a special token, else a
newline between two ASCII letters or digits; see ``find_chunk_boundaries``), so encoding the
chunks separately gives exactly the ids of encoding the whole file. Each worker reads its own
byte range, encodes it and writes a part file; the parent appends the parts in order to the
output. Memory is bounded by a few chunks, not by the file's size.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from lmrun.tokenizer.pretokenize import (DEFAULT_CHUNK_BYTES, find_chunk_boundaries, mp_context, read_text_range,
                                         worker_pool)
from lmrun.tokenizer.tokenizer import Tokenizer
from lmrun.tracking.progress import byte_progress

BACKENDS = ("native", "tiktoken")

_worker: dict = {}


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65,536), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def _init_worker(vocab, merges, special_tokens, backend: str) -> None:
    tok = Tokenizer(vocab, merges, special_tokens)
    _worker["tok"] = tok
    if backend == "tiktoken":
        enc = tok.to_tiktoken()
        _worker["encode"] = lambda text: enc.encode(text, allowed_special="all")
    else:
        _worker["encode"] = tok.encode
    _worker["dtype"] = token_dtype(max(tok.vocab) + 1)


def _encode_range(task: tuple[str, int, int, int, str]) -> tuple[int, int, int]:
    path, index, start, end, part = task
    ids = np.asarray(_worker["encode"](read_text_range(path, start, end)), dtype=_worker["dtype"])
    ids.tofile(part)
    return index, len(ids), end - start


def encode_file(path: str | os.PathLike, tokenizer: Tokenizer, out_path: str | os.PathLike, *,
                backend: str = "native", num_workers: int | None = None,
                chunk_bytes: int = DEFAULT_CHUNK_BYTES, progress: bool = False) -> dict:
    """Encode the UTF-8 text file ``path`` to ``out_path``: flat token ids, native byte order,
    dtype ``token_dtype(vocab size)`` (read back with ``numpy.memmap(out_path, dtype)``).

    backend: "native" (``Tokenizer.encode``) or "tiktoken" (``Tokenizer.to_tiktoken()``; the
    same ids, faster). num_workers: processes (None: all cores; 1: in this process).
    Returns {"tokens", "bytes", "seconds", "mb_per_s", "dtype", "chunks"}.
    Raises DataError for a missing or non-UTF-8 file, ValueError for an unknown backend."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    path, out_path = Path(path), Path(out_path)
    specials = [s.encode("utf-8") for s in tokenizer.special_tokens]
    bounds = find_chunk_boundaries(path, chunk_bytes, specials)
    tasks = [(str(path), i, a, b, f"{out_path}.part{i:06d}") for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))]
    workers = max(1, min(num_workers or os.cpu_count() or 1, len(tasks)))
    init_args = (tokenizer.vocab, tokenizer.merges, tokenizer.special_tokens, backend)
    dtype = token_dtype(max(tokenizer.vocab) + 1)
    bar = byte_progress(bounds[-1], f"encoding {path.name}", progress)
    t0 = time.perf_counter()
    n_tokens = 0
    try:
        with open(out_path, "wb") as out:
            def append(result: tuple[int, int, int]) -> None:
                nonlocal n_tokens
                index, count, nbytes = result
                part = Path(tasks[index][4])
                with open(part, "rb") as p:
                    while block := p.read(1 << 24):
                        out.write(block)
                part.unlink()
                n_tokens += count
                if bar is not None:
                    bar.update(nbytes)

            if workers == 1:
                _init_worker(*init_args)
                for task in tasks:
                    append(_encode_range(task))
            else:
                if mp_context().get_start_method() == "fork":  # build the encoder once; forked workers inherit it
                    _init_worker(*init_args)
                    pool_args = {}
                else:
                    pool_args = {"initializer": _init_worker, "initargs": init_args}
                with worker_pool(workers, **pool_args) as pool:
                    for result in pool.imap(_encode_range, tasks):  # in order: appended as they come
                        append(result)
    except BaseException:
        for task in tasks:
            Path(task[4]).unlink(missing_ok=True)
        out_path.unlink(missing_ok=True)
        raise
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t0
    return {"tokens": n_tokens, "bytes": bounds[-1], "seconds": round(seconds, 3),
            "mb_per_s": round(bounds[-1] / 1e6 / max(seconds, 1e-9), 3), "dtype": dtype.name, "chunks": len(tasks)}
