"""Bulk encoding of a text file into a flat array of token ids, in parallel.

The file is cut into chunks at document boundaries (the start of a special token, else a
newline between two ASCII letters or digits; see ``find_chunk_boundaries``), so encoding the
chunks separately gives exactly the ids of encoding the whole file. Cuts are found while the
workers run. Memory is bounded by a few chunks, not by the file's size.

With the native encoder's C core (``lmrun.tokenizer._encode``) the workers are threads of this
process: each owns an ``Encoder`` and encodes the raw UTF-8 bytes of its chunk
(``Encoder.encode_utf8``: validation, special tokens and BPE in C, the GIL released, ids
straight into a numpy array, no ``str``), and the ids are written in order by the calling
thread. No process start-up, no pickling, no part files: two threads on two cores reach x1.8-1.9
the wall-clock speed of one (README "Performance"). The tiktoken backend and the pure-Python
encoder (no C compiler) hold the GIL for part of their work, so they run in processes: each
worker reads its own byte range, encodes it and writes a part file, and the parent appends the
parts in order (``copy_file_range``: in the kernel).
"""
from __future__ import annotations

import collections
import logging
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from lmrun.errors import DataError
from lmrun.launch.threads import available_cpus
from lmrun.tokenizer import native
from lmrun.tokenizer.pretokenize import (_MAX_WINDOW_BYTES, DEFAULT_CHUNK_BYTES, _file_size, _find_cut, mp_context,
                                         read_byte_range, read_text_range, worker_pool)
from lmrun.tokenizer.tokenizer import Tokenizer
from lmrun.tracking.progress import byte_progress

log = logging.getLogger(__name__)

BACKENDS = ("native", "tiktoken")
#: with several processes, chunks are at most 1/(this x processes) of the file (load balance) ...
_CHUNKS_PER_WORKER = 4
#: ... and at least this big (each chunk costs a task round trip and a part file)
_MIN_CHUNK_BYTES = 256 << 10
#: chunk size of the threaded native path: measured fastest on 220 MB (4 MiB: 2.34 s with one
#: thread, 16 MiB: 2.69 s, 1 MiB: 2.55 s; smaller chunks stay in the CPU caches)
THREAD_CHUNK_BYTES = 4 << 20

_worker: dict = {}


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65,536), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def tiktoken_encoder(tok: Tokenizer):
    """``encode(text) -> (ids, fell_back)`` with ``tok.to_tiktoken()``, falling back to the native
    ``tok.encode`` (the same ids) for a text tiktoken refuses: its regex engine raises
    ``ValueError: ... Max stack size exceeded for backtracking`` on a run of about a million
    whitespace characters (a 1M-space line), which the GPT-2 pattern's ``\\s+(?!\\S)`` backtracks
    over."""
    enc = tok.to_tiktoken()

    def encode(text: str) -> tuple[list[int], bool]:
        try:
            return enc.encode(text, allowed_special="all"), False
        except ValueError:  # regex backtracking limit (tiktoken's fancy-regex); nothing else raises here
            return tok.encode(text), True

    return encode


def _init_worker(vocab, merges, special_tokens, backend: str) -> None:
    _setup_worker(Tokenizer(vocab, merges, special_tokens), backend)


def _setup_worker(tok: Tokenizer, backend: str) -> None:
    _worker["tok"] = tok
    dtype = token_dtype(max(tok.vocab) + 1)
    if backend == "tiktoken":
        _worker["encode"] = tiktoken_encoder(tok)
    else:  # pure Python: with the C core, encode_file runs threads instead (_encode_threaded)
        _worker["encode"] = lambda text: (tok.encode(text), False)
    _worker["dtype"] = dtype


def _encode_range(task: tuple[str, int, int, str]) -> tuple[str, int, int, bool]:
    """Worker: encode bytes [start, end) of the file into the part file ``part`` (raw ``dtype``
    ids). Returns (part, number of ids, bytes read, whether tiktoken fell back)."""
    path, start, end, part = task
    ids, fell_back = _worker["encode"](read_text_range(path, start, end))
    ids = np.asarray(ids, dtype=_worker["dtype"])
    ids.tofile(part)
    return part, len(ids), end - start, fell_back


