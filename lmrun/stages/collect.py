"""Stage ``collect``: a sweep's results as tables — ``lmrun stage=collect sweep=<dir>``.

Reads the sweep's manifest and run directories (nothing is recomputed) and writes into its own
run directory: ``jobs.csv``/``jobs.md`` (one row per job: state, swept keys, metrics),
``results.csv``/``results.md`` (jobs that differ only by ``seed`` grouped: n, mean, std and the
``collect.confidence`` interval of each metric), with ``collect.compare=<key>``
``compare.csv``/``compare.md`` (Welch's t-test between that key's variants), and with
``collect.plot=<key>`` one ``plot_<metric>.png`` per metric against that key. The tables are
printed too.
"""
from __future__ import annotations

import logging
from pathlib import Path

from lmrun.errors import ConfigError
from lmrun.tracking import collect as tables
from lmrun.tracking.files import atomic_write_text
from lmrun.tracking.run import active_run

log = logging.getLogger(__name__)


def _sweep_dir(cfg) -> Path:
    if not cfg.sweep.dir:
        raise ConfigError("sweep.dir=None: expected the sweep directory to collect (lmrun stage=collect sweep=<dir>)")
    return Path(str(cfg.sweep.dir)).expanduser()


def _prepare(cfg):
    jobs = tables.load_sweep(_sweep_dir(cfg))
    keys = tables.swept_keys(jobs)
    metrics = list(cfg.collect.metrics) or tables.numeric_metrics(jobs)
    for key, name in ((cfg.collect.compare, "compare"), (cfg.collect.plot, "plot")):
        if key is not None and key not in keys:
            raise ConfigError(f"collect.{name}={key}: not a swept key of this sweep; swept: {', '.join(keys) or 'none'}")
    return jobs, keys, metrics


def plan(cfg) -> dict:
    jobs, keys, metrics = _prepare(cfg)
    states: dict[str, int] = {}
    for j in jobs:
        states[j["state"]] = states.get(j["state"], 0) + 1
    outputs = ["jobs.csv", "jobs.md", "results.csv", "results.md"]
    if cfg.collect.compare:
        outputs += ["compare.csv", "compare.md"]
    if cfg.collect.plot:
        outputs += [f"plot_{m}.png" for m in metrics]
    return {"stage": "collect", "inputs": {"sweep": str(_sweep_dir(cfg))}, "jobs": len(jobs), "states": states,
            "swept_keys": keys, "metrics": metrics, "outputs": outputs}


def run(cfg) -> dict:
    run = active_run()
    jobs, keys, metrics = _prepare(cfg)
    conf = float(cfg.collect.confidence)
    job_rows = tables.job_table(jobs, keys, metrics)
    groups = tables.group_table(jobs, keys, metrics, conf)
    written = {"jobs": job_rows, "results": groups}
    if cfg.collect.compare:
        written["compare"] = tables.welch_tests(jobs, str(cfg.collect.compare), keys, metrics)
    report = []
    for name, rows in written.items():
        atomic_write_text(run.dir / f"{name}.csv", tables.to_csv(rows))
        md = tables.to_markdown(tables.summarize_groups(rows, metrics, conf) if name == "results" else rows)
        atomic_write_text(run.dir / f"{name}.md", md)
        report.append(f"## {name}\n\n{md}")
    if cfg.collect.plot:
        for m in metrics:
            tables.plot_metric(groups, str(cfg.collect.plot), keys, m, run.dir / f"plot_{m}.png", conf)
    print("\n".join(report), flush=True)
    states: dict[str, int] = {}
    for j in jobs:
        states[j["state"]] = states.get(j["state"], 0) + 1
    log.info("collected %d job(s) of %s: %s; tables in %s", len(jobs), _sweep_dir(cfg),
             ", ".join(f"{n} {s}" for s, n in sorted(states.items())), run.dir)
    return {"jobs": len(jobs), "completed": states.get("completed", 0), "groups": len(groups),
            "swept_keys": keys, "metrics": metrics}
