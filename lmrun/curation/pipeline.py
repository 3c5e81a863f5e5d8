"""The curation pipeline: per-shard document steps (phase 1) and corpus-wide dedup (phase 2).

Output layout under ``output_dir``::

    shards/<i:05d>/docs.jsonl    documents that passed the document steps (text + metadata)
    shards/<i:05d>/shard.json    the shard's inputs, fingerprint and per-step statistics;
                                 written last: its presence marks the shard complete
    clean/shard_<i:05d>.txt      final documents separated by <|endoftext|>
    clean/shard_<i:05d>.jsonl    the same documents with their metadata, one JSON per line
    clean.txt                    all clean shards joined (the file a data preset reads)
    report.json, report.md, report.png, samples/<step>.jsonl

Each step records documents and bytes (UTF-8 of the text; raw HTML bytes into ``extract``)
in and out, removal reasons and seconds, so the report can show what each step cost.
"""
from __future__ import annotations

import json
import logging
import multiprocessing
import os
import random
import signal
import time
from collections import Counter
from pathlib import Path

from lmrun.curation.config import DEDUP_STEPS, DOC_STEPS
from lmrun.curation.readers import EOT, read_documents
from lmrun.errors import DataError
from lmrun.tracking.files import atomic_write, atomic_write_json, config_digest, json_dumps, save_figure

log = logging.getLogger(__name__)

SAMPLE_CHARS = 2000
SHARD_MANIFEST = "shard.json"
#: seconds between a shard's progress reports (documents read and kept so far)
REPORT_EVERY_S = 1.0


class StepStats:
    """Counters of one step: documents and bytes in/out, removal reasons, seconds, and a
    reservoir sample of kept and removed documents."""

    def __init__(self, name: str, samples: int, seed: int):
        self.name = name
        self.docs_in = self.docs_out = self.bytes_in = self.bytes_out = 0
        self.reasons: Counter[str] = Counter()
        self.seconds = 0.0
        self.extra: Counter[str] = Counter()
        self.k = samples
        self.rng = random.Random(f"{seed}-{name}")
        self.kept: list[dict] = []
        self.removed: list[dict] = []
        self._seen = {"kept": 0, "removed": 0}

    def _sample(self, which: str, doc: dict, reason: str | None) -> None:
        if not self.k:
            return
        pool = self.kept if which == "kept" else self.removed
        self._seen[which] += 1
        item = {"id": doc.get("id"), "url": doc.get("url"), "reason": reason,
                "text": (doc.get("text") or "")[:SAMPLE_CHARS]}
        if len(pool) < self.k:
            pool.append(item)
        else:
            j = self.rng.randrange(self._seen[which])
            if j < self.k:
                pool[j] = item

    def add(self, doc: dict, bytes_in: int, reason: str | None) -> None:
        self.docs_in += 1
        self.bytes_in += bytes_in
        if reason is None:
            self.docs_out += 1
            self.bytes_out += len(doc["text"].encode("utf-8"))
            self._sample("kept", doc, None)
        else:
            self.reasons[reason] += 1
            self._sample("removed", doc, reason)

    def to_dict(self) -> dict:
        return {"step": self.name, "docs_in": self.docs_in, "docs_out": self.docs_out, "bytes_in": self.bytes_in,
                "bytes_out": self.bytes_out, "removed": dict(self.reasons.most_common()),
                "seconds": round(self.seconds, 4), **({"counts": dict(self.extra)} if self.extra else {}),
                "samples": {"kept": self.kept, "removed": self.removed}}


