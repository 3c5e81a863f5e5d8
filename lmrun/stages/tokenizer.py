"""Stage ``tokenizer``: train byte-level BPE on the data preset's train split.

Outputs (run directory): ``vocab.json`` and ``merges.txt`` (GPT-2 format), ``report.json``
and ``report.md`` (vocabulary size, bytes per token on the validation split, longest tokens,
training time, peak memory). The trained files are cached under ``tokenizer/<key>`` where the
key covers the train split's content and the tokenizer config, so a second run (or a later
stage that needs this tokenizer) reuses them.
"""
from __future__ import annotations

import logging
import os
import resource
import shutil
import time
from pathlib import Path

from lmrun.data.corpora import Corpus, prepare_corpus, read_prefix
from lmrun.tokenizer.formats import load_merges, load_vocab, save_merges, save_vocab
from lmrun.tokenizer.pretokenize import GPT2_PATTERN
from lmrun.tracking.cache import Artifact, ArtifactCache
from lmrun.tracking.files import atomic_write_json, atomic_write_text
from lmrun.tracking.run import active_run

log = logging.getLogger(__name__)

#: Bump when training output for the same inputs and config would change.
ALGORITHM_VERSION = 1


def open_cache(cfg) -> ArtifactCache:
    return ArtifactCache(cfg.paths.cache_dir, rebuild=bool(cfg.cache.rebuild))


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


def get_or_train_tokenizer(cfg, cache: ArtifactCache, corpus: Corpus) -> Artifact:
    """The cached tokenizer for (train split, cfg.tokenizer), trained first if absent."""
    from lmrun.tokenizer.bpe import train_bpe

    t = cfg.tokenizer

    def build(out: Path) -> dict:
        size = corpus.train.stat().st_size
        log.info("training BPE: %s (%.1f MB), vocab_size=%d", corpus.train, size / 1e6, t.vocab_size)
        t0 = time.perf_counter()
        vocab, merges = train_bpe(corpus.train, int(t.vocab_size), list(t.special_tokens),
                                  num_workers=t.num_workers, backend=t.train_backend, progress=bool(cfg.progress))
        seconds = time.perf_counter() - t0
        save_vocab(vocab, out / "vocab.json")
        save_merges(merges, out / "merges.txt")
        return {"train_seconds": round(seconds, 3), "train_bytes": size, "vocab_size": len(vocab),
                "num_merges": len(merges), "train_mb_per_s": round(size / 1e6 / max(seconds, 1e-9), 3), **peak_rss_mb()}

    return cache.get_or_build("tokenizer", tokenizer_material(cfg, corpus), build)


def plan(cfg) -> dict:
    """What ``run`` would do: inputs with sizes, outputs, cache state and the work estimate."""
    cache = open_cache(cfg)
    corpus = prepare_corpus(cfg.data, cache, dry_run=True)
    key = cache.key("tokenizer", tokenizer_material(cfg, corpus))
    hit = cache.lookup("tokenizer", key) is not None and not cfg.cache.rebuild
    n_special = len(cfg.tokenizer.special_tokens)
    train_bytes = sum(s["bytes"] for s in corpus.sources if s["role"] == "train")
    workers = cfg.tokenizer.num_workers or os.cpu_count()
    return {
        "stage": "tokenizer",
        "inputs": corpus.sources,
        "outputs": {"run_dir": ["vocab.json", "merges.txt", "report.json", "report.md", "run.json",
                                "metrics.jsonl", "summary.json"],
                    "cache": str(cache.path("tokenizer", key))},
        "cache": "hit: reuse the trained tokenizer" if hit else "miss: train and store",
        "work": "none (cached)" if hit else
                f"pre-tokenize {train_bytes / 1e6:.1f} MB in {workers} processes, then up to "
                f"{cfg.tokenizer.vocab_size - 256 - n_special} merges",
    }


def compression_report(vocab: dict[int, bytes], merges, special_tokens: list[str], text: str) -> dict:
    """Bytes per token of ``text`` under the tokenizer, and its longest tokens."""
    from lmrun.tokenizer.tokenizer import Tokenizer

    tok = Tokenizer(vocab, merges, special_tokens)
    ids = tok.encode(text)
    n_bytes = len(text.encode("utf-8"))
    specials = {s.encode("utf-8") for s in special_tokens}
    longest = sorted((b for b in vocab.values() if b not in specials), key=lambda b: (-len(b), b))[:20]
    return {"val_bytes_encoded": n_bytes, "val_tokens": len(ids),
            "bytes_per_token": round(n_bytes / max(len(ids), 1), 4),
            "longest_tokens": [b.decode("utf-8", errors="replace") for b in longest]}


def _report_markdown(r: dict) -> str:
    rows = "\n".join(f"| {k} | {v} |" for k, v in r.items() if k != "longest_tokens")
    longest = ", ".join(repr(t) for t in r["longest_tokens"])
    return f"# Tokenizer report\n\n| metric | value |\n|---|---|\n{rows}\n\nLongest tokens: {longest}\n"


def run(cfg) -> dict:
    run = active_run()
    cache = open_cache(cfg)
    corpus = prepare_corpus(cfg.data, cache)
    artifact = get_or_train_tokenizer(cfg, cache, corpus)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy2(artifact.path / name, run.dir / name)
    vocab, merges = load_vocab(run.dir / "vocab.json"), load_merges(run.dir / "merges.txt")
    built = artifact.manifest["result"]
    report = {
        "data": corpus.name,
        "train_bytes": built["train_bytes"],
        "vocab_size": len(vocab),
        "num_merges": len(merges),
        "special_tokens": list(cfg.tokenizer.special_tokens),
        "cached": artifact.reused,
        "cache_path": str(artifact.path),
        "train_seconds": built["train_seconds"],
        "train_mb_per_s": built["train_mb_per_s"],
        "peak_rss_mb": built["peak_rss_mb"],
        "peak_rss_children_mb": built["peak_rss_children_mb"],
    }
    val_text = read_prefix(corpus.val, int(cfg.tokenizer.report_max_bytes))
    report.update(compression_report(vocab, merges, list(cfg.tokenizer.special_tokens), val_text))
    atomic_write_json(run.dir / "report.json", report)
    atomic_write_text(run.dir / "report.md", _report_markdown(report))
    summary = {k: v for k, v in report.items() if isinstance(v, (int, float, bool)) and not isinstance(v, bool)}
    run.log(summary, step=0)
    log.info("vocab %d, %.3f bytes/token on validation, trained in %.2fs%s", len(vocab), report["bytes_per_token"],
             report["train_seconds"], " (cached)" if artifact.reused else "")
    return {**summary, "cached": artifact.reused}
