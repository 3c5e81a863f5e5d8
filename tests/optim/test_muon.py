"""Muon: Newton–Schulz orthogonalizes (singular values near 1, singular vectors kept); one step
equals the formula; the update RMS is muon_rms under the rms scaling; it lowers the loss of a
regression and of a tiny LM; it refuses non-matrix parameters in Muon groups."""
from __future__ import annotations

import math

import pytest
import torch

from lmrun.optim import Muon, muon_scale, newton_schulz

from .helpers import MLP, regression_data, train_regression


@pytest.mark.parametrize("shape", [(32, 64), (64, 32), (40, 40), (3, 8, 16)])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_newton_schulz_orthogonalizes(shape, dtype):
    g = torch.Generator().manual_seed(0)
    G = torch.randn(shape, generator=g)
    if shape == (40, 40):  # a square Gaussian matrix has tiny singular values: condition it
        U, _, Vh = torch.linalg.svd(G)
        G = U @ torch.diag(torch.logspace(0, -2, 40)) @ Vh
    X = newton_schulz(G, steps=5, dtype=dtype)
    assert X.shape == G.shape and X.dtype == G.dtype
    s = torch.linalg.svdvals(X.float())
    assert s.min() > 0.5 and s.max() < 1.5, (s.min(), s.max())
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    polar = U @ Vh  # the exact orthogonal polar factor
    cos = (X * polar).sum(dim=(-2, -1)) / (X.norm(dim=(-2, -1)) * polar.norm(dim=(-2, -1)))
    assert cos.min() > 0.95
    # the input's spectrum is not what comes out: a badly scaled input gives the same result
    torch.testing.assert_close(newton_schulz(1000 * G, 5, "float32"), newton_schulz(G, 5, "float32"),
                               rtol=1e-4, atol=1e-4)


def test_newton_schulz_needs_a_matrix():
    with pytest.raises(ValueError, match="matrix"):
        newton_schulz(torch.randn(5))


def test_muon_scale():
    assert muon_scale((64, 256), "rms", 0.2) == pytest.approx(0.2 * 16)
    assert muon_scale((256, 64), "spectral") == pytest.approx(2.0)
    assert muon_scale((64, 256), "spectral") == 1.0
    with pytest.raises(ValueError):
        muon_scale((2, 2), "nope")


@pytest.mark.parametrize("nesterov", [True, False])
def test_two_steps_match_the_formula(nesterov):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(16, 24))
    p0 = p.detach().clone()
    g1, g2 = torch.randn(16, 24), torch.randn(16, 24)
    lr, beta, wd = 0.01, 0.9, 0.1
    opt = Muon([p], lr=lr, momentum=beta, nesterov=nesterov, ns_dtype="float32", weight_decay=wd)
    expected, buf = p0.clone(), torch.zeros(16, 24)
    for g in (g1, g2):
        p.grad = g.clone()
        opt.step()
        buf = beta * buf + (1 - beta) * g
        u = (1 - beta) * g + beta * buf if nesterov else buf
        expected = expected * (1 - lr * wd) - lr * 0.2 * math.sqrt(24) * newton_schulz(u, 5, "float32")
        torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(p.grad, g2)  # the gradient is not modified in place


def test_update_rms_matches_target():
    torch.manual_seed(0)
    for shape in [(64, 256), (256, 64), (128, 128)]:
        p = torch.nn.Parameter(torch.zeros(shape))
        p.grad = torch.randn(shape)
        Muon([p], lr=1.0, rms=0.2, ns_dtype="float32").step()
        rms = p.detach().pow(2).mean().sqrt().item()
        assert 0.15 < rms < 0.25, (shape, rms)


def test_lowers_regression_loss_with_adamw_groups():
    torch.manual_seed(0)
    model = MLP(dtype=torch.float32)
    x, y = regression_data(dtype=torch.float32)
    matrices = [p for p in model.parameters() if p.ndim == 2]
    vectors = [p for p in model.parameters() if p.ndim != 2]
    opt = Muon([{"params": matrices}, {"params": vectors, "use_muon": False}], lr=0.02)
    losses = train_regression(model, opt, x, y)
    assert losses[-1] < 0.5 * losses[0], losses[::10]
    assert "exp_avg" in opt.state[model.fc1.bias] and "momentum_buffer" in opt.state[model.fc1.weight]


def test_rejects_vectors_in_muon_groups():
    with pytest.raises(ValueError, match="not 2-D"):
        Muon([torch.nn.Parameter(torch.zeros(4, 4)), torch.nn.Parameter(torch.zeros(4))])
    with pytest.raises(ValueError):
        Muon([torch.nn.Parameter(torch.zeros(4, 4))], ns_dtype="float16")
