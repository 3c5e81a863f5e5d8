"""Training runs as scaling-law data: parameters N, tokens D, compute C and final loss L, from a
CSV/JSON file (e.g. CS336's ``isoflops_curves.json``) or from a sweep directory of lmrun
``pretrain`` runs (their ``summary.json`` and, for Chinchilla's approach 1, ``metrics.jsonl``).
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from lmrun.errors import DataError


@dataclass
class ScalingRun:
    """One training run. parameters: N; tokens: D; compute: C in FLOPs (the run's budget);
    loss: final loss (nats/token); curve: (compute, loss) pairs along training, if known."""

    parameters: float
    tokens: float
    compute: float
    loss: float
    curve: list[tuple[float, float]] = field(default_factory=list)


def _row_to_run(row: dict, where: str) -> ScalingRun:
    def num(key):
        v = row.get(key)
        if v is None or v == "":
            return None
        try:
            return float(v)
        except (TypeError, ValueError):
            raise DataError(f"{where}: {key}={v!r} is not a number") from None

    n, d, c, loss = num("parameters"), num("tokens"), num("compute_budget"), num("final_loss")
    if n is None or loss is None or (d is None and c is None):
        raise DataError(f"{where}: expected columns parameters, final_loss and tokens or compute_budget; got "
                        f"{', '.join(sorted(row))}")
    if d is None:
        d = c / (6 * n)
    if c is None:
        c = 6 * n * d
    if not all(math.isfinite(x) and x > 0 for x in (n, d, c, loss)):
        raise DataError(f"{where}: parameters, tokens, compute and loss must be positive finite numbers")
    return ScalingRun(n, d, c, loss)


def load_file(path: str | Path) -> list[ScalingRun]:
    """Runs from a JSON list of objects or a CSV with columns ``parameters``, ``final_loss`` and
    ``tokens`` or ``compute_budget`` (the other follows from C = 6·N·D). DataError on a missing
    or malformed file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"scaling.input={path}: no such file or sweep directory")
    try:
        if path.suffix.lower() == ".csv":
            with open(path, newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
        else:
            rows = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(rows, dict):
                rows = rows.get("runs", rows.get("data"))
    except (json.JSONDecodeError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"scaling.input={path}: unreadable ({e})") from None
    if not isinstance(rows, list) or not rows:
        raise DataError(f"scaling.input={path}: expected a non-empty list of runs")
    return [_row_to_run(r, f"{path} row {i}") for i, r in enumerate(rows)]


def run_from_dir(run_dir: str | Path, summary: dict, params_key: str = "params_non_embedding") -> ScalingRun:
    """One completed ``pretrain`` run directory as a ScalingRun: N = ``summary[params_key]``,
    D = tokens, C = ``compute_budget`` (``train.max_flops``) or else the exact training FLOPs,
    L = final validation loss; the curve pairs each logged validation loss in ``metrics.jsonl``
    with its compute (training FLOPs per token × tokens so far). DataError without
    ``params_key``."""
    if params_key not in summary:
        raise DataError(f"{run_dir}: summary.json has no {params_key!r} (scaling.params_key)")
    tokens = float(summary["tokens"])
    flops_per_token = float(summary["train_flops"]) / tokens
    curve = []
    metrics = Path(run_dir) / "metrics.jsonl"
    if metrics.exists() and summary.get("steps"):
        tokens_per_step = tokens / float(summary["steps"])
        for line in metrics.read_text(encoding="utf-8").splitlines():
            rec = json.loads(line)
            if rec.get("val_loss") is not None and rec.get("step"):
                curve.append((flops_per_token * tokens_per_step * rec["step"], float(rec["val_loss"])))
    return ScalingRun(float(summary[params_key]), tokens, float(summary.get("compute_budget", summary["train_flops"])),
                      float(summary["val_loss"]), curve)


def load_sweep(sweep_dir: str | Path, params_key: str = "params_non_embedding") -> list[ScalingRun]:
    """Completed ``pretrain`` runs of a sweep directory (each as :func:`run_from_dir`)."""
    from lmrun.tracking.collect import load_sweep as load_jobs

    runs = []
    for job in load_jobs(sweep_dir):
        s = job["summary"]
        if job["state"] != "completed" or "val_loss" not in s:
            continue
        runs.append(run_from_dir(job["dir"], s, params_key))
    if not runs:
        raise DataError(f"scaling.input={sweep_dir}: no completed pretrain runs with a validation loss")
    return runs


def load_plan(plan_dir: str | Path, params_key: str = "params_non_embedding") -> list[ScalingRun]:
    """The runs of a ``scaling.mode=plan`` run directory (its ``plan.json``): each from its
    pretrain run directory (:func:`run_from_dir`, with the round's budget as C) where that still
    exists, else from the values plan.json recorded. DataError on a malformed plan.json."""
    path = Path(plan_dir) / "plan.json"
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))["runs"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise DataError(f"scaling.input={plan_dir}: unreadable plan.json ({e})") from None
    runs = []
    for i, e in enumerate(entries):
        summary_path = Path(e.get("dir") or "/nonexistent") / "summary.json"
        if summary_path.is_file():
            r = run_from_dir(summary_path.parent, json.loads(summary_path.read_text(encoding="utf-8")), params_key)
            r.compute = float(e["compute"])
        else:
            r = _row_to_run({"parameters": e.get("parameters"), "tokens": e.get("tokens"),
                             "compute_budget": e.get("compute"), "final_loss": e.get("loss")}, f"{path} run {i}")
        runs.append(r)
    if not runs:
        raise DataError(f"scaling.input={plan_dir}: the plan holds no runs")
    return runs


def load_runs(source: str | Path, params_key: str = "params_non_embedding") -> list[ScalingRun]:
    """:func:`load_plan` for a planner's run directory (with ``plan.json``), :func:`load_sweep`
    for another directory, :func:`load_file` for a file."""
    source = Path(source).expanduser()
    if source.is_dir():
        return load_plan(source, params_key) if (source / "plan.json").is_file() else load_sweep(source, params_key)
    return load_file(source)


def budgets(runs: list[ScalingRun], rel_tol: float = 0.05) -> list[tuple[float, list[ScalingRun]]]:
    """Runs grouped by compute budget (budgets within ``rel_tol`` of each other are one), in
    increasing order: ``[(C, runs), ...]``."""
    groups: list[tuple[float, list[ScalingRun]]] = []
    for r in sorted(runs, key=lambda r: r.compute):
        if groups and abs(r.compute - groups[-1][0]) <= rel_tol * groups[-1][0]:
            groups[-1][1].append(r)
        else:
            groups.append((r.compute, [r]))
    return groups
