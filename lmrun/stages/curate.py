"""Stage ``curate``: web archives / HTML / text -> clean text shards, with a report.

Phase 1 (per shard, in parallel processes or as one job of a Slurm array): read the shard's
input files, extract text, identify the language, mask PII, drop harmful and low-quality
documents (``curate.steps``). Phase 2 (once, over every shard): exact-line and MinHash
deduplication, then ``clean/shard_<i>.{txt,jsonl}`` and ``clean.txt`` (documents separated by
``<|endoftext|>``; ``data=text_files data.train=<output_dir>`` reads it). Completed shards are
skipped on rerun. See lmrun/curation/pipeline.py for the layout.

Locally: ``lmrun stage=curate curate.inputs=[crawl.warc.gz] curate.num_shards=4``. As a Slurm
array (one job per shard, then the dedup job), with a directory all jobs share::

    lmrun -m stage=curate hydra/launcher=slurm curate.output_dir=/scratch/cur curate.num_shards=4 \\
          curate.phase=filter curate.shard_index=0,1,2,3 curate.inputs=[...]
    lmrun stage=curate hydra/launcher=slurm curate.output_dir=/scratch/cur curate.num_shards=4 \\
          curate.phase=dedup curate.inputs=[...]
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from omegaconf import OmegaConf

from lmrun.errors import DataError

log = logging.getLogger(__name__)


def _curate_dict(cfg) -> dict:
    cc = OmegaConf.to_container(cfg.curate, resolve=True)
    cc["seed"] = int(cfg.seed)
    return cc


def _output_dir(cfg, run_dir: Path | None) -> Path | None:
    if cfg.curate.output_dir:
        return Path(str(cfg.curate.output_dir)).expanduser().absolute()
    return run_dir


def _shards(cfg):
    from lmrun.curation.readers import list_input_files, shard_files

    files = list_input_files(list(cfg.curate.inputs), cfg.curate.format)
    return files, shard_files(files, int(cfg.curate.num_shards))


def _quality_model_path(cfg) -> str | None:
    q = cfg.curate.quality
    if q.model_path and not q.train:
        path = Path(str(q.model_path)).expanduser().absolute()
        if not path.is_file():
            raise DataError(f"curate.quality.model_path: file not found: {path}")
        return str(path)
    return None


def plan(cfg) -> dict:
    c = cfg.curate
    out = _output_dir(cfg, None)
    plan = {"stage": "curate", "steps": [s for s in c.steps], "phase": c.phase,
            "damaged_inputs": "fail the run (curate.strict=true)" if c.strict else "warn and count in report.json"}
    if c.phase != "dedup":
        files, shards = _shards(cfg)
        todo = [c.shard_index] if c.shard_index is not None else list(range(c.num_shards))
        plan["inputs"] = {"files": len(files), "bytes": sum(p.stat().st_size for p, _ in files),
                          "formats": sorted({f for _, f in files})}
        plan["shards"] = [{"shard": i, "files": len(shards[i]), "bytes": sum(p.stat().st_size for p, _ in shards[i]),
                           "done": bool(out and (out / "shards" / f"{i:05d}" / "shard.json").is_file())}
                          for i in todo]
    if c.quality.train:
        from lmrun.curation.readers import list_input_files

        plan["quality_training"] = {"positives": len(list_input_files(list(c.quality.positives), "auto",
                                                                      "curate.quality.positives")),
                                    "negatives": len(list_input_files(list(c.quality.negatives), "auto",
                                                                      "curate.quality.negatives"))}
    elif "quality" in c.steps:
        plan["quality_model"] = _quality_model_path(cfg)
    if c.phase == "dedup":
        shard_dir = out / "shards"
        done = [i for i in range(c.num_shards) if (shard_dir / f"{i:05d}" / "shard.json").is_file()]
        plan["shards_done"] = f"{len(done)} of {c.num_shards} in {shard_dir}"
    plan["outputs"] = {"dir": str(out) if out else "the run directory",
                       "files": ["shards/<i>/docs.jsonl", "clean/shard_<i>.txt", "clean/shard_<i>.jsonl", "clean.txt",
                                 "report.json", "report.md", "report.png", "samples/<step>.jsonl"]}
    return plan


def train_quality(cfg, out_dir: Path) -> tuple[str, dict]:
    """Train the quality classifier from ``curate.quality.positives/negatives``; save it to
    ``out_dir/quality_model.npz``; returns (path, statistics)."""
    from lmrun.curation.extract import extract_text_from_html_bytes
    from lmrun.curation.quality import train_quality_classifier, training_chunks
    from lmrun.curation.readers import list_input_files, read_documents

    q = cfg.curate.quality

    def texts(key, inputs):
        for path, fmt in list_input_files(list(inputs), "auto", key):
            for doc in read_documents(path, fmt):
                if "html" in doc:
                    t = extract_text_from_html_bytes(doc["html"], main_content=bool(cfg.curate.extract_main_content))
                    if t:
                        yield t
                else:
                    yield doc["text"]

    t0 = time.perf_counter()
    pos = list(training_chunks(texts("curate.quality.positives", q.positives), max_chars=q.max_doc_chars))
    neg = list(training_chunks(texts("curate.quality.negatives", q.negatives), max_chars=q.max_doc_chars))
    model, stats = train_quality_classifier(pos, neg, num_buckets=int(q.num_buckets), ngrams=int(q.ngrams),
                                            epochs=int(q.epochs), lr=float(q.lr),
                                            heldout_fraction=float(q.heldout_fraction), seed=int(cfg.seed))
    path = out_dir / "quality_model.npz"
    model.save(path)
    stats.update(seconds=round(time.perf_counter() - t0, 2), available_wiki=len(pos), available_cc=len(neg),
                 path=str(path))
    log.info("quality classifier: held-out accuracy %.3f on %d examples (wiki %.3f, cc %.3f); %s",
             stats["heldout_accuracy"], stats["heldout_examples"], stats["heldout_accuracy_wiki"],
             stats["heldout_accuracy_cc"], path)
    return str(path), stats


def _filter_shards(cfg, args: list[tuple], workers: int) -> list[dict]:
    """Phase 1 over ``args`` (``run_shard`` arguments) with ``workers`` processes, sorted by shard.
    Progress (this process only; workers send counts): a log line at most every 10 s with input
    files done / total, elapsed, ETA, documents read and kept, shards done."""
    from collections import Counter

    from lmrun.curation.pipeline import run_shards
    from lmrun.tracking.progress import Progress

    n_files = {a[3]: len(a[1]) for a in args}
    docs, kept, files_seen = Counter(), Counter(), Counter()
    finished: set[int] = set()
    prog = Progress(sum(n_files.values()) or None, "curate: filter", unit="file", bar=bool(cfg.progress),
                    log_start=True)

    def fields() -> dict:
        return {"docs": sum(docs.values()), "kept": sum(kept.values()), "shards": f"{len(finished)}/{len(args)}"}

    def on_report(item) -> None:
        shard, d, k, f = item
        if shard in finished:  # a late report of a shard whose manifest is already counted
            return
        docs[shard] += d
        kept[shard] += k
        files_seen[shard] += f
        prog.update(f, **fields())

    def on_done(m: dict) -> None:
        i = m["shard"]
        finished.add(i)
        docs[i] = m["read"]["docs"]
        kept[i] = m["steps"][-1]["docs_out"] if m["steps"] else m["read"]["docs"]
        rest = n_files[i] - files_seen[i]
        files_seen[i] = n_files[i]
        prog.update(rest, **fields())
        log.info("shard %d: %s", i, "skipped (complete)" if m["skipped"] else
                 f"{m['read']['docs']} docs read, {kept[i]} kept in {m['seconds']:.1f} s")
        for e in m.get("read_errors", []):  # workers have no log handlers: the parent warns
            log.warning("%s: %s (counted in report.json read_errors; curate.strict=true makes it an error)",
                        e["path"], e["error"])

    try:
        manifests = run_shards(args, workers, on_report=on_report, on_done=on_done, on_tick=lambda: prog.update(0))
    except BaseException:
        prog.close(log_final=False)
        raise
    prog.close()
    return sorted(manifests, key=lambda m: m["shard"])


def _check_strict(cfg, manifests: list[dict]) -> None:
    """With ``curate.strict=true``, DataError (one line: the first file, its byte offset, the
    count) when a shard recorded an input file cut off or corrupt — also a shard completed by an
    earlier, non-strict run."""
    errors = [e for m in manifests for e in m.get("read_errors", [])]
    if cfg.curate.strict and errors:
        e = errors[0]
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise DataError(f"{e['path']}: {e['error']}{more} (curate.strict=true)")


def run(cfg) -> dict:
    from lmrun.curation.pipeline import SHARD_MANIFEST, build_report, dedup_shards, report_markdown, write_report
    from lmrun.tracking.files import atomic_write_json
    from lmrun.tracking.run import active_run

    run = active_run()
    c = cfg.curate
    out = _output_dir(cfg, run.dir)
    out.mkdir(parents=True, exist_ok=True)
    cc = _curate_dict(cfg)
    summary: dict = {}
    t_start = time.perf_counter()
    if c.quality.train:
        cc["quality"]["resolved_model_path"], qstats = train_quality(cfg, out)
        atomic_write_json(run.dir / "quality_training.json", qstats)
        summary.update({f"quality_{k}": v for k, v in qstats.items() if k != "path"})
    else:
        cc["quality"]["resolved_model_path"] = _quality_model_path(cfg) if "quality" in c.steps else None

    shard_root = out / "shards"
    manifests: list[dict] = []
    if c.phase in ("all", "filter"):
        files, shards = _shards(cfg)
        todo = [int(c.shard_index)] if c.shard_index is not None else list(range(int(c.num_shards)))
        args = [(cc, [(str(p), f) for p, f in shards[i]], str(shard_root / f"{i:05d}"), i) for i in todo]
        busy = sum(1 for a in args if a[1]) or 1  # shards with input files
        workers = min(int(c.num_workers or os.cpu_count() or 1), len(args), busy)
        log.info("curate: %d file(s) in %d shard(s); running %d shard(s) with %d process(es)", len(files),
                 c.num_shards, len(args), workers)
        t0 = time.perf_counter()
        manifests = _filter_shards(cfg, args, workers)
        manifests.sort(key=lambda m: m["shard"])
        summary["filter_seconds"] = round(time.perf_counter() - t0, 3)
        summary["shards_skipped"] = sum(bool(m["skipped"]) for m in manifests)

    dedup = None
    if c.phase in ("all", "dedup") and c.shard_index is None:
        dirs = [shard_root / f"{i:05d}" for i in range(int(c.num_shards))]
        missing = [i for i, d in enumerate(dirs) if not (d / SHARD_MANIFEST).is_file()]
        if missing:
            raise DataError(f"curate.phase=dedup: shard(s) {', '.join(map(str, missing))} of {c.num_shards} not complete "
                            f"in {shard_root}; run them first (curate.phase=filter curate.shard_index=...)")
        if c.phase == "dedup":
            manifests = [json.loads((d / SHARD_MANIFEST).read_text(encoding="utf-8")) for d in dirs]
        t0 = time.perf_counter()
        log.info("dedup: %d shard(s) -> %s", len(dirs), out / "clean")
        dedup = dedup_shards(cc, dirs, out, bar=bool(cfg.progress))
        summary["dedup_seconds"] = round(time.perf_counter() - t0, 3)

    _check_strict(cfg, manifests)
    report = build_report(manifests, dedup)
    write_report(report, out)
    if out != run.dir:
        write_report(report, run.dir)
    print(report_markdown(json.loads(json.dumps({**report, "steps": [
        {k: v for k, v in s.items() if k != "samples"} for s in report["steps"]]}))), flush=True)
    summary.update({"docs_read": report["read"]["docs"], "bytes_read": report["read"]["bytes"],
                    "shards": len(manifests), "output_dir": str(out)})
    for s in report["steps"]:
        summary[f"{s['step']}_docs_out"] = s["docs_out"]
        summary[f"{s['step']}_bytes_out"] = s["bytes_out"]
    if dedup:
        summary.update({"clean_docs": dedup["clean"]["docs"], "clean_bytes": dedup["clean"]["bytes"],
                        "clean_path": dedup["clean"]["path"]})
        log.info("clean text: %d documents, %.2f MB in %s; train a tokenizer on it with: lmrun stage=tokenizer "
                 "data=text_files data.train=%s", dedup["clean"]["docs"], dedup["clean"]["bytes"] / 1e6,
                 dedup["clean"]["path"], dedup["clean"]["path"])
    summary["seconds"] = round(time.perf_counter() - t_start, 3)
    run.log({k: v for k, v in summary.items() if isinstance(v, (int, float))}, step=0)
    return summary
