"""Stage ``benchmark``: time implementations against a baseline in the same run.

``lmrun stage=benchmark benchmark=attention|rmsnorm|model`` (GPU-sized grids:
``benchmark=attention_gpu|rmsnorm_gpu|model_gpu``) runs the preset's grid (``lmrun.kernels.
benchmark``, ``lmrun.train.bench_model``), each case warmed up, synchronised and repeated, and
writes into the run directory ``benchmark.csv`` (every case: median and 20th/80th percentile ms,
spread = p80/p20, repetitions, peak memory, speed-up against ``benchmark.baseline``, status ok |
skipped | oom | error), ``benchmark.md`` (the same as pivot tables, also printed, with a
"Measurement warnings" section when a case's spread exceeds 1.5 or the 1-minute load average
exceeded the CPU count during the run; both are also logged as warnings), ``benchmark.png`` and, with
``benchmark.profile=true``, ``profile/`` (profiler traces, CUDA memory snapshots). Triton
implementations are skipped with a note on a CPU. Out-of-memory cases are reported, not raised.

``benchmark=gpu_acceptance`` runs ``lmrun.kernels.acceptance`` (the GPU acceptance check; the
same as ``python -m lmrun.kernels.acceptance``) and writes ``gpu_acceptance.json`` and
``gpu_acceptance.md`` into the run directory; the summary counts the targets met and not met.
"""
from __future__ import annotations

import logging
import platform
import statistics

from lmrun.errors import LmrunError
from lmrun.kernels.config import TRITON_IMPLS, model_variant
from lmrun.tracking.files import atomic_write_text
from lmrun.tracking.run import active_run

log = logging.getLogger(__name__)

#: grid keys of each kind (table rows), and the one on the plot's x axis
GRID_KEYS = {"attention": ["seq_len", "head_dim", "dtype"], "rmsnorm": ["rows", "d_model", "dtype"],
             "model": ["size", "batch", "context"], "collectives": ["size_mb", "world_size", "backend"],
             "ddp": ["size", "world_size", "batch"]}
PLOT_X = {"attention": "seq_len", "rmsnorm": "d_model", "model": "size", "collectives": "size_mb", "ddp": "size"}


def _device_name(device: str) -> str:
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _grid(b) -> dict:
    if b.kind == "attention":
        return {"batch_size": b.batch_size, "num_heads": b.num_heads, "seq_lens": list(b.seq_lens),
                "head_dims": list(b.head_dims), "dtypes": list(b.dtypes), "is_causal": b.is_causal}
    if b.kind == "rmsnorm":
        return {"rows": b.rows, "d_models": list(b.d_models), "dtypes": list(b.dtypes)}
    return {"sizes": list(b.sizes), "batch_size": b.batch_size, "context_length": b.context_length,
            "dtypes": list(b.dtypes), "compile": list(b.compile)}


def _distributed_rows(cfg) -> list[dict]:
    """Rows of benchmark=collectives|ddp, each grid point in fresh local processes."""
    from dataclasses import asdict

    from lmrun.distributed import bench
    from lmrun.distributed.env import spawn

    b = cfg.benchmark
    rows = []
    for world in b.world_sizes:
        if b.kind == "collectives":
            for backend in b.backends:
                rows += spawn(bench.collectives_worker, int(world), list(b.impls), [float(v) for v in b.sizes_mb],
                              backend, 2, int(b.min_reps), backend=backend)[0]
            continue
        from lmrun.train.bench_model import size_model_config

        for size in b.sizes:
            mcfg = asdict(size_model_config(cfg.model, size))
            mcfg["context_length"] = max(int(mcfg["context_length"]), int(b.context_length))
            result = spawn(bench.ddp_worker, int(world), mcfg, list(b.impls), int(b.batch_size), int(b.context_length),
                           float(b.bucket_size_mb), 2, int(b.min_reps))[0]
            for r in result:
                r["size"] = size
            rows += result
    return rows


