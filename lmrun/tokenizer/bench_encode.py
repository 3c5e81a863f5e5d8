"""Encoding throughput: lmrun's ``Tokenizer.encode`` against tiktoken and HF ``tokenizers``, one thread.

All encode the same text with the same vocabulary and merges (tiktoken's encoding is built by
``Tokenizer.to_tiktoken``, HF's from the ``tokenizer.json`` of ``Tokenizer.to_hf``, so the
comparison holds the algorithm's inputs fixed), and all ids are checked to be equal in the same
run. Reported in MB/s of UTF-8 input (1 MB = 10^6 bytes):

- ``tiktoken``: ``Encoding.encode(text, allowed_special="all")``, single call, one thread;
- ``hf``: ``tokenizers.Tokenizer.encode(text)`` (``TOKENIZERS_PARALLELISM=false``);
- ``ours_cold``: ``Tokenizer.encode`` (the C core when built) with an empty pre-token cache (what
  one pass over new text costs); ``ours_warm``: the same text again, cache filled;
- ``python_cold`` / ``python_warm``: the pure-Python encoder (the fallback without a compiler);
- ``ratio_*``: ours / tiktoken, the median of the per-round ratios.

With ``--bulk``, also the bulk path of ``lmrun stage=encode`` (:func:`lmrun.tokenizer.bulk.encode_file`:
the file cut at document boundaries, chunks encoded by workers — threads for the native C core,
processes for tiktoken) for both backends with 1 and 2 workers, each run in a fresh process with
``stage=encode``'s chunk size: MB/s, the speed-up from workers (MB/s with N / MB/s with 1, median
of per-round ratios), the ratio to the tiktoken backend with 1 worker, and the CPU seconds of
the encoding process (its threads) and of its worker processes.

With ``--profile``, where the time of one encode goes: for the C core, the pre-tokenizer scan
alone, + cache lookups (ids into a buffer, warm), + the list of Python ints (warm), + BPE of
cache misses (cold); for pure Python, the regex pre-tokenization and the rest.

All encoders are timed in turn in each of ``--repeats`` rounds; each figure is the median over
rounds, each ratio the median of the per-round ratios (robust to load from other processes).
Usage::

    python -m lmrun.tokenizer.bench_encode                       # GPT-2 files + real corpora
    python -m lmrun.tokenizer.bench_encode --bpe-corpus --bulk   # the 14.7 MB BPE benchmark corpus
    python -m lmrun.tokenizer.bench_encode --text a.txt --text b.txt --json out.json

Defaults: the GPT-2 tokenizer and tinyshakespeare + WikiText-2 valid/test (about 3.5 MB) from
the developers' shared data folder (``$LMRUN_SHARED_DATA``, else ``../shared/data`` beside the
repository); ``--bpe-corpus``: the corpus of ``lmrun.tokenizer.bench_train`` (needs Debian's
``python3.11-doc``).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
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


def _clear(tok: Tokenizer) -> None:
    tok._cache.clear()
    if tok._native is not None:
        tok._native.clear_cache()


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _first_diff(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _hf_encoder(tok: Tokenizer, tmp: Path):
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import tokenizers
    except ImportError:
        return None
    path = tmp / "tokenizer.json"
    tok.to_hf(path)
    return tokenizers.Tokenizer.from_file(str(path))


def run_benchmark(vocab_path: Path, merges_path: Path, texts: list[Path], special_tokens: list[str],
                  repeats: int = 3, *, python: bool = True, hf: bool = True) -> dict:
    """Time the encoders on the concatenation of ``texts``; returns the result dict (MB/s,
    seconds, ratios, token count). Raises LmrunError if any two encoders disagree."""
    text = "".join(Path(p).read_text(encoding="utf-8") for p in texts)
    nbytes = len(text.encode("utf-8"))
    t0 = time.perf_counter()
    tok = Tokenizer.from_files(vocab_path, merges_path, special_tokens)
    load_s = time.perf_counter() - t0
    native = tok._native is not None
    py = Tokenizer(tok.vocab, tok.merges, special_tokens)
    py._native = None  # the pure-Python encoder
    enc = tok.to_tiktoken()
    with tempfile.TemporaryDirectory() as tmp:
        hf_tok = _hf_encoder(tok, Path(tmp)) if hf else None

    ref = enc.encode(text, allowed_special="all")
    checks = {"lmrun": tok.encode(text)}
    if python and native:
        checks["lmrun pure Python"] = py.encode(text)
    if hf_tok is not None:
        checks["HF tokenizers"] = hf_tok.encode(text).ids
    for name, ids in checks.items():
        if ids != ref:
            raise LmrunError(f"{name} and tiktoken disagree at token {_first_diff(ids, ref)} of {len(ref)}")
    del checks

    # interleaved, so that load from other processes hits all alike; ratios per round
    times: dict[str, list[float]] = {k: [] for k in ("tiktoken", "ours_cold", "ours_warm", "hf", "python_cold",
                                                       "python_warm")}
    for _ in range(repeats):
        times["tiktoken"].append(_timed(lambda: enc.encode(text, allowed_special="all")))
        _clear(tok)
        times["ours_cold"].append(_timed(lambda: tok.encode(text)))
        times["ours_warm"].append(_timed(lambda: tok.encode(text)))
        if hf_tok is not None:
            times["hf"].append(_timed(lambda: hf_tok.encode(text)))
        if python and native:
            _clear(py)
            times["python_cold"].append(_timed(lambda: py.encode(text)))
            times["python_warm"].append(_timed(lambda: py.encode(text)))
    mb = nbytes / 1e6
    tt = times["tiktoken"]
    r = {
        "text": [str(p) for p in texts],
        "bytes": nbytes,
        "tokens": len(ref),
        "vocab": str(vocab_path),
        "vocab_size": tok.vocab_size,
        "repeats": repeats,
        "native": native,
        "ids_identical": sorted(["tiktoken", *(["HF tokenizers"] if hf_tok is not None else []), "lmrun",
                                 *(["lmrun pure Python"] if python and native else [])]),
        "load_s": round(load_s, 4),
    }
    for k, v in times.items():
        if v:
            r[f"{k}_s"] = round(statistics.median(v), 4)
            r[f"{k}_mb_s"] = round(mb / statistics.median(v), 3)
            if k != "tiktoken":
                r[f"ratio_{k.removeprefix('ours_')}"] = round(statistics.median(a / b for a, b in zip(tt, v)), 3)
    r["python"] = platform.python_version()
    r["machine"] = f"{platform.machine()} {os.cpu_count()} cpus"
    return r


def profile(vocab_path: Path, merges_path: Path, texts: list[Path], special_tokens: list[str],
            repeats: int = 3) -> dict:
    """Seconds per part of one encode of the concatenated ``texts`` (fastest of ``repeats``).

    C core: ``scan`` (the pre-tokenizer alone), ``lookup`` (+ pre-token cache lookups and the
    special-token split: ids into a buffer, warm cache), ``pyints`` (+ the list of Python ints,
    warm), ``bpe`` (+ BPE of the cache misses: cold - warm). Pure Python: ``regex`` (GPT-2 regex
    pre-tokenization) and ``rest`` (cache lookups, BPE of misses, list building; cold)."""
    import numpy as np

    from lmrun.tokenizer import native
    from lmrun.tokenizer.pretokenize import pretokenize

    text = "".join(Path(p).read_text(encoding="utf-8") for p in texts)
    tok = Tokenizer.from_files(vocab_path, merges_path, special_tokens)
    py = Tokenizer(tok.vocab, tok.merges, special_tokens)
    py._native = None
    pieces = tok._special_re.split(text) if tok._special_re is not None else [text]
    t: dict[str, list[float]] = {k: [] for k in ("scan", "buffer_warm", "list_warm", "list_cold", "py_regex",
                                                  "py_cold")}
    for _ in range(repeats):
        if tok._native is not None:
            from lmrun.tokenizer import _encode

            t["scan"].append(_timed(lambda: [_encode.scan(p) for p in pieces]))
            _clear(tok)
            t["list_cold"].append(_timed(lambda: tok.encode(text)))
            t["buffer_warm"].append(_timed(lambda: native.encode_to_numpy(tok, tok._native, text, np.uint32)))
            t["list_warm"].append(_timed(lambda: tok.encode(text)))
        t["py_regex"].append(_timed(lambda: [pretokenize(p) for p in pieces]))
        _clear(py)
        t["py_cold"].append(_timed(lambda: py.encode(text)))
    m = {k: min(v) for k, v in t.items() if v}  # the least disturbed by other processes
    out = {"bytes": len(text.encode("utf-8")), "python": {"regex": m["py_regex"], "rest": m["py_cold"] - m["py_regex"],
                                                           "total": m["py_cold"]}}
    if "scan" in m:
        out["native"] = {"scan": m["scan"], "lookup": m["buffer_warm"] - m["scan"],
                         "pyints": m["list_warm"] - m["buffer_warm"], "bpe": m["list_cold"] - m["list_warm"],
                         "total": m["list_cold"]}
    return {k: ({kk: round(vv, 4) for kk, vv in v.items()} if isinstance(v, dict) else v) for k, v in out.items()}


_BULK_RUN = """
import json, resource, sys
from lmrun.tokenizer.bulk import encode_file
from lmrun.tokenizer.tokenizer import Tokenizer
a = json.loads(sys.argv[1])
tok = Tokenizer.from_files(a["vocab"], a["merges"], a["specials"])
def cpu():
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime
c0 = cpu()
stats = encode_file(a["src"], tok, a["dst"], backend=a["backend"], num_workers=a["n"], chunk_bytes=a["chunk_bytes"])
c1 = cpu()
print(json.dumps({**stats, "cpu_parent_s": c1[0] - c0[0], "cpu_workers_s": c1[1] - c0[1]}))
"""


def _bulk_run(**kwargs) -> dict:
    """One ``encode_file`` in a fresh process (as ``lmrun stage=encode`` runs it: cold caches,
    a parent of the CLI's size); returns its stats with the CPU seconds of parent and workers."""
    import json
    import subprocess

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", _BULK_RUN, json.dumps(kwargs)], capture_output=True, text=True,
                          env=env)
    if proc.returncode != 0:
        raise LmrunError(f"bulk encoding run failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_bulk_benchmark(vocab_path: Path, merges_path: Path, texts: list[Path], special_tokens: list[str],
                       workers: tuple[int, ...] = (1, 2), chunk_bytes: int | None = None, repeats: int = 3,
                       copies: int = 1) -> dict:
    """MB/s of ``encode_file`` (stage=encode's chunk size unless ``chunk_bytes``) per backend and
    worker count on ``copies`` copies of the concatenation of ``texts`` (documents joined by the
    first special token); each run in a fresh process, alternating in each of ``repeats`` rounds;
    checks every run writes identical ids. Per configuration (medians):

    - ``speedup``: MB/s with N processes / with 1 (per-round ratios, wall clock);
    - ``vs_tiktoken_1``: MB/s / the tiktoken backend's with 1 process (per round);
    - ``cpu_parent_s`` / ``cpu_workers_s``: CPU seconds of the encoding process (with its
      threads) and of its worker processes;
    - ``cpu_speedup``: the wall-clock speed-up on N otherwise idle cores that the CPU seconds
      allow if all of it ran in parallel: CPU with 1 worker / (CPU with N / N).
      On a loaded machine the wall-clock ``speedup`` also measures the other processes' load.
    """
    import hashlib

    sep = special_tokens[0] if special_tokens else ""
    out: dict = {"chunk_bytes": chunk_bytes, "repeats": repeats, "runs": []}
    configs = [(b, n) for b in ("native", "tiktoken") for n in workers]
    runs: dict[tuple[str, int], list[dict]] = {c: [] for c in configs}
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "corpus.txt"
        src.write_text(sep.join(Path(p).read_text(encoding="utf-8") for p in texts * max(1, copies)), encoding="utf-8")
        reference = None
        for _ in range(repeats):
            for backend, n in configs:
                dst = Path(tmp) / f"{backend}-{n}.bin"
                stats = _bulk_run(vocab=str(vocab_path), merges=str(merges_path), specials=list(special_tokens),
                                  src=str(src), dst=str(dst), backend=backend, n=n, chunk_bytes=chunk_bytes)
                with open(dst, "rb") as f:
                    digest = hashlib.file_digest(f, "sha256").hexdigest()
                dst.unlink()
                if reference is None:
                    reference = digest
                elif digest != reference:
                    raise LmrunError(f"bulk encoding with backend={backend}, {n} workers differs from the first run")
                stats["mb_s"] = stats["bytes"] / 1e6 / max(stats["seconds"], 1e-9)
                runs[(backend, n)].append(stats)
        out["bytes"] = src.stat().st_size
    tt1 = [r["mb_s"] for r in runs[("tiktoken", workers[0])]]
    for backend, n in configs:
        rs, base = runs[(backend, n)], runs[(backend, workers[0])]
        v = [r["mb_s"] for r in rs]
        parent = statistics.median(r["cpu_parent_s"] for r in rs)
        kids = statistics.median(r["cpu_workers_s"] for r in rs)
        one = statistics.median(r["cpu_parent_s"] + r["cpu_workers_s"] for r in base)
        total = statistics.median(r["cpu_parent_s"] + r["cpu_workers_s"] for r in rs)
        out["runs"].append({"backend": backend, "processes": n, "mb_per_s": round(statistics.median(v), 3),
                            "speedup": round(statistics.median(a / b["mb_s"] for a, b in zip(v, base)), 3),
                            "speedup_rounds": [round(a / b["mb_s"], 3) for a, b in zip(v, base)],
                            "vs_tiktoken_1": round(statistics.median(a / b for a, b in zip(v, tt1)), 3),
                            "cpu_parent_s": round(parent, 3), "cpu_workers_s": round(kids, 3),
                            "cpu_speedup": round(one / max(total / n, 1e-9), 3)})
    return out


