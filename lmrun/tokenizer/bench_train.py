"""Benchmark: our BPE trainer (:func:`lmrun.tokenizer.bpe.train_bpe`) against HuggingFace
``tokenizers`` (``BpeTrainer`` with a byte-level pre-tokenizer) on the same real text, in
the same run.

Usage::

    python -m lmrun.tokenizer.bench_train --out results.json [--inputs FILE ...]
        [--vocab-sizes 8192 32000] [--repeats 3] [--num-workers N]

For every input and vocab size, each trainer runs ``--repeats`` times, alternating, each run
in a fresh subprocess (so that peak memory is clean); we report the best and the median wall
time (seconds, training only: imports and process start-up excluded), our two phases
(pre-token counting and the merge loop), and peak memory (MB): ``ru_maxrss`` of the process
plus the largest of its child processes, and the peak of the summed RSS of the whole process
tree sampled every 20 ms with psutil. The table ends with the ratio ours/HF of the best times.
As a sanity check it reports how many of our vocab entries HF's vocab also holds (they
differ a little by design: HF trains on the file line by line and treats ``<|endoftext|>`` in
the text as ordinary text, we split on it).

HF's trainer: ``Tokenizer(BPE())``, pre-tokenizer ``ByteLevel(add_prefix_space=False,
use_regex=True)``, ``BpeTrainer(vocab_size, special_tokens, initial_alphabet=
ByteLevel.alphabet(), show_progress=False)``, trained with ``Tokenizer.train([file])``.

The default corpus (no ``--inputs``) is about 14.7 MB of real English text, built once and
cached as ``$LMRUN_CACHE/bench/bpe_corpus_<digest>.txt`` (default ``~/.cache/lmrun``): the
documents below joined by ``<|endoftext|>`` (also the special token):

- the shared development corpora (``../shared/data/corpora`` next to the repository, or
  ``--data-dir``): ``tinyshakespeare.txt``, ``wikitext-2/valid.txt``, ``wikitext-2/test.txt``,
  ``corpus.en`` (about 3.6 MB; see that folder's README for sources and licences);
- the reStructuredText sources of the Python 3.11 documentation as Debian ships them
  (about 11 MB, PSF licence): ``sudo apt-get install python3.11-doc``, which installs
  ``/usr/share/doc/python3.11/html/_sources/**/*.txt`` (one document per file, sorted by path).

If fewer than 8 MB of these can be found the script stops and says what to install.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from lmrun.errors import DataError
from lmrun.tracking.files import atomic_write_bytes, atomic_write_json, config_digest

SPECIAL = "<|endoftext|>"
PYDOC_SOURCES = "/usr/share/doc/python3.11/html/_sources"
MIN_CORPUS_BYTES = 8_000_000
SHARED_FILES = ["tinyshakespeare.txt", "wikitext-2/valid.txt", "wikitext-2/test.txt", "corpus.en"]


def default_data_dir() -> Path:
    return Path(__file__).resolve().parents[3] / "shared" / "data" / "corpora"


def cache_dir() -> Path:
    return Path(os.environ.get("LMRUN_CACHE", Path.home() / ".cache" / "lmrun")) / "bench"


def corpus_sources(data_dir: Path) -> list[Path]:
    files = [data_dir / f for f in SHARED_FILES if (data_dir / f).is_file()]
    files += [Path(p) for p in sorted(glob.glob(f"{PYDOC_SOURCES}/**/*.txt", recursive=True))]
    return files


def build_corpus(data_dir: Path) -> Path:
    """Build (once) and return the default benchmark corpus. Raises DataError if the sources
    hold fewer than 8 MB."""
    files = corpus_sources(data_dir)
    ident = [(str(p), p.stat().st_size) for p in files]
    total = sum(s for _, s in ident)
    if total < MIN_CORPUS_BYTES:
        raise DataError(
            f"only {total / 1e6:.1f} MB of benchmark text found (need {MIN_CORPUS_BYTES / 1e6:.0f} MB): "
            f"install the Python docs with `sudo apt-get install python3.11-doc` (fills {PYDOC_SOURCES}) "
            f"and/or point --data-dir at the shared corpora, or pass --inputs FILE ..."
        )
    out = cache_dir() / f"bpe_corpus_{config_digest(ident, 12)}.txt"
    if not out.is_file():
        docs = []
        for p in files:
            try:
                docs.append(p.read_text(encoding="utf-8").strip("\n") + "\n")
            except UnicodeDecodeError:
                continue  # not text; skip
        atomic_write_bytes(out, SPECIAL.join(docs).encode("utf-8"))
    return out


# ---------------------------------------------------------------- measured runs (subprocess)


class _TreeRss:
    """Peak summed RSS (bytes) of this process and its children, sampled every 20 ms."""

    def __init__(self) -> None:
        import psutil

        self.proc = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            total = 0
            try:
                total = self.proc.memory_info().rss
                for c in self.proc.children(recursive=True):
                    try:
                        total += c.memory_info().rss
                    except psutil.Error:
                        pass
            except psutil.Error:
                pass
            self.peak = max(self.peak, total)
            self._stop.wait(0.02)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def _worker(args: argparse.Namespace) -> None:
    vocab_size, path = args.vocab_size, args.input
    result: dict = {}
    with _TreeRss() as tree:
        if args.worker == "ours":
            from lmrun.tokenizer.bpe import train_bpe_from_counts
            from lmrun.tokenizer.pretokenize import count_pretokens

            t0 = time.perf_counter()
            counts = count_pretokens(path, [SPECIAL], num_workers=args.num_workers)
            t1 = time.perf_counter()
            vocab, merges = train_bpe_from_counts(counts, vocab_size, [SPECIAL], backend=args.backend)
            t2 = time.perf_counter()
            result = {"wall_s": t2 - t0, "pretokenize_s": t1 - t0, "merge_s": t2 - t1,
                      "distinct_pretokens": len(counts), "merges": len(merges)}
            tokens = [vocab[i] for i in sorted(vocab)]
        else:
            from tokenizers import Tokenizer, models, pre_tokenizers, trainers

            from lmrun.tokenizer.formats import str_to_token

            t0 = time.perf_counter()
            tok = Tokenizer(models.BPE())
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
            trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[SPECIAL],
                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                          show_progress=False)
            tok.train([path], trainer)
            t2 = time.perf_counter()
            result = {"wall_s": t2 - t0}
            v = tok.get_vocab()
            tokens = [SPECIAL.encode() if s == SPECIAL else str_to_token(s) for s, _ in sorted(v.items(), key=lambda kv: kv[1])]
    ru_self = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB (Linux)
    ru_children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    result.update(vocab=len(tokens), rss_self_mb=ru_self, rss_children_mb=ru_children,
                  peak_rss_mb=ru_self + ru_children, peak_tree_rss_mb=tree.peak / 2**20)
    Path(args.tokens_out).write_text(json.dumps([t.hex() for t in tokens]))
    print(json.dumps(result))


_LAUNCHER = "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))"


def _run_one(kind: str, path: Path, vocab_size: int, args: argparse.Namespace, tmp: Path) -> dict:
    tokens_out = tmp / f"{kind}-{vocab_size}.json"
    # Through a small launcher process: on Linux a process's ru_maxrss starts at the RSS of the
    # process it was forked from, and this driver is larger than a fresh interpreter.
    cmd = [sys.executable, "-c", _LAUNCHER,
           sys.executable, "-m", "lmrun.tokenizer.bench_train", "--worker", kind, "--input", str(path),
           "--vocab-size", str(vocab_size), "--tokens-out", str(tokens_out), "--backend", args.backend]
    if args.num_workers is not None:
        cmd += ["--num-workers", str(args.num_workers)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} run failed (vocab {vocab_size}):\n{proc.stderr[-4000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["tokens"] = set(bytes.fromhex(h) for h in json.loads(tokens_out.read_text()))
    return res


def _summary(runs: list[dict]) -> dict:
    out = {"best_wall_s": min(r["wall_s"] for r in runs),
           "median_wall_s": statistics.median(r["wall_s"] for r in runs),
           "runs_wall_s": [round(r["wall_s"], 3) for r in runs]}
    best = min(runs, key=lambda r: r["wall_s"])
    for k, v in best.items():
        if k not in ("wall_s", "tokens"):
            out[k] = v
    out["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
    out["peak_tree_rss_mb"] = max(r["peak_tree_rss_mb"] for r in runs)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="write the results here (JSON)")
    ap.add_argument("--inputs", nargs="+", type=Path, help="text files to train on (default: the built corpus)")
    ap.add_argument("--vocab-sizes", nargs="+", type=int, default=[8192, 32000])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--num-workers", type=int, default=None, help="our pre-tokenization processes (default: all cores)")
    ap.add_argument("--backend", default="c", choices=["auto", "c", "python"])
    ap.add_argument("--data-dir", type=Path, default=None, help="the shared corpora folder")
    # internal: one measured run in a subprocess
    ap.add_argument("--worker", choices=["ours", "hf"], help=argparse.SUPPRESS)
    ap.add_argument("--input", help=argparse.SUPPRESS)
    ap.add_argument("--vocab-size", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--tokens-out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        _worker(args)
        return 0
    if args.out is None:
        ap.error("--out is required")

    try:
        inputs = args.inputs or [build_corpus(args.data_dir or default_data_dir())]
        for p in inputs:
            if not p.is_file():
                raise DataError(f"input file not found: {p}")
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    import tokenizers

    meta = {"cpus": os.cpu_count(), "python": sys.version.split()[0], "tokenizers": tokenizers.__version__,
            "backend": args.backend, "num_workers": args.num_workers or os.cpu_count(), "repeats": args.repeats,
            "load_avg_before": os.getloadavg()}
    results = []
    print(f"{'input':<28} {'vocab':>6} {'ours s':>7} {'(pretok':>8} {'merge)':>7} {'HF s':>7} "
          f"{'ours/HF':>7} {'ours MB':>8} {'HF MB':>7} {'overlap':>7}")
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        for path in inputs:
            for v in args.vocab_sizes:
                ours, hf = [], []
                for _ in range(args.repeats):
                    ours.append(_run_one("ours", path, v, args, tmp))
                    hf.append(_run_one("hf", path, v, args, tmp))
                overlap = len(ours[0]["tokens"] & hf[0]["tokens"]) / max(len(ours[0]["tokens"]), 1)
                o, h = _summary(ours), _summary(hf)
                row = {"input": str(path), "input_bytes": path.stat().st_size, "vocab_size": v, "ours": o, "hf": h,
                       "ratio_best": o["best_wall_s"] / h["best_wall_s"],
                       "ratio_median": o["median_wall_s"] / h["median_wall_s"], "vocab_overlap": overlap}
                results.append(row)
                print(f"{path.name[:28]:<28} {v:>6} {o['best_wall_s']:>7.2f} {o['pretokenize_s']:>8.2f} {o['merge_s']:>7.2f} "
                      f"{h['best_wall_s']:>7.2f} {row['ratio_best']:>7.2f} {o['peak_tree_rss_mb']:>8.0f} "
                      f"{h['peak_tree_rss_mb']:>7.0f} {overlap:>7.1%}", flush=True)
    meta["load_avg_after"] = os.getloadavg()
    atomic_write_json(args.out, {"meta": meta, "results": results})
    print(f"(best of {args.repeats}; MB = peak summed RSS of the process tree; wrote {args.out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