def _load_warning(load: dict, when: str) -> None:
    from lmrun.kernels.benchmark import overloaded

    if overloaded(load):
        log.warning("the 1-minute load average is %.2f on %d CPU(s) %s: other processes compete for the CPU and the "
                    "times will be inflated and noisy (rerun on an idle machine, or with benchmark.threads=1)",
                    load["load_1min"], load["cpus"], when)


def _with_trust(report: str, rows: list[dict], loads: list[dict], summary: dict) -> str:
    """``report`` plus a "Measurement warnings" section (see ``noise_notes``) when there is one;
    adds ``max_spread``, ``noisy_cases``, ``max_load_1min`` and ``cpus`` to ``summary``."""
    from lmrun.kernels.benchmark import SPREAD_WARN, noise_notes, spread

    spreads = [spread(r) for r in rows if r.get("status") == "ok" and spread(r) is not None]
    known = [ld["load_1min"] for ld in loads if ld.get("load_1min") is not None]
    facts = {"max_spread": round(max(spreads), 3) if spreads else None,
             "noisy_cases": sum(x > SPREAD_WARN for x in spreads) if spreads else None,
             "max_load_1min": max(known) if known else None, "cpus": loads[0]["cpus"] if loads else None}
    summary.update({k: v for k, v in facts.items() if v is not None})
    notes = noise_notes(rows, loads)
    if not notes:
        return report
    for n in notes:
        log.warning("benchmark: %s", n[2:].replace("`", ""))
    return report + "\n## Measurement warnings\n\n" + "\n".join(notes) + "\n"


def _spread_cell(r: dict) -> str:
    from lmrun.kernels.benchmark import SPREAD_WARN

    if r.get("status") != "ok" or r.get("spread") is None:
        return r.get("status") or "—"
    return f"{r['spread']:.2f}" + (" (noisy)" if r["spread"] > SPREAD_WARN else "")


SPREAD_HEADING = ("Spread: 80th / 20th percentile time across the repeats (1.00: every repeat alike; "
                  "above 1.5, marked noisy, the median is unreliable).")


def plan(cfg) -> dict:
    b = cfg.benchmark
    if b.kind == "gpu_acceptance":
        device = _device_name(b.device)
        if device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise LmrunError("benchmark.device=cuda: no CUDA device is available (use benchmark.device=auto or cpu)")
        return {"stage": "benchmark", "kind": "gpu_acceptance", "device": device, "parts": list(b.parts),
                "budget_s": b.budget_s,
                "sizes": "full (GPU)" if device == "cuda" else "tiny, untimed (CPU; Triton kernels interpreted)",
                "outputs": ["gpu_acceptance.json", "gpu_acceptance.md", "summary.json", "run.json"]}
    if b.kind in ("collectives", "ddp"):
        grid = ({"sizes_mb": list(b.sizes_mb), "backends": list(b.backends)} if b.kind == "collectives" else
                {"sizes": list(b.sizes), "batch_size": b.batch_size, "context_length": b.context_length,
                 "bucket_size_mb": b.bucket_size_mb})
        return {"stage": "benchmark", "kind": b.kind, "device": "cpu" if "nccl" not in b.backends else "cuda",
                "grid": {**grid, "world_sizes": list(b.world_sizes)}, "impls": list(b.impls), "baseline": b.baseline,
                "outputs": ["benchmark.csv", "benchmark.md"] + (["benchmark.png"] if b.plot else [])
                + ["summary.json", "run.json"]}
    if b.kind == "inference":
        from lmrun.train.bench_model import size_model_config

        for size in b.sizes:
            size_model_config(cfg.model, size)
        return {"stage": "benchmark", "kind": "inference", "device": _device_name(b.device),
                "inputs": f"model={cfg.model.name} at each size preset, random weights and prompts (fixed seed)",
                "grid": {"sizes": list(b.sizes), "batch_sizes": list(b.batch_sizes), "prompt_lens": list(b.seq_lens),
                         "new_tokens": b.new_tokens, "speculative_ks": list(b.speculative_ks)},
                "impls": ["uncached", "cached", "cached_int8"] + [f"spec_k{k}" for k in b.speculative_ks],
                "baseline": "uncached", "outputs": ["benchmark.csv", "benchmark.md"]
                + (["benchmark.png"] if b.plot else []) + ["summary.json", "run.json"]}
    if b.kind == "model":
        from lmrun.train.bench_model import size_model_config

        for size in b.sizes:
            size_model_config(cfg.model, size)  # an unknown preset is an error now
        impls = [model_variant(d, c) for d in b.dtypes for c in b.compile]
    else:
        impls = list(b.impls)
    device = _device_name(b.device)
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise LmrunError("benchmark.device=cuda: no CUDA device is available (use benchmark.device=auto or cpu)")
    skipped = [i for i in impls if i in TRITON_IMPLS] if device != "cuda" else []
    inputs = (f"model={cfg.model.name} at each size preset, optimizer={cfg.optimizer.name}, random token ids"
              if b.kind == "model" else "random normal tensors (fixed seed), made per case")
    return {"stage": "benchmark", "kind": b.kind, "device": device, "inputs": inputs, "grid": _grid(b),
            "passes": list(b.passes),
            "impls": impls, "baseline": b.baseline,
            "skipped": {i: "Triton kernels are benchmarked on CUDA only" for i in skipped},
            "outputs": ["benchmark.csv", "benchmark.md"] + (["benchmark.png"] if b.plot else [])
            + (["profile/"] if b.profile else []) + ["summary.json", "run.json"]}


