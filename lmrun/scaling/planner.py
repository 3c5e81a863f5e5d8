"""A budgeted scaling-law planner (in the spirit of CS336 assignment 3): spend an exploration
budget of training FLOPs on IsoFLOP profiles at increasing compute, refit after each round, and
recommend the compute-optimal model for a target budget.

Round r trains ``sizes_per_budget`` models at budget C_r = first_budget · budget_factor^r, sizes
spread geometrically (``size_spread``× either side) around the current estimate of N_opt(C_r) —
the fitted law once two budgets exist, else Chinchilla's 20 tokens per parameter
(C = 6·N·20·N) — each mapped to the nearest discrete by_params shape (a size whose shape
repeats one already in the round is trained once). A round that would overspend the budget is not started. Runs are real
``pretrain`` runs (subprocesses of this lmrun), kept by their overrides under
``<multiruns_dir>/scaling-plan-runs/<hash>/``: a run with the same overrides, in this plan or an
earlier one, is reused and costs nothing.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

from lmrun.errors import DataError
from lmrun.scaling.data import ScalingRun

log = logging.getLogger(__name__)


def nonembedding_for_shape(model_cfg, shape: dict) -> int:
    """Non-embedding parameters of ``model_cfg`` (a ModelConfig or the composed ``cfg.model``)
    with the shape keys replaced."""
    import dataclasses

    from lmrun.model.config import as_model_config
    from lmrun.model.flops import count_params

    return count_params(dataclasses.replace(as_model_config(model_cfg), d_ff=None, **shape))["non_embedding"]


def shape_of(model_cfg, target_params: float) -> dict:
    """The by_params shape for ``target_params`` under ``model_cfg``'s shape rule
    (``model.shape_aspect``, ``model.shape_head_dim``)."""
    from lmrun.model.config import as_model_config
    from lmrun.scaling.shapes import shape_for_params

    base = as_model_config(model_cfg)
    return shape_for_params(target_params, base.shape_aspect, base.shape_head_dim)


def target_for(model_cfg, n_non_embedding: float) -> float:
    """The ``model.target_params`` whose by_params shape has the non-embedding parameter count
    nearest (in log) to ``n_non_embedding`` (the shape rule counts Transformer blocks only; this
    one counts the LM head too, and the shapes are discrete: d_model is a multiple of the head
    dimension). Bisection in log space for a target where the count crosses ``n_non_embedding``;
    the shape just below the crossing is taken when it is nearer than the one above. (Where the
    rule adds a layer, the count is not monotone in the target and a slightly nearer shape can
    be missed.)"""
    from lmrun.model.config import as_model_config

    base = as_model_config(model_cfg)

    def count(t):
        return nonembedding_for_shape(base, shape_of(base, t))

    lo, hi = 1e2, max(1e3, 10 * n_non_embedding)
    for _ in range(60):
        mid = math.sqrt(lo * hi)
        if count(mid) < n_non_embedding:
            lo = mid
        else:
            hi = mid
    # step off the shape boundary before rounding, so that each side keeps its shape
    below, above = float(f"{lo / 1.001:.5g}"), float(f"{hi * 1.001:.5g}")
    if count(above) < n_non_embedding or count(below) >= n_non_embedding:
        return above
    near_below = math.log(n_non_embedding / count(below)) < math.log(count(above) / n_non_embedding)
    return below if near_below else above


class RunStore:
    """Pretrain runs kept by their overrides: ``<root>/<hash>/`` holds a run directory."""

    def __init__(self, root: Path, base_overrides: list[str], runner=None):
        self.root = Path(root)
        self.base = list(base_overrides)
        self.runner = runner or run_pretrain_subprocess

    def key(self, overrides: list[str]) -> str:
        return hashlib.sha256(json.dumps(sorted(self.base + overrides)).encode()).hexdigest()[:12]

    def get(self, overrides: list[str]) -> tuple[dict, bool]:
        """``(summary, reused)``: train (a subprocess ``python -m lmrun.cli stage=pretrain ...``)
        unless a completed run with these overrides exists. DataError if the run fails."""
        run_dir = self.root / self.key(overrides)
        info = run_dir / "run.json"
        if info.exists() and json.loads(info.read_text()).get("status") == "completed":
            return json.loads((run_dir / "summary.json").read_text()), True
        self.runner(self.base + overrides, run_dir)
        if not (run_dir / "summary.json").exists():
            raise DataError(f"plan run wrote no summary: {run_dir}")
        return json.loads((run_dir / "summary.json").read_text()), False


def run_pretrain_subprocess(overrides: list[str], run_dir: Path) -> None:
    """Train one planned run: ``python -m lmrun.cli stage=pretrain <overrides>`` into ``run_dir``
    (this lmrun, also from a source checkout). DataError with the log's tail if it fails."""
    cmd = [sys.executable, "-m", "lmrun.cli", "stage=pretrain", *overrides, f"hydra.run.dir={Path(run_dir).absolute()}"]
    log.info("plan run: %s", " ".join(cmd[3:]))
    env = dict(os.environ)
    src_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = src_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    returncode, lines = _run_reporting(cmd, env)
    if returncode != 0:
        tail = " | ".join(line for line in lines[-3:] if line.strip())
        raise DataError(f"plan run failed ({' '.join(overrides)}): {tail[-400:]}")


