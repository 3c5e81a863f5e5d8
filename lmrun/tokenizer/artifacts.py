"""Cached tokenizer and token-array artifacts: what the stages ``tokenizer``, ``encode``,
``pretrain`` and ``evaluate`` build or reuse (DESIGN.md, "Run directories and artifacts").

- ``get_tokenizer(cfg, cache, corpus)`` -> ``TokenizerFiles``: ``tokenizer.path`` if given, else
  the trained tokenizer cached under ``tokenizer/<key>`` (key: the train split's content and the
  tokenizer config; ``tokenizer_material``), trained with ``train_bpe`` first if absent.
- ``get_or_encode_tokens(cfg, cache, corpus, files)`` -> the cache ``Artifact`` ``tokens/<key>``
  holding ``train.bin`` / ``val.bin`` (token ids, uint16 when the vocabulary fits, else uint32;
  ``numpy.memmap(path, dtype=meta["dtype"])`` reads them) and ``meta.json``; the key covers the
  tokenizer's identity and the corpus content (``tokens_material``). Documents stay separated by
  the end-of-text special token they are separated by in the text.

``cfg`` is the composed config (``cfg.tokenizer``, ``cfg.cache``, ``cfg.progress``); the cache
is ``lmrun.tracking.cache.open_cache(cfg)``. Raises DataError for a ``tokenizer.path`` that holds
no tokenizer; builds are atomic (an interrupted one leaves no artifact).
"""
from __future__ import annotations

import logging
import os
import re
import resource
import time
from dataclasses import dataclass
from pathlib import Path

from lmrun.data.corpora import Corpus
from lmrun.errors import DataError
from lmrun.tokenizer.formats import save_merges, save_vocab
from lmrun.tokenizer.pretokenize import GPT2_PATTERN
from lmrun.tracking.cache import Artifact, ArtifactCache
from lmrun.tracking.files import atomic_write_json, file_digest

log = logging.getLogger(__name__)

#: Bump when training output for the same inputs and config would change.
ALGORITHM_VERSION = 1
#: Bump when the token arrays' layout or meta.json changes for the same inputs.
TOKENS_FORMAT_VERSION = 1
SPLITS = ("train", "val")


def tokenizer_material(cfg, corpus: Corpus) -> dict:
    """Cache-key material: the train split's identity and every config value that changes the result."""
    t = cfg.tokenizer
    return {"train": corpus.train_identity, "kind": t.kind, "vocab_size": int(t.vocab_size),
            "special_tokens": list(t.special_tokens), "pattern": GPT2_PATTERN, "version": ALGORITHM_VERSION}


