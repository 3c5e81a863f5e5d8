from __future__ import annotations

import math

import pytest
import torch

from lmrun.train.noise_scale import (
    GradientNoiseScale,
    grad_sq_norm,
    noise_scale_estimates,
)


def test_exact_expectations_recover_b_simple():
    g_sq, trace = 4.0, 400.0  # B_simple = 100
    small = g_sq + trace / 8
    big = g_sq + trace / 256
    assert noise_scale_estimates(small, 8, big, 256) == pytest.approx((g_sq, trace))
    est = GradientNoiseScale(ema_decay=0.9)
    assert math.isnan(est.b_simple) and math.isnan(est.g_sq)
    for _ in range(3):
        assert est.update(small, 8, big, 256) == pytest.approx(100.0)
    assert est.g_sq == pytest.approx(g_sq) and est.trace == pytest.approx(trace)  # bias-corrected


def test_synthetic_gradients_recover_b_simple():
    """Batch gradients G_B = G + N(0, Σ/B) with known |G|² = 4 and tr(Σ) = 400 (B_simple = 100)."""
    gen = torch.Generator().manual_seed(0)
    dim = 1000
    G = torch.randn(dim, generator=gen, dtype=torch.float64)
    G = G / G.norm() * 2.0
    sigma2 = torch.rand(dim, generator=gen, dtype=torch.float64)
    sigma2 = sigma2 / sigma2.sum() * 400.0

    def batch_grad(b):
        return G + (sigma2 / b).sqrt() * torch.randn(dim, generator=gen, dtype=torch.float64)

    est = GradientNoiseScale(ema_decay=0.99)
    for _ in range(600):
        est.update(batch_grad(8).square().sum().item(), 8, batch_grad(256).square().sum().item(), 256)
    assert est.g_sq == pytest.approx(4.0, rel=0.05)
    assert est.trace == pytest.approx(400.0, rel=0.05)
    assert est.b_simple == pytest.approx(100.0, rel=0.1)


def test_state_round_trip_and_errors():
    est = GradientNoiseScale(0.9)
    est.update(60.0, 8, 6.0, 256)
    est.update(50.0, 8, 5.0, 256)
    other = GradientNoiseScale()
    other.load_state_dict(est.state_dict())
    assert other.update(55.0, 8, 5.5, 256) == est.update(55.0, 8, 5.5, 256)
    assert est.update(float("nan"), 8, 1.0, 256) == est.b_simple and est.count == 3  # skipped
    with pytest.raises(ValueError, match="b_small < b_big"):
        est.update(1.0, 8, 1.0, 8)
    with pytest.raises(ValueError):
        GradientNoiseScale(1.0)
    negative = GradientNoiseScale()
    negative.update(100.0, 8, 1.0, 256)  # |G|² estimate < 0: no meaningful ratio yet
    assert math.isnan(negative.b_simple)


def test_grad_sq_norm_and_accumulation_recipe():
    """The module docstring's recipe: with k micro-batches whose losses are scaled by 1/k,
    k²·|grad after the first micro-batch|² is that micro-batch's mean-gradient norm², and the
    accumulated grad's norm² is the full batch's."""
    gen = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    x, y = torch.randn(12, 5, generator=gen), torch.randn(12, 1, generator=gen)
    k, b = 3, 4

    def mean_grad_sq(xs, ys):
        model.zero_grad()
        torch.nn.functional.mse_loss(model(xs), ys).backward()
        return sum(p.grad.square().sum().item() for p in model.parameters())

    expected_small, expected_big = mean_grad_sq(x[:b], y[:b]), mean_grad_sq(x, y)
    model.zero_grad()
    for i in range(k):
        (torch.nn.functional.mse_loss(model(x[i * b:(i + 1) * b]), y[i * b:(i + 1) * b]) / k).backward()
        if i == 0:
            small = k ** 2 * grad_sq_norm(model.parameters())
    big = grad_sq_norm(model.parameters())
    assert small == pytest.approx(expected_small, rel=1e-5)
    assert big == pytest.approx(expected_big, rel=1e-5)
    assert grad_sq_norm([torch.nn.Parameter(torch.ones(2))]) == 0.0  # no grads yet