def run(cfg) -> dict:
    import torch

    from lmrun.kernels.benchmark import SPREAD_WARN, add_speedups, attention_cases, cpu_load, measure, rmsnorm_cases
    from lmrun.tracking.progress import Progress
    from lmrun.tracking.tables import benchmark_markdown, plot_benchmark, write_csv

    run = active_run()
    b = cfg.benchmark
    if b.kind in ("collectives", "ddp"):
        return _run_distributed(cfg, run)
    if b.kind == "gpu_acceptance":
        return _run_acceptance(cfg, run)
    device = torch.device(_device_name(b.device))
    if b.threads is not None:
        torch.set_num_threads(int(b.threads))
    if b.kind == "inference":
        return _run_inference(cfg, run, device)
    if b.kind == "attention":
        cases = attention_cases(b, device)
    elif b.kind == "rmsnorm":
        cases = rmsnorm_cases(b, device)
    else:
        from lmrun.train.bench_model import model_cases

        cases = model_cases(cfg, device)
    peak = None
    if b.kind == "model":
        from lmrun.train.trainer import peak_flops

        peak = peak_flops(device, b.peak_flops)
    profiled: set[str] = set()
    rows = []
    loads = [cpu_load()]
    _load_warning(loads[0], "before the benchmark")
    n = len(cases)
    # elapsed and ETA over the cases that run (skipped ones take no time); a line as each case starts,
    # since one case (a first compilation) may take minutes
    prog = Progress(sum(c.fn is not None for c in cases) or None, "benchmark", unit="case", every_s=float("inf"),
                    bar=bool(cfg.progress))
    for i, case in enumerate(cases):
        what = f"{case.impl} {case.pass_} " + " ".join(f"{k}={v}" for k, v in case.params.items())
        runs_now = case.fn is not None
        if runs_now:
            log.info("case %d/%d: %s (%s)", i + 1, n, what, prog.line())
        profile_dir = None
        if b.profile and case.impl not in profiled and case.fn is not None:
            profiled.add(case.impl)
            profile_dir = run.dir / "profile"
        row = measure(case, device, float(b.warmup_ms), float(b.rep_ms), int(b.min_reps), profile_dir)
        rows.append(row)
        if runs_now:
            prog.update(1)
            loads.append(cpu_load())
        if row["status"] == "ok":
            log.info("case %d/%d: %s: %.4g ms (p20 %.4g, p80 %.4g ms, spread %.2f, %d repeats)", i + 1, n, what,
                     row["median_ms"], row["p20_ms"], row["p80_ms"], row["spread"] or float("nan"), row["reps"])
            if (row["spread"] or 0) > SPREAD_WARN:
                load = loads[-1]
                log.warning("case %d/%d: %s: noisy timing, spread p80/p20 = %.2f > %.1f (load average %s on %d CPU(s))",
                            i + 1, n, what, row["spread"], SPREAD_WARN, load["load_1min"], load["cpus"])
        else:
            log.info("case %d/%d: %s: %s %s", i + 1, n, what, row["status"], row["note"])
        run.log({k: v for k, v in row.items() if isinstance(v, (int, float, str)) and v is not None}, step=i)
    prog.close()
    keys = GRID_KEYS[b.kind]
    add_speedups(rows, b.baseline, keys)
    extra = None
    if b.kind == "model":
        from lmrun.train.bench_model import add_throughput

        add_throughput(rows, peak)
        extra = {"Tokens per second.": lambda r: f"{r['tokens_per_s']:,.0f}" if r.get("tokens_per_s") else r["status"],
                 "MFU (model FLOPs utilisation; needs the device's peak FLOP/s).":
                     lambda r: f"{r['mfu']:.1%}" if r.get("mfu") is not None else "—"}
    extra = {**(extra or {}), SPREAD_HEADING: _spread_cell}
    dev_name = (torch.cuda.get_device_name(device) if device.type == "cuda"
                else f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)")
    title = f"benchmark={b.kind} on {dev_name}"
    write_csv(rows, run.dir / "benchmark.csv")
    ok = [r for r in rows if r["status"] == "ok"]
    summary = {"kind": b.kind, "device": dev_name, "cases": len(rows), "ok": len(ok),
               "skipped": sum(r["status"] == "skipped" for r in rows), "oom": sum(r["status"] == "oom" for r in rows),
               "errors": sum(r["status"] == "error" for r in rows), "baseline": b.baseline}
    report = _with_trust(benchmark_markdown(rows, keys, title, b.baseline, extra), rows, loads, summary)
    atomic_write_text(run.dir / "benchmark.md", report)
    if b.plot and any(r["status"] == "ok" for r in rows):
        series = [k for k in keys if k != PLOT_X[b.kind] and k not in ("rows", "batch", "context")]
        plot_benchmark(rows, PLOT_X[b.kind], series, run.dir / "benchmark.png", title)
    print(report)
    speedups = {}
    for impl in dict.fromkeys(r["impl"] for r in ok):
        vals = [r["speedup"] for r in ok if r["impl"] == impl and r.get("speedup")]
        if vals:
            speedups[impl] = round(statistics.geometric_mean(vals), 4)
    summary["geomean_speedup"] = speedups
    return summary


