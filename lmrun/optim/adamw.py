"""AdamW: Adam with decoupled weight decay (Loshchilov & Hutter 2019, "Decoupled weight decay
regularization"; Kingma & Ba 2015 for Adam; CS336 assignment 1, Algorithm 2).

Written to match ``torch.optim.AdamW`` (``amsgrad=False``, ``maximize=False``) step for step,
including the order of operations.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch

from lmrun.optim.base import GroupOptimizer


def check_hyperparameters(lr: float, betas: tuple[float, float], eps: float, weight_decay: float) -> None:
    """Raise ValueError for ``lr < 0``, a beta outside [0, 1), ``eps < 0`` or ``weight_decay < 0``."""
    if not lr >= 0:
        raise ValueError(f"invalid learning rate {lr}: expected >= 0")
    for i, b in enumerate(betas):
        if not 0 <= b < 1:
            raise ValueError(f"invalid beta{i + 1} {b}: expected a number in [0, 1)")
    if not eps >= 0:
        raise ValueError(f"invalid eps {eps}: expected >= 0")
    if not weight_decay >= 0:
        raise ValueError(f"invalid weight_decay {weight_decay}: expected >= 0")


@torch.no_grad()
def adamw_update(p: torch.Tensor, grad: torch.Tensor, state: dict, lr: float, beta1: float, beta2: float,
                 eps: float, weight_decay: float) -> None:
    """One AdamW step on ``p`` in place; ``state`` (this parameter's optimizer state) gets
    ``step`` (int), ``exp_avg`` and ``exp_avg_sq`` (shaped like ``p``) on the first call.

    ``p ← p·(1 - lr·wd)``; ``m ← β₁m + (1-β₁)g``; ``v ← β₂v + (1-β₂)g²``;
    ``p ← p - lr/(1-β₁ᵗ) · m / (√v/√(1-β₂ᵗ) + eps)``.
    """
    if not state:
        state["step"] = 0
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    state["step"] += 1
    t = state["step"]
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    if weight_decay != 0:
        p.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    step_size = lr / (1 - beta1 ** t)
    denom = (exp_avg_sq.sqrt() / (1 - beta2 ** t) ** 0.5).add_(eps)
    p.addcdiv_(exp_avg, denom, value=-step_size)


class AdamW(GroupOptimizer):
    """AdamW with bias correction and decoupled weight decay.

    ``AdamW(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)`` — the same
    defaults and update as ``torch.optim.AdamW``. ``params``: parameters or parameter groups
    (dicts that may override any default). Per-parameter state: ``step`` (int), ``exp_avg`` and
    ``exp_avg_sq`` (the moment estimates, shaped like the parameter). Parameters whose ``grad``
    is None are skipped (their step count does not advance).
    Raises ValueError for bad hyperparameters and RuntimeError for sparse gradients.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01):
        check_hyperparameters(lr, betas, eps, weight_decay)
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})

    def update_group(self, group: dict) -> None:
        """Update every parameter of ``group`` that has a gradient (called by ``step``)."""
        beta1, beta2 = group["betas"]
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("AdamW does not support sparse gradients")
            adamw_update(p, p.grad, self.state[p], group["lr"], beta1, beta2, group["eps"], group["weight_decay"])
