"""Muon: momentum orthogonalized by Newton–Schulz, for the hidden 2-D weight matrices, with AdamW
for everything else, in one optimizer (Jordan et al. 2024, "Muon: an optimizer for hidden layers
in neural networks", kellerjordan.github.io/posts/muon; Liu et al. 2025, "Muon is scalable for
LLM training" (Moonlight), for the update-RMS scaling and decoupled weight decay).

For a matrix parameter ``W (m, n)`` with gradient ``G``: ``B ← βB + (1-β)G`` (momentum as an
EMA, as Jordan's reference); ``U = (1-β)G + βB`` (Nesterov) or ``U = B``; ``O = NS(U) ≈ U'V'ᵀ``
(the orthogonal polar factor, from ``U = U'ΣV'ᵀ``); ``W ← W·(1 - lr·wd) - lr·s·O``, where the
scale ``s`` is

- ``rms`` (default): ``s = rms·sqrt(max(m, n))``. ``O``'s singular values are ≈ 1, so its RMS is
  ``sqrt(min(m,n)/(m·n)) = 1/sqrt(max(m, n))``; ``s`` makes the update's RMS ``rms`` (0.2 ≈ AdamW's
  typical update RMS), so Muon can share AdamW's lr and weight decay (Liu et al. 2025, §2.2).
- ``spectral``: ``s = sqrt(max(1, m/n))`` (Jordan's reference; wants lr ≈ 0.02).

Groups with ``use_muon=False`` (embeddings, LM head, norm gains, biases) get AdamW
(``lmrun.optim.adamw.adamw_update``).
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from lmrun.optim.adamw import adamw_update, check_hyperparameters
from lmrun.optim.base import GroupOptimizer

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def newton_schulz(G: torch.Tensor, steps: int = 5, dtype: torch.dtype | str = torch.bfloat16,
                  eps: float = 1e-7) -> torch.Tensor:
    """Approximately orthogonalize ``G (..., m, n)``: returns ``X`` of the same shape and dtype
    whose singular values lie roughly in [0.7, 1.2] and whose singular vectors are ``G``'s.

    Quintic Newton–Schulz iteration ``X ← aX + (bA + cA²)X`` with ``A = XXᵀ`` and
    ``(a, b, c) = (3.4445, -4.7750, 2.0315)`` (Jordan et al. 2024: chosen to maximize the slope at 0
    so small singular values grow fast, trading exact convergence to 1 for speed), starting from
    ``G/‖G‖_F`` (all singular values <= 1), computed in ``dtype`` (bfloat16 | float32) on the
    wide orientation (``m <= n``) so ``A`` is the smaller Gram matrix. Raises ValueError if
    ``G.ndim < 2``.
    """
    if G.ndim < 2:
        raise ValueError(f"newton_schulz needs a matrix (ndim >= 2), got shape {tuple(G.shape)}")
    dtype = _DTYPES[dtype] if isinstance(dtype, str) else dtype
    a, b, c = NS_COEFFICIENTS
    X = G.to(dtype)
    tall = G.size(-2) > G.size(-1)
    if tall:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    if tall:
        X = X.mT
    return X.to(G.dtype)


def muon_scale(shape: torch.Size | tuple[int, ...], scale: str = "rms", rms: float = 0.2) -> float:
    """The factor the orthogonalized update of a ``(m, n)`` matrix is multiplied by:
    ``rms·sqrt(max(m, n))`` (``rms``; Liu et al. 2025) or ``sqrt(max(1, m/n))`` (``spectral``;
    Jordan et al. 2024)."""
    m, n = shape[-2], shape[-1]
    if scale == "rms":
        return rms * math.sqrt(max(m, n))
    if scale == "spectral":
        return math.sqrt(max(1.0, m / n))
    raise ValueError(f"muon scale {scale!r}: expected rms or spectral")


class Muon(GroupOptimizer):
    """Muon for groups with ``use_muon=True`` (2-D parameters only), AdamW for the others.

    ``Muon(params, lr=1e-3, momentum=0.95, nesterov=True, ns_steps=5, ns_dtype="bfloat16",
    scale="rms", rms=0.2, weight_decay=0.0, betas=(0.9, 0.95), eps=1e-8, use_muon=True)``;
    ``params`` are parameters or groups (dicts overriding any default; build them with
    ``lmrun.optim.build_optimizer``). Muon groups use lr, momentum, nesterov, ns_steps, ns_dtype,
    scale, rms, weight_decay (decoupled); AdamW groups use lr, betas, eps, weight_decay.
    State: ``momentum_buffer`` (like the matrix) for Muon parameters, AdamW's state otherwise.
    Raises ValueError for a Muon group holding a parameter that is not 2-D, or bad hyperparameters.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, momentum: float = 0.95, nesterov: bool = True,
                 ns_steps: int = 5, ns_dtype: str = "bfloat16", scale: str = "rms", rms: float = 0.2,
                 weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                 use_muon: bool = True):
        check_hyperparameters(lr, betas, eps, weight_decay)
        if not 0 <= momentum < 1:
            raise ValueError(f"invalid momentum {momentum}: expected a number in [0, 1)")
        if ns_steps < 1:
            raise ValueError(f"invalid ns_steps {ns_steps}: expected >= 1")
        if ns_dtype not in _DTYPES:
            raise ValueError(f"invalid ns_dtype {ns_dtype!r}: expected bfloat16 or float32")
        muon_scale((1, 1), scale, rms)  # validates the scale name
        defaults = {"lr": lr, "momentum": momentum, "nesterov": nesterov, "ns_steps": ns_steps, "ns_dtype": ns_dtype,
                        "scale": scale, "rms": rms, "weight_decay": weight_decay, "betas": tuple(betas), "eps": eps,
                        "use_muon": use_muon}
        super().__init__(params, defaults)
        for group in self.param_groups:
            if group["use_muon"]:
                bad = [tuple(p.shape) for p in group["params"] if p.ndim != 2]
                if bad:
                    raise ValueError(f"Muon group holds parameters that are not 2-D (shapes {bad}); "
                                     f"put them in a group with use_muon=False")

    def update_group(self, group: dict) -> None:
        """Update every parameter of ``group`` that has a gradient (called by ``step``)."""
        lr, wd = group["lr"], group["weight_decay"]
        if not group["use_muon"]:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is not None:
                    adamw_update(p, p.grad, self.state[p], lr, beta1, beta2, group["eps"], wd)
            return
        beta = group["momentum"]
        for p in group["params"]:
            if p.grad is None:
                continue
            grad = p.grad
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(grad)
            buf = state["momentum_buffer"]
            buf.lerp_(grad, 1 - beta)
            update = torch.lerp(grad, buf, beta) if group["nesterov"] else buf
            ortho = newton_schulz(update, group["ns_steps"], group["ns_dtype"])
            if wd != 0:
                p.mul_(1 - lr * wd)
            p.add_(ortho, alpha=-lr * muon_scale(p.shape, group["scale"], group["rms"]))
