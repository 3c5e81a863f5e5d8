"""Stage ``tokenizer``: train byte-level BPE on the data preset's train split.

Outputs (run directory): ``vocab.json`` and ``merges.txt`` (GPT-2 format), ``report.json``
and ``report.md`` (vocabulary size, bytes per token on the validation split, longest tokens,
training time, peak memory; with ``tokenizer.compare=true`` also the characters / bytes /
words / BPE comparison). The trained files are cached under ``tokenizer/<key>`` where the
key covers the train split's content and the tokenizer config, so a second run (or a later
stage that needs this tokenizer, e.g. ``encode``) reuses them. ``tokenizer=bytes`` writes the
byte-level vocabulary without training; ``tokenizer.path=…`` reports on an existing tokenizer.
The builder is ``lmrun.tokenizer.artifacts.get_tokenizer``.
"""
from __future__ import annotations

import logging
import os
import shutil

from lmrun.data.corpora import data_summary, Corpus, prepare_corpus, read_prefix
from lmrun.tokenizer.artifacts import get_tokenizer, vocab_facts
from lmrun.tokenizer.pretokenize import PRETOKEN_RE
from lmrun.tracking.cache import open_cache
from lmrun.tracking.files import atomic_write_json, atomic_write_text
from lmrun.tracking.run import active_run

log = logging.getLogger(__name__)


def plan(cfg) -> dict:
    """What ``run`` would do: inputs with sizes, outputs, cache state and the work estimate."""
    cache = open_cache(cfg)
    corpus = prepare_corpus(cfg.data, cache, dry_run=True)
    tok = get_tokenizer(cfg, cache, corpus, dry_run=True)
    hit = tok.reused
    n_special = len(cfg.tokenizer.special_tokens)
    train_bytes = sum(s["bytes"] for s in corpus.sources if s["role"] == "train")
    workers = cfg.tokenizer.num_workers or os.cpu_count()
    return {
        "stage": "tokenizer",
        "inputs": corpus.sources,
        **({"data": data_summary(corpus)} if corpus.info else {}),
        "outputs": {"run_dir": ["vocab.json", "merges.txt", "report.json", "report.md", "run.json",
                                "metrics.jsonl", "summary.json"],
                    "tokenizer": str(tok.folder)},
        "tokenizer": ("given: " + str(tok.folder)) if cfg.tokenizer.path else
                     "cache hit: reuse the trained tokenizer" if hit else "cache miss: train and store",
        "work": "none (existing tokenizer)" if hit else "write the byte vocabulary" if cfg.tokenizer.kind == "bytes" else
                f"pre-tokenize {train_bytes / 1e6:.1f} MB in {workers} processes, then up to "
                f"{cfg.tokenizer.vocab_size - 256 - n_special} merges",
    }


def compression_report(tok, text: str) -> dict:
    """Bytes per token of ``text`` under the Tokenizer ``tok``, and its longest tokens."""
    ids = tok.encode(text)
    n_bytes = len(text.encode("utf-8"))
    specials = {s.encode("utf-8") for s in tok.special_tokens}
    longest = sorted((b for b in tok.vocab.values() if b not in specials), key=lambda b: (-len(b), b))[:20]
    return {"val_bytes_encoded": n_bytes, "val_tokens": len(ids),
            "bytes_per_token": round(n_bytes / max(len(ids), 1), 4),
            "longest_tokens": [b.decode("utf-8", errors="replace") for b in longest]}


