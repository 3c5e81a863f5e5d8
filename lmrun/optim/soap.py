"""SOAP: Adam run in the eigenbasis of Shampoo's preconditioner (Vyas et al. 2024, "SOAP:
improving and stabilizing Shampoo using Adam"; Gupta et al. 2018 for Shampoo). Follows the
authors' reference implementation (github.com/nikhilvyas/SOAP) for 2-D parameters.

For a matrix ``W (m, n)`` with gradient ``G``: Shampoo statistics ``L ← βₛL + (1-βₛ)GGᵀ``
``(m, m)`` and ``R ← βₛR + (1-βₛ)GᵀG`` ``(n, n)``; their eigenvectors ``Q_L``, ``Q_R`` (``eigh``
on the first step, then every ``precondition_frequency`` steps one power iteration + QR,
``Q ← qr(S·Q)``). Each step rotates ``G' = Q_Lᵀ G Q_R``, runs Adam there (first moment kept in the
rotated basis and carried over when the basis changes; second moment re-ordered with the
eigenvalues but not rotated, as the paper), and rotates the Adam direction back:
``W ← W·(1 - lr·wd) - lr·√(1-β₂ᵗ)/(1-β₁ᵗ) · Q_L (m'/(√v' + eps)) Q_Rᵀ``.

As the reference, a matrix's first step only initializes the statistics and the basis (no
update), so the basis never depends on the gradient it rotates. A side longer than
``max_precond_dim`` is not rotated (identity), e.g. the vocabulary side of an embedding.
Parameters that are not 2-D (norm gains, biases) and matrices with both sides unrotated get
plain AdamW (``lmrun.optim.adamw.adamw_update``). One difference from the reference: weight
decay is applied before the update, as AdamW, instead of after it.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from lmrun.optim.adamw import adamw_update, check_hyperparameters
from lmrun.optim.base import GroupOptimizer


def _eigenbasis(S: torch.Tensor) -> torch.Tensor:
    """Eigenvectors of the symmetric PSD ``S``, columns by decreasing eigenvalue (``S``'s dtype)."""
    try:
        _, Q = torch.linalg.eigh(S)
    except RuntimeError:  # ill-conditioned in float32
        _, Q = torch.linalg.eigh(S.double())
        Q = Q.to(S.dtype)
    return torch.flip(Q, [1])


def _rotate(x: torch.Tensor, Qs: list[torch.Tensor | None]) -> torch.Tensor:
    """``Q_Lᵀ x Q_R`` (a None side is the identity)."""
    QL, QR = Qs
    if QL is not None:
        x = QL.T @ x
    if QR is not None:
        x = x @ QR
    return x


def _rotate_back(x: torch.Tensor, Qs: list[torch.Tensor | None]) -> torch.Tensor:
    """``Q_L x Q_Rᵀ`` (a None side is the identity)."""
    QL, QR = Qs
    if QL is not None:
        x = QL @ x
    if QR is not None:
        x = x @ QR.T
    return x


class SOAP(GroupOptimizer):
    """``SOAP(params, lr=3e-3, betas=(0.95, 0.95), eps=1e-8, weight_decay=0.01,
    precondition_frequency=10, shampoo_beta=None, max_precond_dim=10000)``.

    ``shampoo_beta`` None: ``betas[1]``. Per-parameter state for a preconditioned matrix:
    ``step`` (int, Adam steps taken), ``exp_avg`` (rotated basis), ``exp_avg_sq`` (rotated
    basis), ``GG`` (``[L or None, R or None]``), ``Q`` (their eigenbases); other parameters
    hold AdamW's state. Statistics are at least float32 whatever the parameter's dtype.
    Raises ValueError for bad hyperparameters.
    """

    def __init__(self, params: Iterable, lr: float = 3e-3, betas: tuple[float, float] = (0.95, 0.95),
                 eps: float = 1e-8, weight_decay: float = 0.01, precondition_frequency: int = 10,
                 shampoo_beta: float | None = None, max_precond_dim: int = 10000):
        check_hyperparameters(lr, betas, eps, weight_decay)
        if precondition_frequency < 1:
            raise ValueError(f"invalid precondition_frequency {precondition_frequency}: expected >= 1")
        if shampoo_beta is not None and not 0 <= shampoo_beta < 1:
            raise ValueError(f"invalid shampoo_beta {shampoo_beta}: expected None or a number in [0, 1)")
        if max_precond_dim < 1:
            raise ValueError(f"invalid max_precond_dim {max_precond_dim}: expected >= 1")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay,
                                      "precondition_frequency": precondition_frequency, "shampoo_beta": shampoo_beta,
                                      "max_precond_dim": max_precond_dim})

    @staticmethod
    def _preconditioned(p: torch.Tensor, max_dim: int) -> bool:
        return p.ndim == 2 and min(p.shape) <= max_dim

    def update_group(self, group: dict) -> None:
        """Update every parameter of ``group`` that has a gradient (called by ``step``)."""
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        sb = group["shampoo_beta"] if group["shampoo_beta"] is not None else beta2
        max_dim = group["max_precond_dim"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not self._preconditioned(p, max_dim):
                adamw_update(p, p.grad, state, lr, beta1, beta2, eps, wd)
                continue
            grad = p.grad.to(torch.promote_types(p.grad.dtype, torch.float32))
            if "Q" not in state:  # first step: statistics and basis only
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(grad)
                state["exp_avg_sq"] = torch.zeros_like(grad)
                state["GG"] = [torch.zeros(s, s, device=grad.device, dtype=grad.dtype) if s <= max_dim else None
                               for s in grad.shape]
                self._update_statistics(grad, state, sb)
                state["Q"] = [_eigenbasis(S) if S is not None else None for S in state["GG"]]
                continue
            g_rot = _rotate(grad, state["Q"])
            exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
            state["step"] += 1
            t = state["step"]
            exp_avg.mul_(beta1).add_(g_rot, alpha=1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(g_rot, g_rot, value=1 - beta2)
            direction = _rotate_back(exp_avg / (exp_avg_sq.sqrt() + eps), state["Q"])
            step_size = lr * math.sqrt(1 - beta2 ** t) / (1 - beta1 ** t)
            if wd != 0:
                p.mul_(1 - lr * wd)
            p.add_(direction.to(p.dtype), alpha=-step_size)
            self._update_statistics(grad, state, sb)
            if t % group["precondition_frequency"] == 0:
                self._refresh_basis(state)

    @staticmethod
    def _update_statistics(grad: torch.Tensor, state: dict, shampoo_beta: float) -> None:
        L, R = state["GG"]
        if L is not None:
            L.lerp_(grad @ grad.T, 1 - shampoo_beta)
        if R is not None:
            R.lerp_(grad.T @ grad, 1 - shampoo_beta)

    @staticmethod
    def _refresh_basis(state: dict) -> None:
        """One power iteration + QR per side; the first moment is carried into the new basis,
        the second moment is permuted to follow the eigenvalue order (Vyas et al. 2024, Alg. 4)."""
        exp_avg = _rotate_back(state["exp_avg"], state["Q"])
        exp_avg_sq = state["exp_avg_sq"]
        new_Q = []
        for dim, (S, Q) in enumerate(zip(state["GG"], state["Q"])):
            if S is None:
                new_Q.append(None)
                continue
            order = torch.argsort(torch.diag(Q.T @ S @ Q), descending=True)
            exp_avg_sq = exp_avg_sq.index_select(dim, order)
            Q_new, _ = torch.linalg.qr(S @ Q[:, order])
            new_Q.append(Q_new)
        state["Q"] = new_Q
        state["exp_avg_sq"] = exp_avg_sq
        state["exp_avg"] = _rotate(exp_avg, new_Q)
