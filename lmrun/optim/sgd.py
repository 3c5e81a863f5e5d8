"""SGD with (heavy-ball or Nesterov) momentum and L2 weight decay — the baseline optimizer
(Polyak 1964; Sutskever et al. 2013 for the Nesterov form used here).

Written to match ``torch.optim.SGD`` step for step.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch

from lmrun.optim.base import GroupOptimizer


class SGD(GroupOptimizer):
    """``SGD(params, lr=1e-3, momentum=0, dampening=0, weight_decay=0, nesterov=False)``.

    Per step, with ``g`` the gradient: ``g ← g + wd·p`` (L2, coupled, as torch); with momentum,
    ``b ← g`` on the first step and ``b ← μb + (1 - dampening)g`` after, then ``g ← g + μb``
    (nesterov) or ``g ← b``; finally ``p ← p - lr·g``. State: ``momentum_buffer`` (like ``p``)
    when momentum > 0. Raises ValueError for negative hyperparameters, or nesterov without
    momentum or with dampening.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False):
        for name, v in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay)):
            if not v >= 0:
                raise ValueError(f"invalid {name} {v}: expected >= 0")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum > 0 and zero dampening")
        super().__init__(params, {"lr": lr, "momentum": momentum, "dampening": dampening, "weight_decay": weight_decay,
                                      "nesterov": nesterov})

    def update_group(self, group: dict) -> None:
        """Update every parameter of ``group`` that has a gradient (called by ``step``)."""
        mu, damp, wd = group["momentum"], group["dampening"], group["weight_decay"]
        for p in group["params"]:
            if p.grad is None:
                continue
            d_p = p.grad
            if wd != 0:
                d_p = d_p.add(p, alpha=wd)
            if mu != 0:
                state = self.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = torch.clone(d_p).detach()
                else:
                    buf.mul_(mu).add_(d_p, alpha=1 - damp)
                d_p = d_p.add(buf, alpha=mu) if group["nesterov"] else buf
            p.add_(d_p, alpha=-group["lr"])
