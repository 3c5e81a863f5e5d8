"""Stage ``encode``: the data preset's train and validation splits -> flat token arrays.

Writes ``train.bin`` / ``val.bin`` (token ids, uint16 when the vocabulary fits, else uint32;
``numpy.memmap(path, dtype=meta["dtype"])`` reads them) and ``meta.json`` into the artifact
cache under ``tokens/<key>`` — the key covers the tokenizer's identity and the corpus content —
and ``meta.json`` into the run directory. The tokenizer is ``tokenizer.path`` if given, else
the cached one for this data and tokenizer config, trained first if needed. Documents stay
separated by the end-of-text special token they are separated by in the text. The builder is
``lmrun.tokenizer.artifacts.get_or_encode_tokens``.
"""
from __future__ import annotations

import json
import logging

from lmrun.data.corpora import data_summary, prepare_corpus
from lmrun.launch.threads import available_cpus
from lmrun.tokenizer import native
from lmrun.tokenizer.artifacts import get_or_encode_tokens, get_tokenizer, tokens_material, vocab_requested
from lmrun.tracking.cache import open_cache
from lmrun.tracking.files import atomic_write_json
from lmrun.tracking.run import active_run

log = logging.getLogger(__name__)


def plan(cfg) -> dict:
    cache = open_cache(cfg)
    corpus = prepare_corpus(cfg.data, cache, dry_run=True)
    tok = get_tokenizer(cfg, cache, corpus, dry_run=True)
    key = cache.key("tokens", tokens_material(corpus, tok.identity))
    hit = cache.lookup("tokens", key) is not None and not cfg.cache.rebuild
    total = sum(s["bytes"] for s in corpus.sources)
    workers = cfg.tokenizer.num_workers or available_cpus()[0]
    kind = "threads" if cfg.tokenizer.backend == "native" and native.available() else "processes"
    return {
        "stage": "encode",
        "inputs": corpus.sources,
        **({"data": data_summary(corpus)} if corpus.info else {}),
        "tokenizer": str(tok.folder) + ("" if tok.reused else " (to be trained first: stage=tokenizer)"),
        "outputs": {"cache": str(cache.path("tokens", key)), "files": ["train.bin", "val.bin", "meta.json"],
                    "run_dir": ["meta.json", "run.json", "metrics.jsonl", "summary.json"]},
        "cache": "hit: reuse the token arrays" if hit else "miss: encode and store",
        "work": "none (cached)" if hit else
                f"encode {total / 1e6:.1f} MB with the {cfg.tokenizer.backend} backend in {workers} {kind}",
    }


def run(cfg) -> dict:
    run = active_run()
    cache = open_cache(cfg)
    corpus = prepare_corpus(cfg.data, cache)
    files = get_tokenizer(cfg, cache, corpus)
    artifact = get_or_encode_tokens(cfg, cache, corpus, files)
    run_meta = {**json.loads((artifact.path / "meta.json").read_text()), **vocab_requested(files),
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
