"""The simple gradient noise scale ``B_simple = tr(Σ) / |G|²`` (McCandlish et al. 2018, "An
Empirical Model of Large-Batch Training", section 2.2 and appendix A.1).

``G`` is the true gradient and ``Σ`` the per-example gradient covariance. The gradient of a batch
of ``B`` examples, ``G_B``, satisfies ``E|G_B|² = |G|² + tr(Σ)/B``, so squared norms measured at
two batch sizes ``B_small < B_big`` give unbiased estimates of both terms:

    |G|²  ≈ (B_big·|G_big|² - B_small·|G_small|²) / (B_big - B_small)
    tr(Σ) ≈ (|G_small|² - |G_big|²) / (1/B_small - 1/B_big)

Each step's estimates are very noisy (the |G|² one is often negative), so, as in the paper, the
two are smoothed separately with exponential moving averages and ``B_simple`` is the ratio of
the averages, not an average of ratios. ``B_simple`` approximates the critical batch size: below
it, doubling the batch nearly halves the steps needed; above it, returns diminish.

Getting the two norms in a trainer (norms of the gradient of the *mean* loss, measured before
gradient clipping; every ``n`` steps is enough):

* Gradient accumulation, ``k >= 2`` micro-batches of ``b`` examples, each micro-batch's loss
  scaled by ``1/k``: after the first micro-batch's backward ``p.grad = g_1/k``, so
  ``small_sq = k² · grad_sq_norm(params)`` with ``B_small = b``; after all ``k``, ``p.grad`` is the
  mean gradient: ``big_sq = grad_sq_norm(params)`` with ``B_big = k·b``.
* Data parallel (the paper's way), ``W >= 2`` ranks: ``small_sq`` is the local accumulated
  gradient's squared norm before the all-reduce (``B_small = k·b``), ``big_sq`` the all-reduced
  one's (``B_big = W·k·b``); average ``small_sq`` over ranks for a less noisy, still unbiased
  estimate.

``B_simple`` comes out in the unit ``B`` is counted in: count tokens (sequences × context length)
to compare it with token batch sizes. Only squared norms are needed, never per-example gradients.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch

__all__ = ["GradientNoiseScale", "grad_sq_norm", "noise_scale_estimates"]


def grad_sq_norm(parameters: Iterable[torch.nn.Parameter]) -> float:
    """``Σ_p |p.grad|²`` over parameters that have a gradient, accumulated in float32 (float64 for
    float64 grads) and returned as a Python float (one device synchronisation)."""
    total = None
    for p in parameters:
        if p.grad is None:
            continue
        g = p.grad.detach()
        sq = g.float().square().sum() if g.dtype != torch.float64 else g.square().sum()
        total = sq if total is None else total + sq.to(total.device)
    return 0.0 if total is None else float(total)


def noise_scale_estimates(small_sq: float, b_small: float, big_sq: float, b_big: float) -> tuple[float, float]:
    """One step's unbiased estimates ``(|G|², tr(Σ))`` from the squared gradient norms at two batch
    sizes (McCandlish et al. 2018, appendix A.1). Raises ValueError unless ``0 < b_small < b_big``."""
    if not 0 < b_small < b_big:
        raise ValueError(f"b_small={b_small}, b_big={b_big}: expected 0 < b_small < b_big")
    g_sq = (b_big * big_sq - b_small * small_sq) / (b_big - b_small)
    trace = (small_sq - big_sq) / (1.0 / b_small - 1.0 / b_big)
    return g_sq, trace


class GradientNoiseScale:
    """Running estimate of the simple gradient noise scale ``B_simple = tr(Σ)/|G|²``.

    Args:
        ema_decay: weight of the past in the moving averages of ``|G|²`` and ``tr(Σ)`` (default 0.95;
            higher is smoother but slower to follow a changing noise scale). The averages are bias-corrected
            like Adam's moments, so early values are not pulled toward zero.

    ``update(small_sq, b_small, big_sq, b_big)`` feeds one measurement (squared norms of the mean
    gradient over ``b_small`` and ``b_big`` examples; see the module docstring for how a trainer
    gets them) and returns the current ``b_simple``. Attributes/properties: ``g_sq`` (|G|²),
    ``trace`` (tr Σ), ``b_simple`` (nan until the smoothed |G|² is positive), ``count``.
    ``state_dict()``/``load_state_dict()`` for checkpoints (plain floats and ints).
    """

    def __init__(self, ema_decay: float = 0.95):
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay={ema_decay}: expected 0 <= ema_decay < 1")
        self.ema_decay = float(ema_decay)
        self._g_sq = 0.0
        self._trace = 0.0
        self.count = 0

    def update(self, small_sq: float, b_small: float, big_sq: float, b_big: float) -> float:
        g_sq, trace = noise_scale_estimates(float(small_sq), b_small, float(big_sq), b_big)
        if not (math.isfinite(g_sq) and math.isfinite(trace)):
            return self.b_simple  # skip a non-finite measurement (e.g. an overflowing step)
        d = self.ema_decay
        self._g_sq = d * self._g_sq + (1 - d) * g_sq
        self._trace = d * self._trace + (1 - d) * trace
        self.count += 1
        return self.b_simple

    def _correction(self) -> float:
        return 1.0 - self.ema_decay ** self.count if self.count else math.nan

    @property
    def g_sq(self) -> float:
        """Smoothed, bias-corrected estimate of ``|G|²`` (nan before the first update)."""
        return self._g_sq / self._correction()

    @property
    def trace(self) -> float:
        """Smoothed, bias-corrected estimate of ``tr(Σ)`` (nan before the first update)."""
        return self._trace / self._correction()

    @property
    def b_simple(self) -> float:
        """``tr(Σ)/|G|²`` from the smoothed estimates (the bias corrections cancel); nan while the
        smoothed ``|G|²`` is not positive."""
        if self.count == 0 or self._g_sq <= 0:
            return math.nan
        return self._trace / self._g_sq

    def state_dict(self) -> dict:
        return {"ema_decay": self.ema_decay, "g_sq": self._g_sq, "trace": self._trace, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.ema_decay = float(state["ema_decay"])
        self._g_sq, self._trace, self.count = float(state["g_sq"]), float(state["trace"]), int(state["count"])
