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
    resampling seed. params_key: which parameter count of our runs is N (params_non_embedding or
    params)."""

    input: str | None = None
    approach: str = "all"
    predict: list[float] = field(default_factory=lambda: [1e23, 1e24])
    n_boot: int = 200
    confidence: float = 0.95
    seed: int = 0
    params_key: str = "params_non_embedding"


def validate_scaling(cfg: ScalingConfig, stage: str) -> None:
    if stage == "scaling":
        check("scaling.input", cfg.input, bool(cfg.input), "a sweep directory or a CSV/JSON file of runs")
    check_choice("scaling.approach", str(cfg.approach), ["1", "2", "3", "all"])
    check("scaling.predict", list(cfg.predict), all(c > 0 for c in cfg.predict), "a list of positive FLOP budgets")
    check("scaling.n_boot", cfg.n_boot, cfg.n_boot >= 20, "an integer >= 20")
    check("scaling.confidence", cfg.confidence, 0 < cfg.confidence < 1, "a level in (0, 1)")
    check_choice("scaling.params_key", cfg.params_key, ["params_non_embedding", "params"])
