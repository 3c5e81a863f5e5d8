"""The ``step`` shared by lmrun's optimizers: closure handling, then one update per group."""
from __future__ import annotations

from collections.abc import Callable

import torch


class GroupOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` whose subclasses implement ``update_group(group)``.

    ``step(closure=None)`` re-evaluates the loss with ``closure`` (gradients enabled) if given,
    then calls ``update_group`` for every parameter group under ``torch.no_grad()``; returns the
    closure's loss or None."""

    def update_group(self, group: dict) -> None:  # pragma: no cover - abstract
        raise TypeError(f"{type(self).__name__} must define update_group(group)")

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self.update_group(group)
        return loss