def merge_stats(items: list[dict]) -> dict:
    """Sum per-step statistics of several shards (samples concatenated)."""
    out = {"step": items[0]["step"], "docs_in": 0, "docs_out": 0, "bytes_in": 0, "bytes_out": 0, "seconds": 0.0}
    removed: Counter[str] = Counter()
    counts: Counter[str] = Counter()
    samples = {"kept": [], "removed": []}
    for s in items:
        for k in ("docs_in", "docs_out", "bytes_in", "bytes_out", "seconds"):
            out[k] += s[k]
        removed.update(s.get("removed", {}))
        counts.update(s.get("counts", {}))
        for k in samples:
            samples[k] += s.get("samples", {}).get(k, [])
    out["seconds"] = round(out["seconds"], 4)
    out["removed"] = dict(removed.most_common())
    if counts:
        out["counts"] = dict(counts)
    out["samples"] = samples
    return out


# --- phase 1: document steps -----------------------------------------------------------------
def doc_steps_fingerprint(cfg: dict, files: list[tuple[str, str]]) -> str:
    """What determines a shard's output: the document-step config and the inputs' identity
    (path, size, mtime) — a completed shard with the same fingerprint is skipped."""
    keys = ("steps", "format", "min_doc_chars", "extract_main_content", "langid", "pii", "harmful", "gopher")
    material = {k: cfg.get(k) for k in keys}
    material["steps"] = [s for s in cfg["steps"] if s in DOC_STEPS]
    if "quality" in material["steps"]:
        q = cfg["quality"]
        mp = q.get("resolved_model_path")
        material["quality"] = {"threshold": q["threshold"], "model": mp,
                               "model_mtime": os.stat(mp).st_mtime_ns if mp and os.path.exists(mp) else None}
    ident = []
    for path, fmt in files:
        st = os.stat(path)
        ident.append([path, fmt, st.st_size, st.st_mtime_ns])
    material["files"] = ident
    return config_digest(material)


class DocPipeline:
    """The enabled document steps of ``cfg`` (a plain dict of CurateConfig) applied to one
    document at a time: :meth:`process` returns the document (text and metadata updated) or
    None when a step removed it."""

    def __init__(self, cfg: dict):
        self.cfg = cfg
        self.steps = [s for s in DOC_STEPS if s in cfg["steps"]]
        self.stats = {s: StepStats(s, cfg["samples_per_step"], cfg.get("seed", 0)) for s in self.steps}
        self.min_chars = cfg["min_doc_chars"]
        self.quality_model = None
        if "quality" in self.steps:
            from lmrun.curation.quality import load_quality_model

            self.quality_model = load_quality_model(cfg["quality"]["resolved_model_path"])
        self.setup_seconds = self._warm_up()

    def _warm_up(self) -> float:
        """Load the models once (outside the per-step timings); returns the seconds it took."""
        t0 = time.perf_counter()
        doc = {"id": "warm-up", "text": "Warm up the language and content classifiers once."}
        for step in ("langid", "harmful"):
            if step in self.steps:
                self._apply(step, dict(doc))
        return time.perf_counter() - t0

    def _apply(self, step: str, doc: dict) -> str | None:
        """Run one step on ``doc`` in place; return a removal reason or None."""
        c = self.cfg
        if step == "extract":
            if "html" not in doc:
                return None if len(doc["text"].strip()) >= self.min_chars else "empty"
            from lmrun.curation.extract import extract_text_from_html_bytes

            text = extract_text_from_html_bytes(doc.pop("html"), main_content=c["extract_main_content"])
            if text is None:
                doc["text"] = ""
                return "undecodable"
            doc["text"] = text.strip()
            return None if len(doc["text"]) >= self.min_chars else "empty"
        if step == "langid":
            from lmrun.curation.langid import identify_language

            lc = c["langid"]
            lang, score = identify_language(doc["text"], lc["backend"], lc["model_path"])
            doc["language"], doc["language_score"] = lang, round(score, 4)
            if lc["languages"] and lang not in lc["languages"]:
                return f"language_{lang}"
            return "low_language_score" if score < lc["min_score"] else None
        if step == "pii":
            from lmrun.curation.pii import mask_pii

            pc = c["pii"]
            doc["text"], counts = mask_pii(doc["text"], pc["emails"], pc["phone_numbers"], pc["ips"])
            doc["pii"] = counts
            self.stats["pii"].extra.update(counts)
            return None
        if step == "harmful":
            from lmrun.curation.harmful import classify_nsfw, classify_toxic_speech, harmful_probability

            hc = c["harmful"]
            if hc["nsfw"]:
                label, score = classify_nsfw(doc["text"], hc["backend"], hc["nsfw_model_path"])
                doc["nsfw_score"] = p = round(harmful_probability(label, score, "nsfw"), 4)
                if p >= hc["nsfw_threshold"]:
                    return "nsfw"
            if hc["toxic"]:
                label, score = classify_toxic_speech(doc["text"], hc["backend"], hc["toxic_model_path"])
                doc["toxic_score"] = p = round(harmful_probability(label, score, "toxic"), 4)
                if p >= hc["toxic_threshold"]:
                    return "toxic"
            return None
        if step == "gopher":
            from lmrun.curation.gopher import gopher_reasons

            reasons = gopher_reasons(doc["text"], **c["gopher"])
            return f"gopher_{reasons[0]}" if reasons else None
        if step == "quality":
            from lmrun.curation.quality import classify_quality

            label, score = classify_quality(doc["text"], c["quality"]["resolved_model_path"], self.quality_model)
            p = score if label == "wiki" else 1.0 - score
            doc["quality_score"] = round(p, 4)
            return "low_quality" if p < c["quality"]["threshold"] else None
        raise ValueError(step)

    def process(self, doc: dict) -> dict | None:
        if "html" in doc and "extract" not in self.steps:
            raise DataError(f"{doc['source']}: HTML input needs the extract step in curate.steps")
        for step in self.steps:
            st = self.stats[step]
            bytes_in = len(doc["html"]) if "html" in doc else len(doc["text"].encode("utf-8"))
            t0 = time.perf_counter()
            reason = self._apply(step, doc)
            st.seconds += time.perf_counter() - t0
            st.add(doc, bytes_in, reason)
            if reason is not None:
                return None
        return doc


