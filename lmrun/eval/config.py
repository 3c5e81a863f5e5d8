"""Config schema of the `evaluate` node (``stage=evaluate``)."""
from __future__ import annotations

from dataclasses import dataclass

from lmrun.errors import check, check_choice


@dataclass
class EvaluateConfig:
    """checkpoint: a checkpoint file, or a pretrain run directory (its latest checkpoint).
    split: which split of the data preset to score (val, train or both).
    max_tokens: score only the first N tokens of each split (null: all).
    batch_size: sequences per forward pass. device: auto, cpu or cuda."""

    checkpoint: str | None = None
    split: str = "val"
    max_tokens: int | None = None
    batch_size: int = 16
    device: str = "auto"


def validate_evaluate(cfg: EvaluateConfig, stage: str) -> None:
    if stage == "evaluate":
        check("evaluate.checkpoint", cfg.checkpoint, bool(cfg.checkpoint),
              "a checkpoint file or a pretrain run directory (required with stage=evaluate)")
    check_choice("evaluate.split", cfg.split, ["val", "train", "both"])
    check("evaluate.batch_size", cfg.batch_size, cfg.batch_size >= 1, "an integer >= 1")
    check_choice("evaluate.device", cfg.device, ["auto", "cpu", "cuda"])
    if cfg.max_tokens is not None:
        check("evaluate.max_tokens", cfg.max_tokens, cfg.max_tokens >= 2, "null or an integer >= 2")
