"""Config schema of the `scaling` node (``stage=scaling``)."""
from __future__ import annotations

from dataclasses import dataclass, field

from lmrun.errors import check, check_choice


@dataclass
class ScalingConfig:
    """input: a sweep directory of pretrain runs, or a CSV/JSON file with columns parameters,
    final_loss and tokens or compute_budget (e.g. ../shared/data/scaling/isoflops_curves.json).
    approach: "1", "2", "3" or "all" (Hoffmann et al. 2022). predict: target budgets in FLOPs.
    n_boot: bootstrap resamples for the intervals; confidence: their level; seed: the
    resampling seed. boot_starts: L-BFGS-B starts per approach-3 resample (the full data's optima,
    each run to convergence, then random points of the initialisation grid, screened, the best
    run to convergence); null: the whole grid fit for every resample (as slow as n_boot full
    fits). params_key: which parameter count of
    our runs is N (params_non_embedding or params).

    mode: "fit" (fit scaling.input) or "plan" (the budgeted planner, lmrun.scaling.planner):
    spend at most exploration_budget training FLOPs on IsoFLOP rounds starting at first_budget,
    each budget_factor times the last, sizes_per_budget sizes spread size_spread-fold either side
    of the current N_opt estimate, then recommend the model for target_budget. run_overrides:
    plain key=value overrides for every planned pretrain run (e.g. train.batch_size=16)."""

    input: str | None = None
    approach: str = "all"
    predict: list[float] = field(default_factory=lambda: [1e23, 1e24])
    n_boot: int = 200
    confidence: float = 0.95
    seed: int = 0
    boot_starts: int | None = 8
    params_key: str = "params_non_embedding"
    mode: str = "fit"
    exploration_budget: float = 1.0e13
    target_budget: float = 1.0e15
    first_budget: float = 3.0e11
    budget_factor: float = 3.0
    sizes_per_budget: int = 5
    size_spread: float = 4.0
    run_overrides: list[str] = field(default_factory=list)


def validate_scaling(cfg: ScalingConfig, stage: str) -> None:
    check_choice("scaling.mode", cfg.mode, ["fit", "plan"])
    if stage == "scaling" and cfg.mode == "fit":
        check("scaling.input", cfg.input, bool(cfg.input), "a sweep directory or a CSV/JSON file of runs")
    for key in ("exploration_budget", "target_budget", "first_budget"):
        check(f"scaling.{key}", getattr(cfg, key), getattr(cfg, key) > 0, "FLOPs > 0")
    check("scaling.budget_factor", cfg.budget_factor, cfg.budget_factor > 1, "a factor > 1")
    check("scaling.sizes_per_budget", cfg.sizes_per_budget, cfg.sizes_per_budget >= 3, "an integer >= 3 (a parabola)")
    check("scaling.size_spread", cfg.size_spread, cfg.size_spread > 1, "a factor > 1")
    for o in cfg.run_overrides:
        check("scaling.run_overrides", o, "=" in o and not o.split("=", 1)[0].lstrip("+~").count("/"),
              "plain key=value overrides (no config-group choices)")
    check_choice("scaling.approach", str(cfg.approach), ["1", "2", "3", "all"])
    check("scaling.predict", list(cfg.predict), all(c > 0 for c in cfg.predict), "a list of positive FLOP budgets")
    check("scaling.n_boot", cfg.n_boot, cfg.n_boot >= 20, "an integer >= 20")
    check("scaling.boot_starts", cfg.boot_starts, cfg.boot_starts is None or cfg.boot_starts >= 1,
          "an integer >= 1, or null (the whole grid per resample)")
    check("scaling.confidence", cfg.confidence, 0 < cfg.confidence < 1, "a level in (0, 1)")
    check_choice("scaling.params_key", cfg.params_key, ["params_non_embedding", "params"])
