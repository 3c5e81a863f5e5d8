"""Stage ``encode``: the data preset's train and validation splits -> flat token arrays.

Writes ``train.bin`` / ``val.bin`` (token ids, uint16 when the vocabulary fits, else uint32;
``numpy.memmap(path, dtype=meta["dtype"])`` reads them) and ``meta.json`` into the artifact
cache under ``tokens/<key>`` — the key covers the tokenizer's identity and the corpus content —
and ``meta.json`` into the run directory. The tokenizer is ``tokenizer.path`` if given, else
the cached one for this data and tokenizer config, trained first if needed. Documents stay
separated by the end-of-text special token they are separated by in the text.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from lmrun.data.corpora import prepare_corpus
from lmrun.stages.tokenizer import get_tokenizer, open_cache
from lmrun.tokenizer.bulk import encode_file, token_dtype
from lmrun.tracking.files import atomic_write_json
from lmrun.tracking.run import active_run

log = logging.getLogger(__name__)

#: Bump when the array layout or meta.json changes for the same inputs.
FORMAT_VERSION = 1
SPLITS = ("train", "val")


def tokens_material(corpus, tok_identity: dict) -> dict:
    """Cache-key material of the token arrays: the tokenizer's identity and the corpus content."""
    return {"tokenizer": tok_identity, "train": corpus.train_identity,
            "sources": [{"role": s["role"], "digest": s["digest"]} for s in corpus.sources], "version": FORMAT_VERSION}


def plan(cfg) -> dict:
    cache = open_cache(cfg)
    corpus = prepare_corpus(cfg.data, cache, dry_run=True)
    tok = get_tokenizer(cfg, cache, corpus, dry_run=True)
    key = cache.key("tokens", tokens_material(corpus, tok.identity))
    hit = cache.lookup("tokens", key) is not None and not cfg.cache.rebuild
    total = sum(s["bytes"] for s in corpus.sources)
    workers = cfg.tokenizer.num_workers or os.cpu_count()
    return {
        "stage": "encode",
        "inputs": corpus.sources,
        "tokenizer": str(tok.folder) + ("" if tok.reused else " (to be trained first: stage=tokenizer)"),
        "outputs": {"cache": str(cache.path("tokens", key)), "files": ["train.bin", "val.bin", "meta.json"],
                    "run_dir": ["meta.json", "run.json", "metrics.jsonl", "summary.json"]},
        "cache": "hit: reuse the token arrays" if hit else "miss: encode and store",
        "work": "none (cached)" if hit else
                f"encode {total / 1e6:.1f} MB with the {cfg.tokenizer.backend} backend in {workers} processes",
    }


def _vocab_requested(files) -> dict:
    """``vocab_size_requested`` (and ``vocab_capped``, why the vocabulary is smaller) of a trained
    tokenizer, from what its training recorded; empty for a given tokenizer (``tokenizer.path``)."""
    return {k: files.built[k] for k in ("vocab_size_requested", "vocab_capped") if k in files.built}


def get_or_encode_tokens(cfg, cache, corpus, files, special_tokens: list[str] | None = None):
    """The cached token arrays (``tokens/<key>``: train.bin, val.bin, meta.json) for this corpus
    and tokenizer, encoded first if absent. Returns the cache Artifact. ``special_tokens``
    defaults to ``cfg.tokenizer.special_tokens``."""
    specials = list(cfg.tokenizer.special_tokens if special_tokens is None else special_tokens)
    tok = files.load(specials)
    vocab_size = max(tok.vocab) + 1

    requested = _vocab_requested(files)

    def build(out: Path) -> dict:
        meta = {"format_version": FORMAT_VERSION, "dtype": token_dtype(vocab_size).name, "vocab_size": vocab_size,
                **requested,
                "special_tokens": {s: tok.special_ids[s] for s in tok.special_tokens},
                "eot_id": tok.special_ids[specials[0]] if specials else None,
                "tokenizer": {"vocab": str(files.vocab), "merges": str(files.merges), **files.identity},
                "backend": cfg.tokenizer.backend, "sources": corpus.sources,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "splits": {}}
        for split in SPLITS:
            src = corpus.train if split == "train" else corpus.val
            stats = encode_file(src, tok, out / f"{split}.bin", backend=cfg.tokenizer.backend,
                                num_workers=cfg.tokenizer.num_workers, progress=bool(cfg.progress))
            stats["bytes_per_token"] = round(stats["bytes"] / max(stats["tokens"], 1), 4)
            meta["splits"][split] = stats
            log.info("%s: %d tokens from %.1f MB (%.3f bytes/token) at %.2f MB/s", split, stats["tokens"],
                     stats["bytes"] / 1e6, stats["bytes_per_token"], stats["mb_per_s"])
        atomic_write_json(out / "meta.json", meta)
        return {"splits": meta["splits"]}

    return cache.get_or_build("tokens", tokens_material(corpus, files.identity), build)


def run(cfg) -> dict:
    run = active_run()
    cache = open_cache(cfg)
    corpus = prepare_corpus(cfg.data, cache)
    files = get_tokenizer(cfg, cache, corpus)
    artifact = get_or_encode_tokens(cfg, cache, corpus, files)
    run_meta = {**json.loads((artifact.path / "meta.json").read_text()), **_vocab_requested(files),
                "path": str(artifact.path), "cached": artifact.reused}
    atomic_write_json(run.dir / "meta.json", run_meta)
    summary = {"vocab_size": run_meta["vocab_size"]}
    if "vocab_size_requested" in run_meta:
        summary["vocab_size_requested"] = run_meta["vocab_size_requested"]
    for split, stats in run_meta["splits"].items():
        summary.update({f"{split}_tokens": stats["tokens"], f"{split}_bytes": stats["bytes"],
                        f"{split}_bytes_per_token": stats["bytes_per_token"], f"{split}_mb_per_s": stats["mb_per_s"]})
    run.log(summary, step=0)
    log.info("token arrays in %s%s", artifact.path, " (cached)" if artifact.reused else "")
    return {**summary, "tokens_dir": str(artifact.path), "cached": artifact.reused}