def peak_rss_mb() -> dict[str, float]:
    """Peak resident memory (MiB) of this process and of its largest finished child."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"peak_rss_mb": round(own, 1), "peak_rss_children_mb": round(children, 1)}


def vocab_facts(cfg, vocab_size: int, num_merges: int | None = None, train_bytes: int | None = None) -> dict:
    """What was asked and what was got: ``{"vocab_size_requested": N, "vocab_size": M}`` for a
    trained BPE tokenizer (``tokenizer.kind=bpe`` without ``tokenizer.path``), plus
    ``"vocab_capped"`` (why, one sentence) when training stopped short of N; ``{"vocab_size": M}``
    otherwise. ``num_merges`` (the merges made) and ``train_bytes`` sharpen the reason."""
    t = cfg.tokenizer
    if t.path or t.kind != "bpe":
        return {"vocab_size": int(vocab_size)}
    requested = int(t.vocab_size)
    out = {"vocab_size_requested": requested, "vocab_size": int(vocab_size)}
    if vocab_size < requested:
        n_special = len(t.special_tokens)
        max_merges = requested - 256 - n_special
        learned = vocab_size - 256 - n_special
        text = f" of the training text ({train_bytes / 1e6:.2f} MB)" if train_bytes else " of the training text"
        if num_merges is None or num_merges < max_merges:
            why = (f"BPE ran out of pairs to merge: after {learned:,} learned tokens every pre-token (word){text} is "
                   "a single token; more (or more varied) training text gives a larger vocabulary")
        else:
            why = (f"{num_merges - learned:,} of the {num_merges:,} merges reproduced a token already in the "
                   "vocabulary")
        out["vocab_capped"] = why
    return out


def warn_vocab_capped(facts: dict) -> None:
    """Log the warning for a vocabulary smaller than asked (see :func:`vocab_facts`)."""
    if facts.get("vocab_capped"):
        log.warning("tokenizer.vocab_size=%d, but the vocabulary has %d tokens: %s", facts["vocab_size_requested"],
                    facts["vocab_size"], facts["vocab_capped"])


def follow_tokenizer_vocab(cfg, vocab_size: int) -> int:
    """The vocabulary size to build the model with, given the tokenizer's real number of token
    ids ``vocab_size`` (``meta["vocab_size"]`` of the token arrays; smaller than
    ``tokenizer.vocab_size`` when BPE training was capped). When ``model.vocab_size`` is the
    presets' interpolation ``${tokenizer.vocab_size}`` it is set to ``vocab_size`` in ``cfg``
    (in place, logged): no embedding rows for ids that never occur. An explicit
    ``model.vocab_size`` (e.g. padded to a multiple of 64) is kept and returned as is; the caller
    checks that it is >= ``vocab_size``."""
    from omegaconf import OmegaConf, open_dict

    model = cfg.get("model")
    if model is None or "vocab_size" not in model:
        return int(vocab_size)
    if OmegaConf.is_interpolation(model, "vocab_size") and int(model.vocab_size) != int(vocab_size):
        log.info("model.vocab_size=%d: the tokenizer's %d token ids (tokenizer.vocab_size=%d asked; set "
                 "model.vocab_size to override)", vocab_size, vocab_size, int(model.vocab_size))
        with open_dict(model):
            model.vocab_size = int(vocab_size)
    return int(model.vocab_size)


def get_or_train_tokenizer(cfg, cache: ArtifactCache, corpus: Corpus) -> Artifact:
    """The cached tokenizer for (train split, cfg.tokenizer), trained first if absent."""
    from lmrun.tokenizer.bpe import train_bpe

    t = cfg.tokenizer

    def build(out: Path) -> dict:
        corpus.ensure_text()
        size = corpus.train.stat().st_size
        if t.kind == "bytes":
            vocab = {i: s.encode("utf-8") for i, s in enumerate(t.special_tokens)}
            vocab.update({len(vocab) + b: bytes([b]) for b in range(256)})
            save_vocab(vocab, out / "vocab.json")
            save_merges([], out / "merges.txt")
            return {"train_seconds": 0.0, "train_bytes": size, "vocab_size": len(vocab), "num_merges": 0,
                    "train_mb_per_s": None, **peak_rss_mb()}
        log.info("training BPE: %s (%.1f MB), vocab_size=%d", corpus.train, size / 1e6, t.vocab_size)
        t0 = time.perf_counter()
        vocab, merges = train_bpe(corpus.train, int(t.vocab_size), list(t.special_tokens),
                                  num_workers=t.num_workers, backend=t.train_backend, progress=bool(cfg.progress))
        seconds = time.perf_counter() - t0
        save_vocab(vocab, out / "vocab.json")
        save_merges(merges, out / "merges.txt")
        return {"train_seconds": round(seconds, 3), "train_bytes": size,
                **vocab_facts(cfg, len(vocab), len(merges), size),
                "num_merges": len(merges), "train_mb_per_s": round(size / 1e6 / max(seconds, 1e-9), 3), **peak_rss_mb()}

    return cache.get_or_build("tokenizer", tokenizer_material(cfg, corpus), build)


@dataclass
class TokenizerFiles:
    """A tokenizer on disk: its vocab.json and merges.txt, identity, and provenance."""

    vocab: Path
    merges: Path
    identity: dict  # content digests of the two files and the special tokens (for cache keys)
    reused: bool  # found (cache hit or a given path) rather than trained by this run
    built: dict  # what training recorded (empty for a given path)

    def load(self, special_tokens: list[str]):
        from lmrun.tokenizer.tokenizer import Tokenizer

        return Tokenizer.from_files(self.vocab, self.merges, special_tokens)

    @property
    def folder(self) -> Path:
        return self.vocab.parent


def _given_tokenizer_files(cfg, cache: ArtifactCache) -> tuple[Path, Path]:
    """(vocab.json, merges.txt) of ``tokenizer.path``: a folder holding ``vocab.json`` and
    ``merges.txt`` (or exactly one ``*vocab*.json`` and one ``*merges*.txt``, as GPT-2's files
    are named), or the key of a cached tokenizer. DataError otherwise."""
    value = str(cfg.tokenizer.path)
    folder = Path(value).expanduser()
    if not folder.is_dir() and re.fullmatch(r"[0-9a-f]{32}", value):
        folder = cache.path("tokenizer", value)
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        return (folder / "vocab.json").absolute(), (folder / "merges.txt").absolute()
    vocabs, merges = sorted(folder.glob("*vocab*.json")), sorted(folder.glob("*merges*.txt"))
    if folder.is_dir() and len(vocabs) == 1 and len(merges) == 1:
        return vocabs[0].absolute(), merges[0].absolute()
    raise DataError(f"tokenizer.path={value}: not a folder holding vocab.json and merges.txt (GPT-2 format), "
                    "nor the key of a cached tokenizer")


def get_tokenizer(cfg, cache: ArtifactCache, corpus: Corpus, dry_run: bool = False) -> TokenizerFiles:
    """The tokenizer the config asks for: ``tokenizer.path`` if given, else the cached one for
    (train split, tokenizer config), trained first if absent. With ``dry_run`` nothing is
    trained and the folder may not exist yet (identity then holds the would-be cache key)."""
    specials = list(cfg.tokenizer.special_tokens)
    if cfg.tokenizer.path:
        vocab, merges = _given_tokenizer_files(cfg, cache)
        identity = {"vocab_digest": file_digest(vocab), "merges_digest": file_digest(merges), "special_tokens": specials}
        return TokenizerFiles(vocab, merges, identity, True, {})
    if dry_run:
        key = cache.key("tokenizer", tokenizer_material(cfg, corpus))
        found = cache.lookup("tokenizer", key) if not cfg.cache.rebuild else None
        where = cache.path("tokenizer", key)
        return TokenizerFiles(where / "vocab.json", where / "merges.txt", {"tokenizer_key": key, "special_tokens": specials},
                              found is not None, {})
    artifact = get_or_train_tokenizer(cfg, cache, corpus)
    identity = {"tokenizer_key": artifact.key, "special_tokens": specials}
    built = dict(artifact.manifest["result"])
    if "vocab_size" in built:  # a cached tokenizer built before vocab_size_requested was recorded gets it here
        built.update(vocab_facts(cfg, int(built["vocab_size"]), built.get("num_merges"), built.get("train_bytes")))
        warn_vocab_capped(built)
    return TokenizerFiles(artifact.path / "vocab.json", artifact.path / "merges.txt", identity, artifact.reused, built)


def tokens_material(corpus, tok_identity: dict) -> dict:
    """Cache-key material of the token arrays: the tokenizer's identity and the corpus content
    (every input file's digest; for streamed formats and mixtures also the corpus key material:
    formats, fields, weights, seed, separator, bad-record policy)."""
    return {"tokenizer": tok_identity, "train": corpus.train_identity,
            "sources": [{"role": s["role"], "digest": s["digest"]} for s in corpus.sources],
            "version": TOKENS_FORMAT_VERSION}


def vocab_requested(files) -> dict:
    """``vocab_size_requested`` (and ``vocab_capped``, why the vocabulary is smaller) of a trained
    tokenizer, from what its training recorded; empty for a given tokenizer (``tokenizer.path``)."""
    return {k: files.built[k] for k in ("vocab_size_requested", "vocab_capped") if k in files.built}


def get_or_encode_tokens(cfg, cache, corpus, files, special_tokens: list[str] | None = None):
    """The cached token arrays (``tokens/<key>``: train.bin, val.bin, meta.json) for this corpus
    and tokenizer, encoded first if absent. Returns the cache Artifact. ``special_tokens``
    defaults to ``cfg.tokenizer.special_tokens``."""
    from lmrun.tokenizer.bulk import encode_file, token_dtype

    specials = list(cfg.tokenizer.special_tokens if special_tokens is None else special_tokens)
    tok = files.load(specials)
    vocab_size = max(tok.vocab) + 1
    requested = vocab_requested(files)

    def build(out: Path) -> dict:
        meta = {"format_version": TOKENS_FORMAT_VERSION, "dtype": token_dtype(vocab_size).name,
                "vocab_size": vocab_size, **requested,
                "special_tokens": {s: tok.special_ids[s] for s in tok.special_tokens},
                "eot_id": tok.special_ids[specials[0]] if specials else None,
                "tokenizer": {"vocab": str(files.vocab), "merges": str(files.merges), **files.identity},
                "backend": cfg.tokenizer.backend, "sources": corpus.sources,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "splits": {}}
        if corpus.info:
            meta["data"] = corpus.info
        encode = dict(backend=cfg.tokenizer.backend, num_workers=cfg.tokenizer.num_workers, progress=bool(cfg.progress))
        if corpus.mixture:
            meta["mixture"] = _encode_mixture(cfg, corpus, tok, out, encode)
            meta["splits"] = {split: meta["mixture"].pop(split) for split in SPLITS}
        for split in SPLITS if not corpus.mixture else ():
            src = corpus.train if split == "train" else corpus.val
            stats = encode_file(src, tok, out / f"{split}.bin", **encode)
            stats["bytes_per_token"] = round(stats["bytes"] / max(stats["tokens"], 1), 4)
            meta["splits"][split] = stats
            log.info("%s: %d tokens from %.1f MB (%.3f bytes/token) at %.2f MB/s", split, stats["tokens"],
                     stats["bytes"] / 1e6, stats["bytes_per_token"], stats["mb_per_s"])
        meta.update(peak_rss_mb())
        atomic_write_json(out / "meta.json", meta)
        return {"splits": meta["splits"]}

    return cache.get_or_build("tokens", tokens_material(corpus, files.identity), build)


def document_ends(path: Path, dtype: str, eot_id: int, block: int = 1 << 22) -> np.ndarray:
    """End offsets (exclusive, int64) of the documents in a token array file: the positions just
    after each ``eot_id``, plus the array's end when it does not end with one. Read in blocks of
    ``block`` tokens with plain reads (not a memory map, whose touched pages would count in this
    process's resident memory): memory O(block + documents)."""
    import numpy as np

    parts, pos, last = [], 0, None
    with open(path, "rb") as f:
        while True:
            ids = np.fromfile(f, dtype=dtype, count=block)
            if not len(ids):
                break
            parts.append(np.flatnonzero(ids == eot_id) + (pos + 1))
            pos += len(ids)
            last = ids[-1]
    ends = np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)
    if pos and last != eot_id:
        ends = np.append(ends, pos)
    return ends