def run_shard(cfg: dict, files: list[tuple[str, str]], shard_dir: str, index: int, report=None) -> dict:
    """Phase 1 for one shard: read ``files``, apply the document steps, write
    ``docs.jsonl`` and then ``shard.json`` (the completion mark). A completed shard with the
    same fingerprint is not recomputed. Returns the shard manifest.

    ``report((shard, docs, kept, files))``, if given, receives the documents read and kept and the
    input files finished since the previous report: at most every ``REPORT_EVERY_S`` seconds and
    after each file (what the stage's progress line counts)."""
    shard_dir = Path(shard_dir)
    fingerprint = doc_steps_fingerprint(cfg, files)
    manifest_path = shard_dir / SHARD_MANIFEST
    if manifest_path.is_file():
        try:
            old = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            old = {}
        if old.get("fingerprint") == fingerprint and (shard_dir / "docs.jsonl").is_file():
            old["skipped"] = True
            return old
    shard_dir.mkdir(parents=True, exist_ok=True)
    manifest_path.unlink(missing_ok=True)
    if files:  # (in a pool worker this goes nowhere: workers have no log handlers; the parent reports)
        log.info("shard %d: %d file(s); loading the document steps (%s)", index, len(files),
                 ", ".join(s for s in DOC_STEPS if s in cfg["steps"]))
    pipe = DocPipeline(cfg)
    t0 = time.perf_counter()
    read = {"docs": 0, "bytes": 0, "seconds": 0.0}
    sent = {"docs": 0, "kept": 0, "at": time.perf_counter()}
    kept = [0]
    read_errors: list[dict] = []  # files cut off or corrupt: {"path", "offset", "error"}

    def send(files_done: int) -> None:
        if report is not None:
            report((index, read["docs"] - sent["docs"], kept[0] - sent["kept"], files_done))
            sent.update(docs=read["docs"], kept=kept[0], at=time.perf_counter())

    def problem(item: dict) -> None:
        read_errors.append(item)
        if cfg.get("strict"):
            raise DataError(f"{item['path']}: {item['error']} (curate.strict=true)")

    def write(f):
        for path, fmt in files:
            it = read_documents(Path(path), fmt, on_problem=problem)
            while True:
                tr = time.perf_counter()
                doc = next(it, None)
                read["seconds"] += time.perf_counter() - tr
                if doc is None:
                    break
                read["docs"] += 1
                read["bytes"] += len(doc["html"]) if "html" in doc else len(doc["text"].encode("utf-8"))
                out = pipe.process(doc)
                if out is not None:
                    kept[0] += 1
                    f.write((json_dumps(out, ensure_ascii=False) + "\n").encode("utf-8"))
                if report is not None and time.perf_counter() - sent["at"] >= REPORT_EVERY_S:
                    send(0)
            send(1)

    atomic_write(shard_dir / "docs.jsonl", write)
    manifest = {"shard": index, "fingerprint": fingerprint, "files": [{"path": p, "format": f} for p, f in files],
                "read": {**read, "seconds": round(read["seconds"], 4)}, "read_errors": read_errors,
                "seconds": round(time.perf_counter() - t0, 4), "setup_seconds": round(pipe.setup_seconds, 4),
                "pid": os.getpid(),
                "steps": [pipe.stats[s].to_dict() for s in pipe.steps], "skipped": False}
    atomic_write_json(manifest_path, manifest)
    return manifest