def comparison_table(cfg, corpus: Corpus, val_text: str, tok, bpe_tokens: int) -> list[dict]:
    """Bytes per token and vocabulary size on the validation text for characters, bytes, words
    (GPT-2 regex pre-tokens) and the tokenizer; char and word vocabularies are those of the
    train split, with the share of validation tokens outside them ("unknown")."""
    from lmrun.tokenizer.pretokenize import count_pretokens, special_split_pattern

    specials = list(tok.special_tokens)
    train_words = count_pretokens(corpus.train, specials, num_workers=cfg.tokenizer.num_workers)
    train_chars = set()
    for w in train_words:
        train_chars.update(w.decode("utf-8", errors="replace"))
    pieces = special_split_pattern(specials).split(val_text) if specials else [val_text]
    n_special = len(pieces) - 1
    val_words = [w for piece in pieces for w in PRETOKEN_RE.findall(piece)]
    val_chars = [c for piece in pieces for c in piece]
    n_bytes = len(val_text.encode("utf-8"))

    def row(name, vocab_size, tokens, unknown=None):
        return {"unit": name, "vocab_size": vocab_size, "tokens": tokens,
                "bytes_per_token": round(n_bytes / max(tokens, 1), 4),
                "unknown_rate": None if unknown is None else round(unknown / max(tokens - n_special, 1), 6)}

    return [
        row("characters", len(train_chars) + len(specials), len(val_chars) + n_special,
            sum(c not in train_chars for c in val_chars)),
        row("bytes", 256 + len(specials), sum(len(piece.encode("utf-8")) for piece in pieces) + n_special, 0),
        row("words", len(train_words) + len(specials), len(val_words) + n_special,
            sum(w.encode("utf-8") not in train_words for w in val_words)),
        row(f"{cfg.tokenizer.kind} (this tokenizer)", len(tok.vocab), bpe_tokens, 0),
    ]


def _report_markdown(r: dict) -> str:
    rows = "\n".join(f"| {k} | {v} |" for k, v in r.items() if k not in ("longest_tokens", "comparison"))
    longest = ", ".join(repr(t) for t in r["longest_tokens"])
    text = f"# Tokenizer report\n\n| metric | value |\n|---|---|\n{rows}\n\nLongest tokens: {longest}\n"
    if r.get("comparison"):
        text += ("\n## Compression on the validation split\n\n| unit | vocab size | tokens | bytes/token | unknown rate |\n"
                 "|---|---|---|---|---|\n")
        text += "\n".join(f"| {c['unit']} | {c['vocab_size']} | {c['tokens']} | {c['bytes_per_token']} | {c['unknown_rate']} |"
                          for c in r["comparison"]) + "\n"
    return text


def run(cfg) -> dict:
    run = active_run()
    cache = open_cache(cfg)
    corpus = prepare_corpus(cfg.data, cache)
    files = get_tokenizer(cfg, cache, corpus)
    corpus.ensure_text()  # a mixture's text (the report reads its validation split)
    shutil.copy2(files.vocab, run.dir / "vocab.json")
    shutil.copy2(files.merges, run.dir / "merges.txt")
    specials = list(cfg.tokenizer.special_tokens)
    tok = files.load(specials)
    built = files.built
    report = {
        "data": corpus.name,
        "tokenizer": str(files.folder) if cfg.tokenizer.path else cfg.tokenizer.kind,
        "train_bytes": built.get("train_bytes"),
        **vocab_facts(cfg, len(tok.vocab), built.get("num_merges"), built.get("train_bytes")),
        "num_merges": len(tok.merges),
        "special_tokens": specials,
        "cached": files.reused,
        "tokenizer_dir": str(files.folder),
        "train_seconds": built.get("train_seconds"),
        "train_mb_per_s": built.get("train_mb_per_s"),
        "peak_rss_mb": built.get("peak_rss_mb"),
        "peak_rss_children_mb": built.get("peak_rss_children_mb"),
    }
    val_text = read_prefix(corpus.val, int(cfg.tokenizer.report_max_bytes))
    report.update(compression_report(tok, val_text))
    if cfg.tokenizer.compare:
        report["comparison"] = comparison_table(cfg, corpus, val_text, tok, report["val_tokens"])
    atomic_write_json(run.dir / "report.json", report)
    atomic_write_text(run.dir / "report.md", _report_markdown(report))
    summary = {k: v for k, v in report.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    run.log(summary, step=0)
    log.info("vocab %d%s, %.3f bytes/token on validation%s", len(tok.vocab),
             f" (of {report['vocab_size_requested']} asked: see vocab_capped in report.json)"
             if report.get("vocab_capped") else "", report["bytes_per_token"],
             " (existing tokenizer)" if files.reused else f", trained in {report['train_seconds']:.2f}s")
    if cfg.tokenizer.compare:
        for c in report["comparison"]:
            log.info("  %-24s vocab %8d  %.3f bytes/token", c["unit"], c["vocab_size"], c["bytes_per_token"])
    return {**summary, "cached": files.reused}
