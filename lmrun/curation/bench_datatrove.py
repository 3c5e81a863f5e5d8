"""Benchmark: lmrun.curation against datatrove (HuggingFace) running the equivalent steps on
the same documents, in the same process, one core.

Usage::

    OMP_NUM_THREADS=1 python -m lmrun.curation.bench_datatrove --out bench.json [--md bench.md]
        [--inputs PATH ...] [--limit N] [--repeats 2] [--minhash-docs 1500]

Steps compared (documents/s = documents in / seconds of the step; best of ``--repeats`` for the
cheap steps, one pass for extraction):

- **extract**: our ``extract_text_from_html_bytes`` (resiliparse, main content, encoding
  detected — decoding is inside our timing) vs datatrove's ``Trafilatura`` extractor step
  (``favour_precision=True``, its default; run through its ``run()`` with its per-document
  sandbox process, ``timeout`` raised to 60 s so no page times out; pages handed to it already
  decoded). Different extractors, so only throughput and output size are compared.
- **gopher**: our ``gopher_reasons`` with every rule of the paper on (the CS336 four plus
  symbol/word 0.1, bullet lines 0.9, at least 2 stop words) vs datatrove's
  ``GopherQualityFilter()`` defaults (the same thresholds; words from spaCy's tokenizer, pure
  punctuation tokens left out of the counts). Agreement = share of documents both keep or both
  remove; the disagreements are listed with both sides' reasons. The same agreement with
  datatrove's filter given whitespace words (a custom ``WordTokenizer``) tells rule differences
  from tokenisation differences.
- **pii**: our ``mask_emails`` + ``mask_ips`` vs datatrove's ``PIIFormatter`` (e-mails and
  IPv4; ``only_remove_public_ips=False`` to match ours, which masks every address; datatrove
  has no phone numbers and no IPv6). Agreement = documents whose e-mail and IPv4 counts match.
- **minhash**: our ``find_near_duplicates`` (20 bands x 6 rows, word 5-grams, candidates
  confirmed by exact Jaccard >= 0.8) vs datatrove's four MinHash stages (signatures, buckets,
  clusters, filter; LSH only, no Jaccard check) with the same 20 x 6 shape and with its
  default 14 x 8 (64-bit SHA-1 shingle hashes: its default xxhash path fails with xxhash 4.x,
  which no longer hashes str), on a corpus of real passages (the extracted pages and WikiText-2) with
  planted near duplicates (0-15% of words edited). Truth: every pair with exact Jaccard >= 0.8
  of word 5-gram sets (our normalisation), found exactly with prefix filtering. Scores:
  precision and recall of "in the same cluster" pairs against the truth's clusters, and
  documents removed.

The inputs default to Debian's Python 3.11 HTML docs (``apt-get install python3.11-doc``) and
``../shared/data/web/iana.warc.gz``. Needs ``datatrove``, ``spacy`` (datatrove's English word
tokenizer; ``spacy.blank("en")``, no model download) and ``trafilatura``.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import re
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared" / "data"
DEFAULT_INPUTS = ["/usr/share/doc/python3.11/html", str(SHARED / "web" / "iana.warc.gz")]
GOPHER_PAPER = dict(min_words=50, max_words=100_000, min_mean_word_length=3.0, max_mean_word_length=10.0,
                    max_ellipsis_lines_ratio=0.3, min_alpha_words_ratio=0.8, max_symbol_word_ratio=0.1,
                    max_bullet_lines_ratio=0.9, min_stop_words=2)


def _rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("nan")


def load_pages(inputs: list[str], limit: int | None) -> list[dict]:
    """HTML documents (``{"id", "html": bytes}``) of ``inputs``, sorted by path, at most ``limit``
    (spread evenly over the sorted list when fewer than all are taken)."""
    from lmrun.curation.readers import list_input_files, read_documents

    pages = []
    for path, fmt in list_input_files(inputs):
        if fmt in ("html", "warc"):
            pages += [d for d in read_documents(path, fmt) if "html" in d]
    if limit and len(pages) > limit:
        step = len(pages) / limit
        pages = [pages[int(i * step)] for i in range(limit)]
    return pages


# --- extraction ---------------------------------------------------------------------------
def bench_extract(pages: list[dict]) -> tuple[dict, list[str]]:
    from datatrove.data import Document
    from datatrove.pipeline.extractors import Trafilatura
    import trafilatura  # noqa: F401  (fail here, not once per page inside datatrove's sandbox process)

    from lmrun.curation.extract import decode_html_bytes, extract_text_from_html_bytes

    t0 = time.perf_counter()
    ours = [extract_text_from_html_bytes(p["html"], main_content=True) for p in pages]
    t_ours = time.perf_counter() - t0
    decoded = [decode_html_bytes(p["html"]) or "" for p in pages]
    step = Trafilatura(timeout=60.0)
    docs = [Document(text=h, id=str(i)) for i, h in enumerate(decoded)]
    t0 = time.perf_counter()
    theirs = {int(d.id): d.text for d in step.run(iter(docs))}
    t_dt = time.perf_counter() - t0
    n = len(pages)
    res = {"docs": n, "html_mb": round(sum(len(p["html"]) for p in pages) / 1e6, 3),
           "ours": {"seconds": round(t_ours, 3), "docs_per_s": round(_rate(n, t_ours), 1),
                    "docs_with_text": sum(bool(t and t.strip()) for t in ours),
                    "text_mb": round(sum(len((t or "").encode()) for t in ours) / 1e6, 3)},
           "datatrove_trafilatura": {"seconds": round(t_dt, 3), "docs_per_s": round(_rate(n, t_dt), 1),
                                     "docs_with_text": sum(bool(t and t.strip()) for t in theirs.values()),
                                     "text_mb": round(sum(len(t.encode()) for t in theirs.values()) / 1e6, 3)}}
    res["ratio_ours_over_datatrove"] = round(res["ours"]["docs_per_s"] / res["datatrove_trafilatura"]["docs_per_s"], 2)
    return res, [t for t in ours if t and t.strip()]


# --- gopher -------------------------------------------------------------------------------
def _WhitespaceWords():
    from datatrove.utils.word_tokenizers import WordTokenizer

    class WhitespaceWords(WordTokenizer):
        def word_tokenize(self, text: str) -> list[str]:
            return text.split()

        def sent_tokenize(self, text: str) -> list[str]:
            return text.splitlines()

        def span_tokenize(self, text: str) -> list[tuple[int, int]]:
            return [m.span() for m in re.finditer(r"\S+", text)]

    return WhitespaceWords("en")


def bench_gopher(texts: list[str], repeats: int) -> dict:
    from datatrove.data import Document
    from datatrove.pipeline.filters import GopherQualityFilter

    from lmrun.curation.gopher import gopher_reasons

    dt = GopherQualityFilter()
    list(dt.run(iter([Document(text="warm up the tokenizer " * 20, id="w")])))  # loads spaCy once
    # the same filter with whitespace words (ours, the paper's and CS336's): separates rule
    # differences from tokenisation differences
    dt_ws = GopherQualityFilter(language=_WhitespaceWords())
    ws_keep = [bool(dt_ws.filter(Document(text=t, id=str(i))) is True) for i, t in enumerate(texts)]
    best_ours = best_dt = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        ours = [gopher_reasons(t, **GOPHER_PAPER) for t in texts]
        best_ours = min(best_ours, time.perf_counter() - t0)
        docs = [Document(text=t, id=str(i)) for i, t in enumerate(texts)]
        t0 = time.perf_counter()
        kept = {int(d.id) for d in dt.run(iter(docs))}
        best_dt = min(best_dt, time.perf_counter() - t0)
    dt_reason = {}
    for i, t in enumerate(texts):
        if i not in kept:
            r = dt.filter(Document(text=t, id=str(i)))
            dt_reason[i] = r[1] if isinstance(r, tuple) else "removed"
    n = len(texts)
    ours_keep = [not r for r in ours]
    dt_keep = [i in kept for i in range(n)]
    agree = sum(a == b for a, b in zip(ours_keep, dt_keep))
    disagreements = [{"doc": i, "ours": ours[i][0] if ours[i] else "kept", "datatrove": dt_reason.get(i, "kept"),
                      "words_whitespace": len(texts[i].split())}
                     for i in range(n) if ours_keep[i] != dt_keep[i]]
    res = {"docs": n, "ours": {"seconds": round(best_ours, 4), "docs_per_s": round(_rate(n, best_ours), 1),
                               "kept": sum(ours_keep),
                               "reasons": dict(Counter(r[0] for r in ours if r).most_common())},
           "datatrove": {"seconds": round(best_dt, 4), "docs_per_s": round(_rate(n, best_dt), 1), "kept": sum(dt_keep),
                         "reasons": dict(Counter(dt_reason.values()).most_common())},
           "agreement": round(agree / n, 4) if n else None,
           "both_keep": sum(a and b for a, b in zip(ours_keep, dt_keep)),
           "both_remove": sum(not a and not b for a, b in zip(ours_keep, dt_keep)),
           "only_ours_keeps": sum(a and not b for a, b in zip(ours_keep, dt_keep)),
           "only_datatrove_keeps": sum(b and not a for a, b in zip(ours_keep, dt_keep)),
           "disagreements": disagreements[:20],
           "datatrove_whitespace_words": {"kept": sum(ws_keep),
                                          "agreement": round(sum(a == b for a, b in zip(ours_keep, ws_keep)) / n, 4)
                                          if n else None}}
    res["ratio_ours_over_datatrove"] = round(res["ours"]["docs_per_s"] / res["datatrove"]["docs_per_s"], 2)
    return res


# --- PII ----------------------------------------------------------------------------------
def bench_pii(texts: list[str], repeats: int) -> dict:
    from datatrove.pipeline.formatters import PIIFormatter

    from lmrun.curation.pii import mask_emails, mask_ips

    dt = PIIFormatter(only_remove_public_ips=False)
    best_ours = best_dt = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        ours = []
        for t in texts:
            t1, ne = mask_emails(t)
            _, ni = mask_ips(t1)
            ours.append((ne, ni))
        best_ours = min(best_ours, time.perf_counter() - t0)
        t0 = time.perf_counter()
        for t in texts:
            dt.format(t)
        best_dt = min(best_dt, time.perf_counter() - t0)

    def count(replacer, text):
        return sum(1 for m in replacer.regex.finditer(text)
                   if replacer.validator is None or replacer.validator(m.group(0)))

    theirs = []
    for t in texts:
        ne = count(dt.emails_replacer, t)
        theirs.append((ne, count(dt.ip_replacer, dt.emails_replacer.regex.sub("x", t))))
    n = len(texts)
    # our IP count includes IPv6, which datatrove does not mask: compare IPv4 only
    ours_v4 = []
    for t in texts:
        from lmrun.curation.pii import _IPV4_RE

        ours_v4.append(len(_IPV4_RE.findall(mask_emails(t)[0])))
    res = {"docs": n,
           "ours": {"seconds": round(best_ours, 4), "docs_per_s": round(_rate(n, best_ours), 1),
                    "emails": sum(e for e, _ in ours), "ips_v4_and_v6": sum(i for _, i in ours), "ipv4": sum(ours_v4)},
           "datatrove": {"seconds": round(best_dt, 4), "docs_per_s": round(_rate(n, best_dt), 1),
                         "emails": sum(e for e, _ in theirs), "ipv4": sum(i for _, i in theirs)},
           "docs_same_email_count": sum(a[0] == b[0] for a, b in zip(ours, theirs)),
           "docs_same_ipv4_count": sum(a == b[1] for a, b in zip(ours_v4, theirs))}
    res["ratio_ours_over_datatrove"] = round(res["ours"]["docs_per_s"] / res["datatrove"]["docs_per_s"], 2)
    return res


# --- MinHash ------------------------------------------------------------------------------
def planted_corpus(texts: list[str], n_base: int, seed: int = 0) -> list[str]:
    """``n_base`` passages of 120-400 words cut from ``texts`` (real documents) plus one near
    duplicate of every fifth passage with 0-15% of its words replaced; shuffled."""
    rng = random.Random(seed)
    words = " ".join(texts).split()
    base, pos = [], 0
    while len(base) < n_base and pos < len(words):
        k = rng.randint(120, 400)
        base.append(" ".join(words[pos:pos + k]))
        pos += k
    corpus = list(base)
    for i in range(0, len(base), 5):
        w = base[i].split()
        frac = rng.choice([0.0, 0.01, 0.02, 0.05, 0.1, 0.15])
        for j in rng.sample(range(len(w)), int(len(w) * frac)):
            w[j] = rng.choice(["lorem", "ipsum", "dolor", "amet", "elit", w[j].upper() + "!"])
        corpus.append(" ".join(w))
    rng.shuffle(corpus)
    return corpus


def exact_similar_pairs(sets: list[set], threshold: float) -> set[tuple[int, int]]:
    """All pairs (i, j), i < j, with Jaccard >= ``threshold``, exactly: prefix filtering
    (Chaudhuri et al. 2006; Bayardo et al. 2007 "All-pairs"): with elements ordered rarest
    first, two sets reaching the threshold share an element among the first
    |s| - ceil(threshold |s|) + 1 of each."""
    freq = Counter(x for s in sets for x in s)
    index: dict[int, list[int]] = defaultdict(list)
    cand: set[tuple[int, int]] = set()
    for i, s in enumerate(sets):
        if not s:
            continue
        order = sorted(s, key=lambda x: (freq[x], x))
        prefix = order[:len(s) - math.ceil(threshold * len(s)) + 1]
        for x in prefix:
            for j in index[x]:
                cand.add((j, i))
            index[x].append(i)
    return {(i, j) for i, j in cand if len(sets[i] & sets[j]) >= threshold * len(sets[i] | sets[j])}


def _clusters(pairs, n: int) -> list[int]:
    from lmrun.curation.dedup import UnionFind

    uf = UnionFind()
    for i, j in pairs:
        uf.union(i, j)
    return [uf.find(i) if i in uf.parent else i for i in range(n)]


def _co_cluster_pairs(labels: list[int]) -> set[tuple[int, int]]:
    groups = defaultdict(list)
    for i, c in enumerate(labels):
        groups[c].append(i)
    return {p for g in groups.values() if len(g) > 1 for p in itertools.combinations(sorted(g), 2)}


def _score(found: set, truth: set) -> dict:
    tp = len(found & truth)
    return {"precision": round(tp / len(found), 4) if found else 1.0, "recall": round(tp / len(truth), 4) if truth else 1.0}


def _datatrove_minhash(corpus: list[str], buckets: int, rows: int, workdir: Path) -> dict:
    import struct

    from datatrove.data import Document
    from datatrove.pipeline.dedup.minhash import (MinhashConfig, MinhashDedupBuckets, MinhashDedupCluster,
                                                  MinhashDedupFilter, MinhashDedupSignature)
    from datatrove.utils.hashing import HashConfig

    cfg = MinhashConfig(n_grams=5, num_buckets=buckets, hashes_per_bucket=rows, seed=1,
                        hash_config=HashConfig(precision=64, hash_fc="sha1"))
    sig_dir, buck_dir, rm_dir = workdir / "sigs", workdir / "buckets", workdir / "remove"
    docs = lambda: iter([Document(text=t, id=str(i)) for i, t in enumerate(corpus)])  # noqa: E731
    sig = MinhashDedupSignature(output_folder=str(sig_dir), config=cfg)
    sig.get_shingles("warm up the word tokenizer once before timing it")
    t0 = time.perf_counter()
    sig.run(docs(), rank=0, world_size=1)
    for b in range(buckets):
        MinhashDedupBuckets(input_folder=str(sig_dir), output_folder=str(buck_dir), config=cfg).run(
            None, rank=b, world_size=buckets)
    MinhashDedupCluster(input_folder=str(buck_dir), output_folder=str(rm_dir), config=cfg).run()
    kept = [int(d.id) for d in MinhashDedupFilter(input_folder=str(rm_dir)).run(docs(), rank=0, world_size=1)]
    seconds = time.perf_counter() - t0
    pairs = set()
    for f in buck_dir.glob("*.dups"):
        data = f.read_bytes()
        for f1, d1, f2, d2 in struct.iter_unpack("<4I", data):
            pairs.add((min(d1, d2), max(d1, d2)))
    return {"seconds": seconds, "pairs": pairs, "removed": len(corpus) - len(kept)}


def bench_minhash(texts: list[str], n_base: int) -> dict:
    from lmrun.curation.dedup import find_near_duplicates, shingles

    corpus = planted_corpus(texts, n_base)
    n = len(corpus)
    sets = [shingles(t, 5) for t in corpus]
    truth_pairs = exact_similar_pairs(sets, 0.8)
    truth_labels = _clusters(truth_pairs, n)
    truth = _co_cluster_pairs(truth_labels)
    truth_removed = n - len(set(truth_labels))
    t0 = time.perf_counter()
    res = find_near_duplicates(lambda: iter(corpus), num_hashes=120, num_bands=20, ngrams=5, jaccard_threshold=0.8)
    t_ours = time.perf_counter() - t0
    ours = _co_cluster_pairs(_clusters(res["pairs"], n))
    out = {"docs": n, "truth": {"pairs_jaccard_ge_0.8": len(truth_pairs), "docs_to_remove": truth_removed},
           "ours_20x6": {"seconds": round(t_ours, 3), "docs_per_s": round(_rate(n, t_ours), 1),
                         "removed": len(res["remove"]), "candidate_pairs": res["candidates"], **_score(ours, truth)}}
    for b, r in ((20, 6), (14, 8)):
        with tempfile.TemporaryDirectory() as tmp:
            d = _datatrove_minhash(corpus, b, r, Path(tmp))
        found = _co_cluster_pairs(_clusters(d["pairs"], n))
        out[f"datatrove_{b}x{r}"] = {"seconds": round(d["seconds"], 3), "docs_per_s": round(_rate(n, d["seconds"]), 1),
                                     "removed": d["removed"], **_score(found, truth)}
    out["ratio_ours_over_datatrove_20x6"] = round(out["ours_20x6"]["docs_per_s"] / out["datatrove_20x6"]["docs_per_s"], 2)
    return out


def markdown(r: dict) -> str:
    e, g, p, m = r["extract"], r["gopher"], r["pii"], r["minhash"]
    lines = [f"{e['docs']} HTML pages ({e['html_mb']} MB); documents/s on one core, best of {r['repeats']} "
             "(extraction: one pass).", "",
             "| step | lmrun docs/s | datatrove docs/s | lmrun / datatrove | agreement |", "|---|---:|---:|---:|---|",
             f"| extract (resiliparse vs Trafilatura) | {e['ours']['docs_per_s']:,} | "
             f"{e['datatrove_trafilatura']['docs_per_s']:,} | {e['ratio_ours_over_datatrove']} | different extractors: "
             f"{e['ours']['text_mb']} vs {e['datatrove_trafilatura']['text_mb']} MB of text, "
             f"{e['ours']['docs_with_text']} vs {e['datatrove_trafilatura']['docs_with_text']} pages with text |",
             f"| Gopher quality (all paper rules) | {g['ours']['docs_per_s']:,} | {g['datatrove']['docs_per_s']:,} | "
             f"{g['ratio_ours_over_datatrove']} | {100 * g['agreement']:.1f}% of {g['docs']} docs "
             f"(kept {g['ours']['kept']} vs {g['datatrove']['kept']}; only ours keeps {g['only_ours_keeps']}, "
             f"only datatrove keeps {g['only_datatrove_keeps']}); with whitespace words in datatrove's filter "
             f"{100 * g['datatrove_whitespace_words']['agreement']:.1f}% |",
             f"| PII e-mail + IPv4 | {p['ours']['docs_per_s']:,} | {p['datatrove']['docs_per_s']:,} | "
             f"{p['ratio_ours_over_datatrove']} | same e-mail count in {p['docs_same_email_count']}/{p['docs']} docs "
             f"({p['ours']['emails']} vs {p['datatrove']['emails']}), same IPv4 count in "
             f"{p['docs_same_ipv4_count']}/{p['docs']} ({p['ours']['ipv4']} vs {p['datatrove']['ipv4']}) |"]
    o, d6, d8 = m["ours_20x6"], m["datatrove_20x6"], m["datatrove_14x8"]
    lines.append(f"| MinHash dedup, {m['docs']} docs (20x6) | {o['docs_per_s']:,} | {d6['docs_per_s']:,} | "
                 f"{m['ratio_ours_over_datatrove_20x6']} | truth: {m['truth']['pairs_jaccard_ge_0.8']} pairs at "
                 f"J>=0.8, {m['truth']['docs_to_remove']} docs to remove; lmrun P {o['precision']:.3f} R {o['recall']:.3f} "
                 f"removes {o['removed']}; datatrove 20x6 P {d6['precision']:.3f} R {d6['recall']:.3f} removes "
                 f"{d6['removed']}; 14x8 P {d8['precision']:.3f} R {d8['recall']:.3f} removes {d8['removed']} "
                 f"({d8['docs_per_s']:,} docs/s) |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--inputs", nargs="+", default=DEFAULT_INPUTS)
    ap.add_argument("--limit", type=int, default=None, help="at most this many HTML pages")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--minhash-docs", type=int, default=1500, help="real passages before planting duplicates")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--md", type=Path, default=None)
    a = ap.parse_args(argv)
    import logging

    from loguru import logger as loguru_logger

    loguru_logger.remove()  # datatrove's per-step logging
    logging.getLogger().setLevel(logging.WARNING)
    pages = load_pages(a.inputs, a.limit)
    if not pages:
        print(f"no HTML pages found in {a.inputs}", file=sys.stderr)
        return 1
    r = {"repeats": a.repeats, "inputs": a.inputs}
    r["extract"], texts = bench_extract(pages)
    print(f"extract: {json.dumps({k: v for k, v in r['extract'].items()})}", flush=True)
    r["gopher"] = bench_gopher(texts, a.repeats)
    print(f"gopher: agreement {r['gopher']['agreement']}, ratio {r['gopher']['ratio_ours_over_datatrove']}", flush=True)
    r["pii"] = bench_pii(texts, a.repeats)
    wiki = SHARED / "corpora" / "wikitext-2" / "valid.txt"
    passages = texts + ([wiki.read_text(encoding="utf-8")] if wiki.is_file() else [])
    r["minhash"] = bench_minhash(passages, a.minhash_docs)
    md = markdown(r)
    print(md)
    if a.out:
        from lmrun.tracking.files import atomic_write_json

        atomic_write_json(a.out, r)
    if a.md:
        a.md.write_text(md, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