_REPORT_QUEUE = None  # a worker's queue to the parent (set by _shard_worker_init)


def _shard_worker_init(queue) -> None:
    global _REPORT_QUEUE
    # SIGTERM (Pool.terminate) ends a worker even where the parent ignores it (submitit in a Slurm
    # job); the preemption signals are for the parent alone
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    for name in ("SIGUSR1", "SIGUSR2"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)
    _REPORT_QUEUE = queue


def _run_shard_args(args):
    q = _REPORT_QUEUE
    return run_shard(*args, report=q.put if q is not None else None)


def _drain(queue, on_report) -> None:
    import queue as queue_mod

    while True:
        try:
            item = queue.get_nowait()
        except (queue_mod.Empty, OSError, ValueError):
            return
        if on_report is not None:
            on_report(item)


def run_shards(args: list[tuple], workers: int, on_report=None, on_done=None, on_tick=None,
               poll_s: float = 0.5) -> list[dict]:
    """Phase 1 over several shards: ``run_shard(*a)`` for each ``a`` of ``args``, in this process
    (``workers <= 1``) or in a pool of ``workers`` processes. Returns the manifests in completion
    order.

    The pool uses the *spawn* start method: a forked worker would inherit the parent's live
    wandb run (and its service connection, threads and locks), and wandb refuses any operation in
    a forked process (``ForkedError``: raised, e.g., by its import hooks when a worker imports a
    module the run watches). Workers touch no logger or run; they send ``(shard, docs, kept,
    files)`` progress tuples through a queue, and only this process calls ``on_report(tuple)``,
    ``on_done(manifest)`` and, at least every ``poll_s`` seconds while waiting, ``on_tick()``.
    A worker's exception is raised here."""
    manifests: list[dict] = []
    if workers <= 1 or len(args) <= 1:
        for a in args:
            m = run_shard(*a, report=on_report)
            manifests.append(m)
            if on_done is not None:
                on_done(m)
        return manifests
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    try:
        with ctx.Pool(workers, initializer=_shard_worker_init, initargs=(queue,)) as pool:
            results = pool.imap_unordered(_run_shard_args, args)
            while len(manifests) < len(args):
                try:
                    m = results.next(timeout=poll_s)
                except multiprocessing.TimeoutError:
                    m = None
                _drain(queue, on_report)
                if m is not None:
                    manifests.append(m)
                    if on_done is not None:
                        on_done(m)
                elif on_tick is not None:
                    on_tick()
    finally:
        queue.close()
        queue.cancel_join_thread()
    return manifests


