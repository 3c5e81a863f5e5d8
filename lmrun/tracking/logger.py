"""The `logger` group: where metrics go besides ``metrics.jsonl`` (always written).

``wandb`` (default): Weights & Biases, ``mode: offline`` by default with its files inside the
run directory; ``logger.mode=online`` on a cluster with network. ``none``: metrics files only.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from lmrun.errors import check_choice


@dataclass
class LoggerConfig:
    """name: wandb | none; mode: wandb's mode (offline, online, disabled);
    project/entity/group/tags: wandb run attributes."""

    name: str = "wandb"
    mode: str = "offline"
    project: str = "lmrun"
    entity: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)


def validate_logger(cfg: LoggerConfig) -> None:
    check_choice("logger.name", cfg.name, ["wandb", "none"])
    check_choice("logger.mode", cfg.mode, ["offline", "online", "disabled"])
