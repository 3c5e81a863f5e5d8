"""Gradient clipping by the global L2 norm (CS336 assignment 1; Pascanu et al. 2013)."""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch


@torch.no_grad()
def clip_grad_norm(parameters: Iterable[torch.nn.Parameter] | torch.Tensor, max_norm: float,
                   eps: float = 1e-6) -> float:
    """Scale every gradient in place so that their global L2 norm is at most ``max_norm``.

    The total norm is ``‖(‖g₁‖₂, ‖g₂‖₂, …)‖₂`` over the parameters whose ``grad`` is not None
    (computed in at least float32). If ``max_norm/(total + eps) < 1`` every gradient is
    multiplied by that factor — the same rule and result as ``torch.nn.utils.clip_grad_norm_``.
    Returns the total norm before clipping as a float (0.0 without gradients). A non-finite
    total (inf/NaN) is returned as is and nothing is scaled: the caller decides (skip the step,
    stop the run). Raises ValueError if ``max_norm <= 0``.
    """
    if not max_norm > 0:
        raise ValueError(f"max_norm {max_norm}: expected a number > 0")
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return 0.0
    device = grads[0].device
    norms = [torch.linalg.vector_norm(g, dtype=torch.promote_types(g.dtype, torch.float32)).to(device, torch.float64)
             for g in grads]
    total = torch.linalg.vector_norm(torch.stack(norms)).item()
    if not math.isfinite(total):
        return total
    coef = max_norm / (total + eps)
    if coef < 1.0:
        for g in grads:
            g.mul_(coef)
    return total