def _append_file(out, part: str) -> None:
    """Append the file ``part`` to the open file ``out`` (in the kernel where it can) and delete it."""
    with open(part, "rb") as src:
        n = os.fstat(src.fileno()).st_size
        out.flush()
        try:
            while n > 0:
                done = os.copy_file_range(src.fileno(), out.fileno(), n)
                if done <= 0:
                    raise OSError("copy_file_range copied nothing")
                n -= done
        except (AttributeError, OSError):  # no copy_file_range here (or across file systems)
            src.seek(os.fstat(src.fileno()).st_size - n)
            out.seek(0, os.SEEK_END)
            while block := src.read(1 << 24):
                out.write(block)
    os.unlink(part)


def _chunk_ranges(path: Path, chunk_bytes: int, specials: list[bytes]) -> Iterator[tuple[int, int]]:
    """The (start, end) byte ranges of ``find_chunk_boundaries(path, chunk_bytes, specials)``,
    found one at a time, so that workers encode the first chunks while later cuts are sought."""
    size = _file_size(path)
    tokens = sorted({t for t in specials if t}, key=len, reverse=True)
    maxlen = max((len(t) for t in tokens), default=1)
    window = min(chunk_bytes, _MAX_WINDOW_BYTES)
    start, nominal = 0, chunk_bytes
    with open(path, "rb") as f:
        while nominal < size:
            p = _find_cut(f, nominal, min(nominal + window, size), size, tokens, maxlen)
            if p is None:
                nominal += chunk_bytes  # merge this chunk into the next
                continue
            yield start, p
            start, nominal = p, p + chunk_bytes
    yield start, size


def _encode_threaded(path: Path, tokenizer: Tokenizer, out, ranges: Iterator[tuple[int, int]], workers: int,
                     dtype: np.dtype, on_chunk) -> None:
    """Encode the byte ``ranges`` of ``path`` with ``workers`` threads that each own a C
    ``Encoder`` (:meth:`Encoder.encode_utf8`, the GIL released) and write the ids to the open
    file ``out`` in order; ``on_chunk(n_ids, n_bytes)`` after each chunk.
    At most 2 x workers chunks are in memory. Raises DataError for invalid UTF-8 (file and
    absolute byte offset) or a byte without a token."""
    specials = [(s.encode("utf-8"), i) for s, i in tokenizer.special_ids.items()]
    local = threading.local()

    def encode(start: int, end: int) -> np.ndarray:
        enc = getattr(local, "enc", None)
        if enc is None:
            enc = local.enc = native.native_encoder(tokenizer)
        try:
            return native.encode_bytes_to_numpy(enc, read_byte_range(path, start, end), specials, dtype)
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not valid UTF-8 at byte offset {start + e.start} ({e.reason})") from None

    def write(ids: np.ndarray, nbytes: int) -> None:
        out.write(memoryview(ids).cast("B"))  # the GIL is released while the kernel copies
        on_chunk(len(ids), nbytes)

    if workers == 1:
        for start, end in ranges:
            write(encode(start, end), end - start)
        return
    pending: collections.deque = collections.deque()
    with ThreadPoolExecutor(workers, thread_name_prefix="lmrun-encode") as pool:
        try:
            for start, end in ranges:
                pending.append((pool.submit(encode, start, end), end - start))
                while len(pending) >= 2 * workers or (pending and pending[0][0].done()):
                    future, nbytes = pending.popleft()
                    write(future.result(), nbytes)
            for future, nbytes in pending:
                write(future.result(), nbytes)
        except BaseException:
            for future, _ in pending:
                future.cancel()
            raise