def _run_distributed(cfg, run) -> dict:
    from lmrun.kernels.benchmark import add_speedups
    from lmrun.tracking.tables import benchmark_markdown, plot_benchmark, write_csv

    from lmrun.kernels.benchmark import cpu_load, spread

    b = cfg.benchmark
    loads = [cpu_load()]
    _load_warning(loads[0], "before the benchmark")
    rows = _distributed_rows(cfg)
    loads.append(cpu_load())
    for row in rows:
        row["spread"] = round(spread(row), 3) if spread(row) is not None else None
    for i, row in enumerate(rows):
        run.log({k: v for k, v in row.items() if isinstance(v, (int, float, str)) and v is not None}, step=i)
    keys = GRID_KEYS[b.kind]
    add_speedups(rows, b.baseline, keys)
    if b.kind == "collectives":
        extra = {"Bus bandwidth (GB/s, nccl-tests convention).": lambda r: f"{r['bus_gbps']:.3g}"}
    else:
        def mem(r):
            parts = [f"{r[k]:.2f}" if r.get(k) is not None else "—" for k in ("params_mb", "grads_mb",
                                                                               "optimizer_state_mb")]
            return " / ".join(parts) + (f" (peak params {r['params_peak_mb']:.2f})" if r.get("params_peak_mb") else "")
        extra = {"Share of the step not spent computing (1 - local / this).":
                     lambda r: f"{r['comm_share']:.0%}" if r.get("comm_share") is not None else "—",
                 "Memory per rank, MiB: parameters / gradients / optimizer state.": mem}
    extra[SPREAD_HEADING] = _spread_cell
    title = f"benchmark={b.kind} on CPU ({platform.machine()}), local processes"
    write_csv(rows, run.dir / "benchmark.csv")
    trust: dict = {}
    report = _with_trust(benchmark_markdown(rows, keys, title, b.baseline, extra), rows, loads, trust)
    atomic_write_text(run.dir / "benchmark.md", report)
    if b.plot and rows:
        plot_benchmark(rows, PLOT_X[b.kind], [k for k in keys if k != PLOT_X[b.kind] and k != "batch"],
                       run.dir / "benchmark.png", title)
    print(report)
    speedups = {}
    for impl in dict.fromkeys(r["impl"] for r in rows):
        vals = [r["speedup"] for r in rows if r["impl"] == impl and r.get("speedup")]
        if vals:
            speedups[impl] = round(statistics.geometric_mean(vals), 4)
    return {"kind": b.kind, "cases": len(rows), "ok": len(rows), "baseline": b.baseline, "geomean_speedup": speedups,
            **trust}


