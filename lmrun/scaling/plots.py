"""Scaling-law figures (matplotlib, PNG, written atomically)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from lmrun.scaling.data import ScalingRun, budgets
from lmrun.tracking.files import save_figure


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    return plt, fig, ax


def plot_isoflop_profiles(runs: list[ScalingRun], points: list, out: Path) -> None:
    """Loss against N for each budget, the fitted parabola in log N and its minimum.
    ``points``: approach 2's ``(C, N_opt, L_opt, coefficients)``."""
    plt, fig, ax = _figure()
    coefs = {round(math.log10(p[0]), 3): p for p in points}
    cmap = plt.get_cmap("viridis")
    groups = budgets(runs)
    for i, (c, group) in enumerate(groups):
        color = cmap(i / max(1, len(groups) - 1))
        n = np.array([r.parameters for r in group])
        ax.scatter(n, [r.loss for r in group], color=color, s=14, label=f"C = {c:.1e}")
        p = coefs.get(round(math.log10(c), 3))
        if p is not None:
            xs = np.linspace(np.log(n.min()), np.log(n.max()), 100)
            ax.plot(np.exp(xs), np.polyval(p[3], xs), color=color, lw=1)
            ax.scatter([p[1]], [p[2]], color=color, marker="*", s=90, edgecolor="k", zorder=3)
    ax.set_xscale("log")
    ax.set_xlabel("parameters N")
    ax.set_ylabel("final loss")
    ax.set_title("IsoFLOP profiles (approach 2): parabolas in log N, minima starred")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    save_figure(fig, out)


def plot_allocation(fits: dict, grid: list[float], quantity: str, points: dict, out: Path) -> None:
    """N_opt or D_opt (``quantity`` "n_opt"/"d_opt") against compute for each approach: the
    fitted law over ``grid`` with its bootstrap band, and the per-budget optima it was fitted
    to (``points``: approach -> [(C, value)])."""
    plt, fig, ax = _figure()
    for name, result in fits.items():
        preds = result["grid"]
        c = np.array([p["compute"] for p in preds])
        mid = np.array([p[quantity][0] for p in preds])
        lo = np.array([p[quantity][1] for p in preds])
        hi = np.array([p[quantity][2] for p in preds])
        line, = ax.plot(c, mid, label=f"approach {name}")
        ax.fill_between(c, lo, hi, color=line.get_color(), alpha=0.2)
        if points.get(name):
            ax.scatter(*zip(*points[name]), color=line.get_color(), s=16)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("compute C (FLOPs)")
    ax.set_ylabel({"n_opt": "compute-optimal parameters N_opt", "d_opt": "compute-optimal tokens D_opt"}[quantity])
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    save_figure(fig, out)


def plot_loss_vs_compute(runs: list[ScalingRun], fits: dict, out: Path) -> None:
    """Every run's final loss against its compute, and each approach's predicted optimal loss."""
    plt, fig, ax = _figure()
    ax.scatter([r.compute for r in runs], [r.loss for r in runs], s=10, color="0.6", label="runs")
    for name, result in fits.items():
        preds = result["grid"]
        c = np.array([p["compute"] for p in preds])
        line, = ax.plot(c, [p["loss"][0] for p in preds], label=f"approach {name}")
        ax.fill_between(c, [p["loss"][1] for p in preds], [p["loss"][2] for p in preds], color=line.get_color(),
                        alpha=0.2)
    ax.set_xscale("log")
    ax.set_xlabel("compute C (FLOPs)")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    save_figure(fig, out)
