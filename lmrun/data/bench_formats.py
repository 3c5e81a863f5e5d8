"""Throughput and peak memory of the streaming data path (``lmrun stage=encode`` on JSONL, Parquet
and a mixture), as in the README's "Data formats" table.

The input is built by concatenating real corpora (default: ``../shared/data/corpora``: WikiText-2
valid + test, tinyshakespeare, the TinyStories sample, corpus.en, split into documents) repeatedly
into one JSONL file of at least ``--size`` bytes in ``--workdir``, converted to Parquet (snappy,
one row group per 20,000 documents), plus a tenth-size copy of each for the memory comparison;
everything is deleted afterwards unless ``--keep``. Each case runs ``lmrun stage=encode`` in a
fresh process with a fresh cache, first as a dry run (the plan's scan alone), then for real under
``/usr/bin/time -v`` (peak RSS of the largest process). Reported: wall seconds and MB/s (input
bytes, for Parquet its text bytes, over wall seconds) of the whole command and of its phases (the
corpus and token artifacts' build seconds), and the peak RSS of the main process and the largest
worker (``meta.json``). The machine's load average is printed: wall times on a shared machine are
pessimistic.

Usage::

    python -m lmrun.data.bench_formats --size 1.05e9 --tokenizer ../shared/data/tokenizers
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data" / "corpora"


def shared_documents(root: Path) -> list[str]:
    """The documents of the shared corpora: WikiText-2 articles, Shakespeare speeches, TinyStories
    stories, corpus.en paragraphs."""
    docs: list[str] = []
    for name, sep in (("wikitext-2/valid.txt", "\n = "), ("wikitext-2/test.txt", "\n = "),
                      ("tinyshakespeare.txt", "\n\n"), ("tinystories_sample.txt", "<|endoftext|>"),
                      ("corpus.en", "\n\n")):
        docs += [d for d in (root / name).read_text(encoding="utf-8").split(sep) if d.strip()]
    return docs


def build_inputs(docs: list[str], target: int, jsonl: Path, parquet: Path) -> dict:
    """Write the documents repeatedly as JSONL (``{"text", "source"}``) until ``target`` bytes,
    then the same documents as Parquet. Returns sizes and counts."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    lines = [json.dumps({"text": d, "source": "shared"}) + "\n" for d in docs]
    written = repeats = 0
    with open(jsonl, "w", encoding="utf-8") as f:
        while written < target:
            for line in lines:
                f.write(line)
                written += len(line.encode("utf-8"))
            repeats += 1
    schema = pa.schema([("text", pa.string())])
    with pq.ParquetWriter(parquet, schema) as w:
        for r in range(repeats):
            for i in range(0, len(docs), 20_000):
                w.write_table(pa.table({"text": docs[i:i + 20_000]}, schema=schema))
    return {"jsonl_bytes": jsonl.stat().st_size, "parquet_bytes": parquet.stat().st_size, "repeats": repeats,
            "documents": repeats * len(docs), "text_bytes": repeats * sum(len(d.encode("utf-8")) for d in docs)}


def run_case(name: str, overrides: list[str], workdir: Path, tokenizer: str) -> dict:
    """``lmrun stage=encode`` dry run, then a timed real run, each in a fresh process and cache."""
    cache = workdir / f"cache_{name}"
    shutil.rmtree(cache, ignore_errors=True)
    common = [f"tokenizer.path={tokenizer}", f"paths.cache_dir={cache}", "logger=none", "progress=false",
              f"paths.runs_dir={workdir / 'runs'}"]
    argv = ["lmrun", "stage=encode", *overrides, *common]
    t0 = time.perf_counter()
    subprocess.run(argv + ["dry_run=true"], check=True, capture_output=True)
    plan = time.perf_counter() - t0
    t0 = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-v", *argv], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode:
        raise SystemExit(f"{name}: lmrun failed: {done.stderr.strip().splitlines()[-1:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1)) / 1024
    builds = {json.loads(Path(p).read_text())["kind"]: json.loads(Path(p).read_text())["build_seconds"]
              for p in glob.glob(str(cache / "*" / "*" / "artifact.json"))}
    meta = json.loads(Path(glob.glob(str(cache / "tokens" / "*" / "meta.json"))[0]).read_text())
    out = {"case": name, "wall_s": round(wall, 2), "plan_s": round(plan, 2), "corpus_s": builds.get("corpus"),
           "tokens_s": builds.get("tokens"), "peak_rss_main_mb": meta["peak_rss_mb"],
           "peak_rss_worker_mb": meta["peak_rss_children_mb"], "time_max_rss_mb": round(rss, 1),
           "tokens": {k: v["tokens"] for k, v in meta["splits"].items()},
           "load_average": os.getloadavg()}
    if "mixture" in meta:
        out["shares"] = {s["name"]: s["train"]["share"] for s in meta["mixture"]["sources"]}
    shutil.rmtree(cache, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=float, default=1.05e9, help="bytes of the large JSONL input (default 1.05e9)")
    ap.add_argument("--tokenizer", default=str(SHARED.parent / "tokenizers"), help="tokenizer.path (GPT-2 files)")
    ap.add_argument("--corpora", default=str(SHARED), help="folder of the shared corpora")
    ap.add_argument("--workdir", default="/tmp/lmrun-bench-formats")
    ap.add_argument("--keep", action="store_true", help="keep the built inputs")
    args = ap.parse_args(argv)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    docs = shared_documents(Path(args.corpora))
    files = {}
    try:
        for label, size in (("large", int(args.size)), ("small", int(args.size / 10))):
            files[label] = (work / f"{label}.jsonl", work / f"{label}.parquet")
            facts = build_inputs(docs, size, *files[label])
            print(f"{label}: {json.dumps(facts)}", flush=True)
        cases = [("jsonl_large", ["data=jsonl", f"data.train={files['large'][0]}"]),
                 ("jsonl_small", ["data=jsonl", f"data.train={files['small'][0]}"]),
                 ("parquet_large", ["data=parquet", f"data.train={files['large'][1]}"]),
                 ("parquet_small", ["data=parquet", f"data.train={files['small'][1]}"]),
                 ("mixture", ["data=mixture", f"+data.mixture.web={{train: {files['large'][0]}, weight: 0.7}}",
                              f"+data.mixture.code={{train: {files['small'][1]}, format: parquet, weight: 0.3}}"])]
        for name, overrides in cases:
            print(json.dumps(run_case(name, overrides, work, args.tokenizer)), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