def _run_inference(cfg, run, device) -> dict:
    import torch

    from lmrun.inference.bench import inference_markdown, inference_rows, plot_inference
    from lmrun.tracking.tables import write_csv

    from lmrun.kernels.benchmark import cpu_load

    loads = [cpu_load()]
    _load_warning(loads[0], "before the benchmark")
    rows = inference_rows(cfg, device)
    loads.append(cpu_load())
    for i, row in enumerate(rows):
        run.log({k: v for k, v in row.items() if isinstance(v, (int, float, str)) and v is not None}, step=i)
    dev_name = (torch.cuda.get_device_name(device) if device.type == "cuda"
                else f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)")
    title = f"benchmark=inference on {dev_name}"
    write_csv(rows, run.dir / "benchmark.csv")
    summary = {"kind": "inference", "device": dev_name, "cases": len(rows), "baseline": "uncached"}
    report = _with_trust(inference_markdown(rows, title), rows, loads, summary)
    atomic_write_text(run.dir / "benchmark.md", report)
    if cfg.benchmark.plot and rows:
        plot_inference(rows, run.dir / "benchmark.png", title)
    print(report)
    for impl in dict.fromkeys(r["impl"] for r in rows if r["pass"] == "decode" and r.get("speedup")):
        summary[f"decode_speedup_{impl}"] = round(statistics.geometric_mean(
            [r["speedup"] for r in rows if r["impl"] == impl and r.get("speedup")]), 4)
    acc = [r["acceptance"] for r in rows if r.get("acceptance") is not None]
    if acc:
        summary["mean_acceptance"] = round(statistics.mean(acc), 4)
    return summary


def _run_acceptance(cfg, run) -> dict:
    from lmrun.kernels.acceptance import run_acceptance

    b = cfg.benchmark
    report = run_acceptance(run.dir, float(b.budget_s), _device_name(b.device), list(b.parts))
    print((run.dir / "gpu_acceptance.md").read_text())
    targets = report["targets"]
    summary = {"kind": "gpu_acceptance", "device": report["device"], "mode": report["mode"],
               "rows": len(report["rows"]), "failed": sum(r["status"] in ("fail", "error") for r in report["rows"]),
               "targets_met": sum(t["met"] is True for t in targets),
               "targets_not_met": sum(t["met"] is False for t in targets), "elapsed_s": report["elapsed_s"]}
    for i, r in enumerate(report["rows"]):
        run.log({k: v for k, v in r.items() if isinstance(v, (int, float, str)) and v is not None}, step=i)
    return summary