# --- phase 2: dedup ------------------------------------------------------------------------
def iter_jsonl(path: Path):
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def _shard_docs(shard_dir: Path) -> int | None:
    """Documents in a completed shard's ``docs.jsonl`` (from its manifest; None if unknown)."""
    try:
        m = json.loads((shard_dir / SHARD_MANIFEST).read_text(encoding="utf-8"))
        return int(m["steps"][-1]["docs_out"] if m["steps"] else m["read"]["docs"])
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None


def dedup_shards(cfg: dict, shard_dirs: list[Path], out_dir: Path, bar: bool = False) -> dict:
    """Phase 2 over the shards' ``docs.jsonl`` (in shard order): exact-line dedup, then
    MinHash near-duplicate removal, as enabled in ``cfg["steps"]``; writes
    ``clean/shard_<i>.{txt,jsonl}`` and ``clean.txt``. Returns ``{"steps": [stats], "dedup":
    {...}, "clean": {...}}``. Each pass over the documents reports its progress (a log line at
    most every 10 s and at its end; a bar on a terminal with ``bar``)."""
    from lmrun.curation.dedup import count_lines, find_near_duplicates, remove_duplicate_lines
    from lmrun.tracking.progress import Progress

    steps = [s for s in DEDUP_STEPS if s in cfg["steps"]]
    stats = {s: StepStats(s, cfg["samples_per_step"], cfg.get("seed", 0)) for s in steps}
    files = [d / "docs.jsonl" for d in shard_dirs]
    min_chars = cfg["min_doc_chars"]
    counts_known = [_shard_docs(d) for d in shard_dirs]
    total_docs = None if None in counts_known else sum(counts_known)

    def docs(what: str):
        with Progress(total_docs, f"dedup: {what}", unit="document", bar=bar) as prog:
            for i, f in enumerate(files):
                for doc in iter_jsonl(f):
                    yield i, doc
                    prog.update(1)

    counts = None
    if "exact_dedup" in steps:
        t0 = time.perf_counter()
        counts = count_lines(doc["text"] for _, doc in docs("counting lines"))
        stats["exact_dedup"].seconds += time.perf_counter() - t0

    def after_lines(what: str):
        """(shard, doc, bytes before line dedup, reason) for every document; records stats once."""
        for i, doc in docs(what):
            b = len(doc["text"].encode("utf-8"))
            reason = None
            if counts is not None:
                doc["text"], removed = remove_duplicate_lines(doc["text"], counts)
                doc["duplicate_lines_removed"] = removed
                if len(doc["text"]) < min_chars:
                    reason = "all_lines_duplicated"
            yield i, doc, b, reason

    info: dict = {}
    remove: set[int] = set()
    if "minhash_dedup" in steps:
        d = cfg["dedup"]
        t0 = time.perf_counter()
        mh_pass = iter(("minhash signatures", "minhash candidate pairs"))  # find_near_duplicates streams twice
        res = find_near_duplicates(lambda: (doc["text"] for _, doc, _, r in after_lines(next(mh_pass, "minhash"))
                                            if r is None),
                                   d["num_hashes"], d["num_bands"], d["ngrams"], d["jaccard_threshold"], d["seed"])
        stats["minhash_dedup"].seconds += time.perf_counter() - t0
        remove = res["remove"]
        sizes = Counter(len(c) for c in res["clusters"])
        info["minhash"] = {"docs": res["num_docs"], "candidate_pairs": res["candidates"],
                           "confirmed_pairs": res["confirmed"], "clusters": len(res["clusters"]),
                           "cluster_sizes": {str(k): v for k, v in sorted(sizes.items())},
                           "removed": len(remove)}

    clean = out_dir / "clean"
    clean.mkdir(parents=True, exist_ok=True)
    handles: dict[int, tuple] = {}
    written = {"docs": 0, "bytes": 0}
    kept_index = -1
    t_write = time.perf_counter()
    tmp_paths = []
    try:
        for i in range(len(files)):
            paths = (clean / f".shard_{i:05d}.txt.tmp", clean / f".shard_{i:05d}.jsonl.tmp")
            tmp_paths.append(paths)
            handles[i] = (open(paths[0], "w", encoding="utf-8"), open(paths[1], "w", encoding="utf-8"), [0])
        for i, doc, b, reason in after_lines("writing clean shards"):
            if "exact_dedup" in stats:
                stats["exact_dedup"].add(doc, b, reason)
            if reason is not None:
                continue
            kept_index += 1
            if "minhash_dedup" in stats:
                nb = len(doc["text"].encode("utf-8"))
                r = "near_duplicate" if kept_index in remove else None
                stats["minhash_dedup"].add(doc, nb, r)
                if r is not None:
                    continue
            txt, js, n = handles[i]
            if n[0]:
                txt.write(EOT)
            txt.write(doc["text"])
            n[0] += 1
            js.write(json_dumps(doc, ensure_ascii=False) + "\n")
            written["docs"] += 1
            written["bytes"] += len(doc["text"].encode("utf-8"))
        for i, (txt, js, _) in handles.items():
            txt.close()
            js.close()
            os.replace(tmp_paths[i][0], clean / f"shard_{i:05d}.txt")
            os.replace(tmp_paths[i][1], clean / f"shard_{i:05d}.jsonl")
    finally:
        for txt, js, _ in handles.values():
            txt.close()
            js.close()
        for a, b in tmp_paths:
            a.unlink(missing_ok=True)
            b.unlink(missing_ok=True)

    def join(f):
        first = True
        for i in range(len(files)):
            data = (clean / f"shard_{i:05d}.txt").read_bytes()
            if data:
                if not first:
                    f.write(EOT.encode("utf-8"))
                f.write(data)
                first = False

    atomic_write(out_dir / "clean.txt", join)
    write_s = time.perf_counter() - t_write
    for s in stats.values():  # the streaming pass's time is shared by the enabled dedup steps
        s.seconds += write_s / max(len(stats), 1)
    return {"steps": [stats[s].to_dict() for s in steps], "dedup": info,
            "clean": {"docs": written["docs"], "bytes": written["bytes"], "path": str(out_dir / "clean.txt"),
                      "shards": [str(clean / f"shard_{i:05d}.txt") for i in range(len(files))]}}