def _encode_mixture(cfg, corpus, tok, out: Path, encode: dict) -> dict:
    """Encode each mixture source's splits, then write ``train.bin`` / ``val.bin`` mixed by tokens
    (lmrun.data.mixture: weights are shares of the train split's tokens; the validation split is
    mixed without repetition). Returns per split the totals and, per source, the requested and
    realised token shares, tokens, documents and passes (repeats). A split's ``bytes`` are the
    UTF-8 bytes of the chosen documents (so ``bytes_per_token`` and bits per byte describe the
    mixture); ``source_bytes`` is what was encoded (``mb_per_s`` is of those)."""
    import numpy as np

    from lmrun.data.mixture import write_mixture
    from lmrun.tokenizer.bulk import encode_file

    sep = cfg.data.document_separator
    if sep not in tok.special_ids:
        raise DataError(f"data.mixture: the document separator {sep!r} is not a special token of the tokenizer "
                        f"({', '.join(tok.special_tokens) or 'none'}): documents cannot be found in the token arrays; "
                        "add it to tokenizer.special_tokens")
    eot = tok.special_ids[sep]
    weights = [s["weight"] for s in corpus.mixture]
    result = {}
    for split in SPLITS:
        t0 = time.perf_counter()
        parts, ends, per_source = [], [], []
        for s in corpus.mixture:
            part = out / f"{split}.{s['name']}.part.bin"
            stats = encode_file(s[split], tok, part, **encode)
            parts.append(part)
            dtype = stats["dtype"]
            ends.append(document_ends(part, dtype, eot))
            per_source.append(stats)
        byte_sizes = []  # per source, each document's UTF-8 bytes (with its separator): exact bytes per token
        for s, e in zip(corpus.mixture, ends):
            b = np.load(s[f"{split}_ends"])
            byte_sizes.append(np.diff(b, prepend=0) if len(b) == len(e) else None)
        exact = all(b is not None for b in byte_sizes)
        fds = [os.open(p, os.O_RDONLY) for p in parts]  # pread per document: no memory map in the RSS
        width = np.dtype(dtype).itemsize
        try:
            with open(out / f"{split}.bin", "wb") as fo:
                total = None if split == "train" else min(int(e[-1]) / w for e, w in zip(ends, weights))
                mix = write_mixture(ends, lambda i, a, b: os.pread(fds[i], (b - a) * width, a * width),
                                    lambda chunks: fo.write(b"".join(chunks)), weights, int(cfg.data.seed), total,
                                    also=byte_sizes if exact else None)
        finally:
            for fd in fds:
                os.close(fd)
        for p in parts:
            p.unlink()
        seconds = time.perf_counter() - t0
        nbytes = sum(st["bytes"] for st in per_source)
        if exact:  # the chosen documents' bytes
            mixed_bytes = sum(m["also"] for m in mix["sources"])
        else:  # a document held the separator text: each source's mean bytes per token
            mixed_bytes = round(sum(m["units"] * st["bytes"] / max(st["tokens"], 1)
                                    for m, st in zip(mix["sources"], per_source)))
        result[split] = {"tokens": mix["total"], "bytes": int(mixed_bytes), "source_bytes": nbytes,
                         "seconds": round(seconds, 3), "mb_per_s": round(nbytes / 1e6 / max(seconds, 1e-9), 3),
                         "dtype": dtype, "bytes_per_token": round(mixed_bytes / max(mix["total"], 1), 4),
                         "bytes_exact": exact}
        result.setdefault("sources", [{"name": s["name"], "weight": round(s["weight"], 6)} for s in corpus.mixture])
        for row, st, m in zip(result["sources"], per_source, mix["sources"]):
            row[split] = {"source_tokens": st["tokens"], "tokens": m["units"], "share": m["share"],
                          "documents": m["documents"], "passes": m["passes"]}
        log.info("%s mixture: %d tokens; shares %s (asked %s)", split, mix["total"],
                 ", ".join(f"{r['name']} {r[split]['share']:.3f}" for r in result["sources"]),
                 ", ".join(f"{r['name']} {r['weight']:.3f}" for r in result["sources"]))
    return result