def _run_reporting(cmd: list[str], env: dict) -> tuple[int, list[str]]:
    """Run ``cmd``; while it runs, log every ``LOG_EVERY_S`` seconds the elapsed time and the
    child's latest log line (its step/total, ETA), so a long plan run is never silent.
    Returns (exit status, the last 50 lines of its stderr)."""
    import collections
    import re
    import threading
    import time

    from lmrun.tracking import progress

    tail: collections.deque[str] = collections.deque(maxlen=50)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)

    def read() -> None:
        for line in proc.stderr:
            tail.append(line.rstrip("\n"))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    t0 = last = time.perf_counter()
    while True:
        try:
            proc.wait(timeout=min(1.0, max(0.05, progress.LOG_EVERY_S)))
            break
        except subprocess.TimeoutExpired:
            now = time.perf_counter()
            if now - last >= progress.LOG_EVERY_S:
                last = now
                latest = next((x for x in reversed(tail) if x.strip()), "")
                latest = re.sub(r"^\[[0-9:]+\]\[\w+\] ", "", latest)
                log.info("plan run: elapsed %s%s", progress.format_duration(now - t0),
                         f"; {latest[:200]}" if latest else "")
    reader.join(timeout=5)
    return proc.returncode, list(tail)


def plan_and_run(model_cfg, store: RunStore, exploration_budget: float, target_budget: float, first_budget: float,
                 budget_factor: float, sizes_per_budget: int, size_spread: float, params_key: str,
                 max_rounds: int = 20) -> dict:
    """Run the rounds; returns ``{"rounds": [...], "runs": [ScalingRun], "run_dirs": [path per
    run], "spent": FLOPs, "reused": count}``. Each round records its budget, the sizes trained,
    their losses, the FLOPs it spent and the fitted exponent after it."""
    import numpy as np

    from lmrun.scaling.fits import approach2

    runs: list[ScalingRun] = []
    run_dirs: list[str] = []
    rounds, spent, reused = [], 0.0, 0
    budget = float(first_budget)
    fit = None
    for r in range(max_rounds):
        if budget > target_budget:
            break
        if fit is not None:
            center = float(fit.n_law(budget))
            source = "fitted law"
        else:
            center = math.sqrt(budget / 120.0)  # C = 6·N·D with D = 20·N (Hoffmann et al. 2022)
            source = "20 tokens/parameter"
        sizes = center * np.logspace(-math.log10(size_spread), math.log10(size_spread), sizes_per_budget)
        requests, shapes = [], []  # sizes that map to the same discrete shape are trained once
        for n in sizes:
            target = target_for(model_cfg, float(n))
            if shape_of(model_cfg, target) not in shapes:
                shapes.append(shape_of(model_cfg, target))
                requests.append([f"model.target_params={target}", f"train.max_flops={budget:.6g}"])
        new_cost = sum(budget for o in requests if not _stored(store, o))
        if spent + new_cost > exploration_budget:
            log.info("round %d: budget %.3g would spend %.3g FLOPs (%.3g left): stop", r, budget, new_cost,
                     exploration_budget - spent)
            break
        losses, params = [], []
        for i, overrides in enumerate(requests, 1):
            log.info("round %d: run %d/%d at C=%.3g (%s)", r, i, len(requests), budget,
                     "reused" if _stored(store, overrides) else "training")
            summary, was_reused = store.get(overrides)
            reused += was_reused
            if not was_reused:
                spent += float(summary.get("train_flops", budget))
            runs.append(ScalingRun(float(summary[params_key]), float(summary["tokens"]), budget,
                                   float(summary["val_loss"])))
            run_dirs.append(str((store.root / store.key(overrides)).absolute()))
            losses.append(float(summary["val_loss"]))
            params.append(float(summary[params_key]))
        try:
            fit = approach2(runs)
        except (DataError, ValueError):
            fit = None
        rounds.append({"round": r, "budget": budget, "center": center, "center_from": source,
                       "sizes": [float(s) for s in sizes], "parameters": params, "losses": losses, "spent_after": spent,
                       "a": None if fit is None else fit.n_law.a})
        log.info("round %d: C=%.3g, %d sizes around N=%.3g (%s); spent %.3g of %.3g FLOPs; a=%s", r, budget,
                 len(requests), center, source, spent, exploration_budget, "-" if fit is None else f"{fit.n_law.a:.3f}")
        budget *= budget_factor
    return {"rounds": rounds, "runs": runs, "run_dirs": run_dirs, "spent": spent, "reused": reused}


def _stored(store: RunStore, overrides: list[str]) -> bool:
    info = store.root / store.key(overrides) / "run.json"
    return info.exists() and json.loads(info.read_text()).get("status") == "completed"