# --- report ---------------------------------------------------------------------------------
def build_report(shard_manifests: list[dict], dedup: dict | None) -> dict:
    """Per-step statistics over all shards (then the dedup steps), with totals; ``read_errors``
    lists the input files read only in part (cut off or corrupt: path, byte offset, error) and
    ``truncated_files`` counts them."""
    steps: dict[str, list[dict]] = {}
    for m in shard_manifests:
        for s in m["steps"]:
            steps.setdefault(s["step"], []).append(s)
    rows = [merge_stats(v) for v in steps.values()]
    if dedup:
        rows += dedup["steps"]
    read = {"docs": sum(m["read"]["docs"] for m in shard_manifests),
            "bytes": sum(m["read"]["bytes"] for m in shard_manifests),
            "seconds": round(sum(m["read"]["seconds"] for m in shard_manifests), 4)}
    errors = [e for m in shard_manifests for e in m.get("read_errors", [])]
    return {"read": read, "steps": rows, "shards": len(shard_manifests),
            "truncated_files": len({e["path"] for e in errors}), "read_errors": errors,
            **({"dedup": dedup["dedup"], "clean": dedup["clean"]} if dedup else {})}


def report_markdown(report: dict) -> str:
    """The per-step table: documents and bytes in/out, kept share, seconds, top removal reasons."""
    lines = [f"Read {report['read']['docs']:,} documents ({report['read']['bytes'] / 1e6:.2f} MB) "
             f"from {report['shards']} shard(s).", "",
             *([f"**{report['truncated_files']} input file(s) cut off or corrupt** (documents read before the damage "
                "are kept):", "", *[f"- `{e['path']}` at byte {e['offset']:,}: {e['error']}"
                                    for e in report["read_errors"]], ""] if report.get("read_errors") else []),
             "| step | docs in | docs out | kept % | MB in | MB out | seconds | docs/s | removed (top reasons) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for s in report["steps"]:
        kept = 100.0 * s["docs_out"] / s["docs_in"] if s["docs_in"] else 100.0
        rate = s["docs_in"] / s["seconds"] if s["seconds"] > 0 else float("nan")
        reasons = ", ".join(f"{k} {v}" for k, v in list(s["removed"].items())[:4])
        extra = ", ".join(f"{k} {v}" for k, v in s.get("counts", {}).items())
        lines.append(f"| {s['step']} | {s['docs_in']:,} | {s['docs_out']:,} | {kept:.1f} | {s['bytes_in'] / 1e6:.3f} | "
                     f"{s['bytes_out'] / 1e6:.3f} | {s['seconds']:.2f} | {rate:,.0f} | "
                     f"{reasons or ('masked: ' + extra if extra else '-')} |")
    if report.get("dedup", {}).get("minhash"):
        m = report["dedup"]["minhash"]
        lines += ["", f"MinHash: {m['candidate_pairs']:,} candidate pairs, {m['confirmed_pairs']:,} confirmed, "
                      f"{m['clusters']:,} clusters, {m['removed']:,} documents removed."]
    if report.get("clean"):
        c = report["clean"]
        lines += ["", f"Clean: {c['docs']:,} documents, {c['bytes'] / 1e6:.3f} MB -> {c['path']}"]
    return "\n".join(lines) + "\n"


def plot_report(report: dict, path: Path) -> None:
    """Bar chart of documents and MB remaining after each step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["read"] + [s["step"] for s in report["steps"]]
    docs = [report["read"]["docs"]] + [s["docs_out"] for s in report["steps"]]
    mb = [report["read"]["bytes"] / 1e6] + [s["bytes_out"] / 1e6 for s in report["steps"]]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, values, label in ((axes[0], docs, "documents"), (axes[1], mb, "MB")):
        ax.bar(range(len(names)), values, color="#4477aa")
        ax.set_xticks(range(len(names)), names, rotation=35, ha="right")
        ax.set_ylabel(f"{label} after step")
        for x, v in enumerate(values):
            ax.text(x, v, f"{v:,.0f}" if label == "documents" else f"{v:.2f}", ha="center", va="bottom", fontsize=7)
    fig.suptitle("curation: what each step keeps")
    save_figure(fig, path, dpi=110)


def write_report(report: dict, out_dir: Path) -> None:
    """report.json (without samples), report.md, report.png and samples/<step>.jsonl."""
    samples_dir = out_dir / "samples"
    samples_dir.mkdir(parents=True, exist_ok=True)
    slim = json.loads(json.dumps(report))
    for s in slim["steps"]:
        samples = s.pop("samples", {"kept": [], "removed": []})
        lines = [json_dumps({"which": which, **x}, ensure_ascii=False) for which in ("kept", "removed")
                 for x in samples[which]]
        atomic_write(samples_dir / f"{s['step']}.jsonl", lambda f, lines=lines: f.write(
            ("\n".join(lines) + ("\n" if lines else "")).encode("utf-8")))
    atomic_write_json(out_dir / "report.json", slim)
    atomic_write(out_dir / "report.md", lambda f: f.write(report_markdown(slim).encode("utf-8")))
    plot_report(slim, out_dir / "report.png")
