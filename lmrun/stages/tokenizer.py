"""Stage ``tokenizer``: train byte-level BPE on the data preset's train split.

Outputs (run directory): ``vocab.json`` and ``merges.txt`` (GPT-2 format), ``report.json``
and ``report.md`` (vocabulary size, bytes per token on the validation split, longest tokens,
training time, peak memory; with ``tokenizer.compare=true`` also the characters / bytes /
words / BPE comparison). The trained files are cached under ``tokenizer/<key>`` where the
key covers the train split's content and the tokenizer config, so a second run (or a later
stage that needs this tokenizer, e.g. ``encode``) reuses them. ``tokenizer=bytes`` writes the
byte-level vocabulary without training; ``tokenizer.path=…`` reports on an existing tokenizer.
"""
from __future__ import annotations

import logging
import os
import re
import resource
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from lmrun.data.corpora import Corpus, prepare_corpus, read_prefix
from lmrun.errors import DataError
from lmrun.tokenizer.formats import save_merges, save_vocab
from lmrun.tokenizer.pretokenize import GPT2_PATTERN, PRETOKEN_RE
from lmrun.tracking.cache import Artifact, ArtifactCache
from lmrun.tracking.files import atomic_write_json, atomic_write_text, file_digest
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


def get_or_train_tokenizer(cfg, cache: ArtifactCache, corpus: Corpus) -> Artifact:
    """The cached tokenizer for (train split, cfg.tokenizer), trained first if absent."""
    from lmrun.tokenizer.bpe import train_bpe

    t = cfg.tokenizer

    def build(out: Path) -> dict:
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
