"""Encoding throughput: lmrun's pure-Python ``Tokenizer.encode`` against tiktoken, one thread.

Both encode the same text with the same vocabulary and merges (tiktoken's encoding is built by
``Tokenizer.to_tiktoken``, so the comparison holds the algorithm's inputs fixed), and the ids are
checked to be equal. Reported in MB/s of UTF-8 input (1 MB = 10^6 bytes):

- ``ours_cold``: a fresh tokenizer, empty pre-token cache (what one pass over new text costs);
- ``ours_warm``: the same text again with the cache filled (the steady state on a large corpus);
- ``tiktoken``: ``Encoding.encode(text, allowed_special="all")``, single call, one thread;
- ``ratio_cold`` / ``ratio_warm``: ours / tiktoken.

With ``--bulk``, also the bulk path of ``lmrun stage=encode`` (:func:`lmrun.tokenizer.bulk.encode_file`:
the file cut at document boundaries, chunks encoded in worker processes) for both backends
with 1 and 2 processes, and the speed-up from processes (MB/s with N / MB/s with 1).

The three are timed in turn in each of ``--repeats`` rounds; each figure is the median over
rounds, each ratio the median of the per-round ratios (robust to load from other processes).
Usage::

    python -m lmrun.tokenizer.bench_encode                       # GPT-2 files + real corpora
    python -m lmrun.tokenizer.bench_encode --text a.txt --text b.txt --json out.json

Defaults: the GPT-2 tokenizer and tinyshakespeare + WikiText-2 valid/test (about 3.5 MB) from
the developers' shared data folder (``$LMRUN_SHARED_DATA``, else ``../shared/data`` beside the
repository).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from lmrun.errors import LmrunError
from lmrun.tokenizer.tokenizer import Tokenizer
from lmrun.tracking.files import atomic_write_json

DEFAULT_TEXTS = ("corpora/tinyshakespeare.txt", "corpora/wikitext-2/valid.txt", "corpora/wikitext-2/test.txt")


def _shared_data() -> Path:
    env = os.environ.get("LMRUN_SHARED_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2].parent / "shared" / "data"


def run_benchmark(vocab_path: Path, merges_path: Path, texts: list[Path], special_tokens: list[str],
                  repeats: int = 3) -> dict:
    """Time both encoders on the concatenation of ``texts``; returns the result dict (MB/s,
    seconds, ratios, token count). Raises LmrunError if the two encoders disagree."""
    text = "".join(Path(p).read_text(encoding="utf-8") for p in texts)
    nbytes = len(text.encode("utf-8"))
    t0 = time.perf_counter()
    tok = Tokenizer.from_files(vocab_path, merges_path, special_tokens)
    load_s = time.perf_counter() - t0
    enc = tok.to_tiktoken()

    ref = enc.encode(text, allowed_special="all")
    ours = tok.encode(text)
    if ours != ref:
        first = next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), min(len(ours), len(ref)))
        raise LmrunError(f"lmrun and tiktoken disagree at token {first} of {len(ref)}")

    # interleaved, so that load from other processes hits both sides alike; ratios per round
    tt, cold, warm = [], [], []
    for _ in range(repeats):
        t = time.perf_counter()
        enc.encode(text, allowed_special="all")
        tt.append(time.perf_counter() - t)
        tok._cache.clear()
        t = time.perf_counter()
        tok.encode(text)
        cold.append(time.perf_counter() - t)
        t = time.perf_counter()
        tok.encode(text)
        warm.append(time.perf_counter() - t)
    tiktoken_s, cold_s, warm_s = (statistics.median(x) for x in (tt, cold, warm))
    mb = nbytes / 1e6
    return {
        "text": [str(p) for p in texts],
        "bytes": nbytes,
        "tokens": len(ref),
        "vocab": str(vocab_path),
        "vocab_size": tok.vocab_size,
        "repeats": repeats,
        "load_s": round(load_s, 4),
        "tiktoken_s": round(tiktoken_s, 4),
        "ours_cold_s": round(cold_s, 4),
        "ours_warm_s": round(warm_s, 4),
        "tiktoken_mb_s": round(mb / tiktoken_s, 3),
        "ours_cold_mb_s": round(mb / cold_s, 3),
        "ours_warm_mb_s": round(mb / warm_s, 3),
        "ratio_cold": round(statistics.median(a / b for a, b in zip(tt, cold)), 3),
        "ratio_warm": round(statistics.median(a / b for a, b in zip(tt, warm)), 3),
        "python": platform.python_version(),
        "machine": f"{platform.machine()} {os.cpu_count()} cpus",
    }


def run_bulk_benchmark(vocab_path: Path, merges_path: Path, texts: list[Path], special_tokens: list[str],
                       workers: tuple[int, ...] = (1, 2), chunk_bytes: int = 1 << 20) -> dict:
    """MB/s of ``encode_file`` per backend and process count on the concatenation of ``texts``
    (documents joined by the first special token); checks every run writes identical ids."""
    import tempfile

    from lmrun.tokenizer.bulk import encode_file

    tok = Tokenizer.from_files(vocab_path, merges_path, special_tokens)
    sep = special_tokens[0] if special_tokens else ""
    out: dict = {"chunk_bytes": chunk_bytes, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "corpus.txt"
        src.write_text(sep.join(Path(p).read_text(encoding="utf-8") for p in texts), encoding="utf-8")
        reference = None
        for backend in ("native", "tiktoken"):
            base = None
            for n in workers:
                dst = Path(tmp) / f"{backend}-{n}.bin"
                stats = encode_file(src, tok, dst, backend=backend, num_workers=n, chunk_bytes=chunk_bytes)
                data = dst.read_bytes()
                if reference is None:
                    reference = data
                elif data != reference:
                    raise LmrunError(f"bulk encoding with backend={backend}, {n} processes differs from the first run")
                base = base or stats["mb_per_s"]
                out["runs"].append({"backend": backend, "processes": n, "mb_per_s": stats["mb_per_s"],
                                    "speedup": round(stats["mb_per_s"] / base, 3), "tokens": stats["tokens"]})
        out["bytes"] = src.stat().st_size
    return out


def main(argv: list[str] | None = None) -> int:
    shared = _shared_data()
    ap = argparse.ArgumentParser(prog="python -m lmrun.tokenizer.bench_encode", description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab", type=Path, default=shared / "tokenizers/gpt2_vocab.json", help="GPT-2 format vocab.json")
    ap.add_argument("--merges", type=Path, default=shared / "tokenizers/gpt2_merges.txt", help="GPT-2 format merges.txt")
    ap.add_argument("--text", type=Path, action="append", help="UTF-8 text file (repeatable); default: real corpora")
    ap.add_argument("--special", action="append", default=None, help="special token (repeatable); default <|endoftext|>")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None, help="also write the result here")
    ap.add_argument("--bulk", action="store_true", help="also time stage=encode's parallel bulk path (1 and 2 processes)")
    args = ap.parse_args(argv)
    texts = args.text or [shared / p for p in DEFAULT_TEXTS]
    missing = [str(p) for p in [args.vocab, args.merges, *texts] if not Path(p).is_file()]
    if missing:
        print(f"error: file not found: {', '.join(missing)} (pass --vocab/--merges/--text or set LMRUN_SHARED_DATA)",
              file=sys.stderr)
        return 2
    try:
        r = run_benchmark(args.vocab, args.merges, texts, args.special or ["<|endoftext|>"], max(1, args.repeats))
    except LmrunError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"text: {r['bytes'] / 1e6:.2f} MB, {r['tokens']} tokens ({', '.join(Path(p).name for p in r['text'])})")
    print(f"vocab: {r['vocab_size']} ids; median of {r['repeats']} runs; one thread")
    print(f"tiktoken          {r['tiktoken_mb_s']:8.2f} MB/s")
    print(f"lmrun (cold cache) {r['ours_cold_mb_s']:7.2f} MB/s   ratio {r['ratio_cold']:.2f}")
    print(f"lmrun (warm cache) {r['ours_warm_mb_s']:7.2f} MB/s   ratio {r['ratio_warm']:.2f}")
    if args.bulk:
        r["bulk"] = run_bulk_benchmark(args.vocab, args.merges, texts, args.special or ["<|endoftext|>"])
        for b in r["bulk"]["runs"]:
            print(f"bulk {b['backend']:9s} {b['processes']} process(es) {b['mb_per_s']:7.2f} MB/s   x{b['speedup']:.2f}")
    if args.json:
        atomic_write_json(args.json, r)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