def encode_file(path: str | os.PathLike, tokenizer: Tokenizer, out_path: str | os.PathLike, *,
                backend: str = "native", num_workers: int | None = None,
                chunk_bytes: int | None = None, progress: bool = False) -> dict:
    """Encode the UTF-8 text file ``path`` to ``out_path``: flat token ids, native byte order,
    dtype ``token_dtype(vocab size)`` (read back with ``numpy.memmap(out_path, dtype)``).

    backend: "native" (our encoder: its C core, else ``Tokenizer.encode``) or "tiktoken"
    (``Tokenizer.to_tiktoken()``; the same ids; a chunk tiktoken cannot encode — a run of ~1M spaces exceeds its regex
    stack — is encoded natively, see ``tiktoken_encoder``, and counted in ``native_fallback_chunks``).
    num_workers: parallel workers (None: the CPUs this process may use; 1: in this thread) —
    threads with the native C core, else processes; with several, a chunk is at most a quarter
    of a worker's share of the file (at least 256 KiB), so all stay busy.
    chunk_bytes: the largest chunk (None: 4 MiB for the C core's threads, 16 MiB otherwise).
    Returns {"tokens", "bytes", "seconds", "mb_per_s", "dtype", "chunks"[, "native_fallback_chunks"]}.
    Raises DataError for a missing or non-UTF-8 file, ValueError for an unknown backend."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    path, out_path = Path(path), Path(out_path)
    specials = [s.encode("utf-8") for s in tokenizer.special_tokens]
    size = _file_size(path)  # DataError if missing
    threaded = backend == "native" and tokenizer._native is not None
    if chunk_bytes is None:
        chunk_bytes = THREAD_CHUNK_BYTES if threaded else DEFAULT_CHUNK_BYTES
    workers = max(1, num_workers or available_cpus()[0])
    if workers > 1:  # enough chunks to keep every process busy to the end
        per_chunk = -(-size // (_CHUNKS_PER_WORKER * workers))
        chunk_bytes = max(1, min(chunk_bytes, max(per_chunk, _MIN_CHUNK_BYTES)))
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
    if size <= chunk_bytes:
        workers = 1
    parts: list[str] = []

    def tasks() -> Iterator[tuple[str, int, int, str]]:
        for a, b in _chunk_ranges(path, chunk_bytes, specials):
            parts.append(f"{out_path}.part{len(parts):06d}")
            yield str(path), a, b, parts[-1]

    init_args = (tokenizer.vocab, tokenizer.merges, tokenizer.special_tokens, backend)
    dtype = token_dtype(max(tokenizer.vocab) + 1)
    bar = byte_progress(size, f"encoding {path.name}", progress)
    t0 = time.perf_counter()
    n_tokens, n_chunks, fallbacks = 0, 0, 0
    try:
        with open(out_path, "wb") as out:
            def on_chunk(count: int, nbytes: int) -> None:
                nonlocal n_tokens, n_chunks
                n_tokens += count
                n_chunks += 1
                if bar is not None:
                    bar.update(nbytes)

            def append(result: tuple[str, int, int, bool]) -> None:  # a worker process's part file
                nonlocal fallbacks
                part, count, nbytes, fell_back = result
                _append_file(out, part)
                fallbacks += fell_back
                on_chunk(count, nbytes)

            if threaded:
                _encode_threaded(path, tokenizer, out, _chunk_ranges(path, chunk_bytes, specials), workers, dtype,
                                 on_chunk)
            elif workers == 1:
                _setup_worker(tokenizer, backend)
                for task in tasks():
                    append(_encode_range(task))
            else:
                if mp_context().get_start_method() == "fork":  # forked workers inherit the encoder
                    _setup_worker(tokenizer, backend)
                    pool_args = {}
                else:
                    pool_args = {"initializer": _init_worker, "initargs": init_args}
                with worker_pool(workers, **pool_args) as pool:
                    for result in pool.imap(_encode_range, tasks()):  # in order: appended as they come
                        append(result)
    except BaseException:
        for part in parts:
            Path(part).unlink(missing_ok=True)
        out_path.unlink(missing_ok=True)
        raise
    finally:
        _worker.clear()  # do not keep the caller's tokenizer (or a tiktoken export) alive
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t0
    stats = {"tokens": n_tokens, "bytes": size, "seconds": round(seconds, 3),
             "mb_per_s": round(size / 1e6 / max(seconds, 1e-9), 3), "dtype": dtype.name, "chunks": n_chunks}
    if fallbacks:
        log.info("%s: %d of %d chunk(s) encoded natively (tiktoken's regex cannot match them; same ids)", path.name,
                 fallbacks, n_chunks)
        stats["native_fallback_chunks"] = fallbacks
    return stats