def main(argv: list[str] | None = None) -> int:
    shared = _shared_data()
    ap = argparse.ArgumentParser(prog="python -m lmrun.tokenizer.bench_encode", description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab", type=Path, default=shared / "tokenizers/gpt2_vocab.json", help="GPT-2 format vocab.json")
    ap.add_argument("--merges", type=Path, default=shared / "tokenizers/gpt2_merges.txt", help="GPT-2 format merges.txt")
    ap.add_argument("--text", type=Path, action="append", help="UTF-8 text file (repeatable); default: real corpora")
    ap.add_argument("--bpe-corpus", action="store_true", help="the BPE training benchmark's corpus (bench_train)")
    ap.add_argument("--special", action="append", default=None, help="special token (repeatable); default <|endoftext|>")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-python", action="store_true", help="skip the pure-Python encoder")
    ap.add_argument("--no-hf", action="store_true", help="skip HF tokenizers")
    ap.add_argument("--json", type=Path, default=None, help="also write the result here")
    ap.add_argument("--bulk", action="store_true", help="also time stage=encode's parallel bulk path (1 and 2 processes)")
    ap.add_argument("--bulk-copies", type=int, default=1, help="--bulk encodes this many copies of the text (default 1)")
    ap.add_argument("--profile", action="store_true", help="also print where the time of one encode goes")
    args = ap.parse_args(argv)
    texts = args.text or [shared / p for p in DEFAULT_TEXTS]
    if args.bpe_corpus:
        from lmrun.tokenizer.bench_train import build_corpus, default_data_dir

        try:
            texts = [build_corpus(default_data_dir())]
        except LmrunError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    missing = [str(p) for p in [args.vocab, args.merges, *texts] if not Path(p).is_file()]
    if missing:
        print(f"error: file not found: {', '.join(missing)} (pass --vocab/--merges/--text or set LMRUN_SHARED_DATA)",
              file=sys.stderr)
        return 2
    specials = args.special or ["<|endoftext|>"]
    repeats = max(1, args.repeats)
    try:
        r = run_benchmark(args.vocab, args.merges, texts, specials, repeats, python=not args.no_python,
                          hf=not args.no_hf)
    except LmrunError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"text: {r['bytes'] / 1e6:.2f} MB, {r['tokens']} tokens ({', '.join(Path(p).name for p in r['text'])})")
    print(f"vocab: {r['vocab_size']} ids; {r['repeats']} alternating rounds, medians; one thread; "
          f"ids identical: {', '.join(r['ids_identical'])}")
    core = "C core" if r["native"] else "pure Python: C extension not built"
    print(f"tiktoken                  {r['tiktoken_mb_s']:8.2f} MB/s")
    if "hf_mb_s" in r:
        print(f"HF tokenizers             {r['hf_mb_s']:8.2f} MB/s   ratio {r['ratio_hf']:.2f}")
    print(f"lmrun ({core}), cold cache {r['ours_cold_mb_s']:8.2f} MB/s   ratio {r['ratio_cold']:.2f}")
    print(f"lmrun ({core}), warm cache {r['ours_warm_mb_s']:8.2f} MB/s   ratio {r['ratio_warm']:.2f}")
    if "python_cold_mb_s" in r:
        print(f"lmrun pure Python, cold cache {r['python_cold_mb_s']:6.2f} MB/s   ratio {r['ratio_python_cold']:.2f}")
        print(f"lmrun pure Python, warm cache {r['python_warm_mb_s']:6.2f} MB/s   ratio {r['ratio_python_warm']:.2f}")
    if args.profile:
        r["profile"] = p = profile(args.vocab, args.merges, texts, specials, repeats)
        if "native" in p:
            n = p["native"]
            print("profile, C core (s): " + ", ".join(f"{k} {v:.3f}" for k, v in n.items()))
        print("profile, pure Python (s): " + ", ".join(f"{k} {v:.3f}" for k, v in p["python"].items()))
    if args.bulk:
        r["bulk"] = run_bulk_benchmark(args.vocab, args.merges, texts, specials, repeats=repeats,
                                       copies=args.bulk_copies)
        print(f"bulk (stage=encode's path), {r['bulk']['bytes'] / 1e6:.1f} MB file:")
        for b in r["bulk"]["runs"]:
            kind = "thread(s)  " if b["backend"] == "native" and r["native"] else "process(es)"
            print(f"  {b['backend']:9s} {b['processes']} {kind} {b['mb_per_s']:7.2f} MB/s   "
                  f"x{b['speedup']:.2f} vs 1 (CPU-time bound x{b['cpu_speedup']:.2f}), "
                  f"x{b['vs_tiktoken_1']:.2f} vs tiktoken with 1; CPU s: process {b['cpu_parent_s']:.2f}, "
                  f"worker processes {b['cpu_workers_s']:.2f}")
    if args.json:
        atomic_write_json(args.json, r)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
