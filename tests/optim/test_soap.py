"""SOAP: lowers the loss; 1-D parameters get exactly AdamW; with diagonal gradients (whose Shampoo
eigenbasis is a signed permutation) it is exactly Adam from its second step on, across basis
refreshes; a dimension over max_precond_dim is left unrotated; state keeps orthogonal bases."""
from __future__ import annotations

import math

import pytest
import torch

from lmrun.optim import SOAP, AdamW

from .helpers import MLP, regression_data, train_regression


def test_lowers_regression_loss():
    torch.manual_seed(0)
    model = MLP(dtype=torch.float32)
    x, y = regression_data(dtype=torch.float32)
    opt = SOAP(model.parameters(), lr=1e-2, precondition_frequency=5)
    losses = train_regression(model, opt, x, y)
    assert losses[-1] < 0.3 * losses[0], losses[::10]
    for Q in opt.state[model.fc2.weight]["Q"]:
        torch.testing.assert_close(Q.T @ Q, torch.eye(Q.shape[0]), atol=1e-4, rtol=0)


def test_vectors_get_adamw_and_first_matrix_step_only_preconditions():
    torch.manual_seed(0)
    v, m = torch.nn.Parameter(torch.randn(7)), torch.nn.Parameter(torch.randn(5, 3))
    v_ref = torch.nn.Parameter(v.detach().clone())
    m0 = m.detach().clone()
    kw = {"lr": 1e-2, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}
    soap, adamw = SOAP([v, m], **kw), AdamW([v_ref], **kw)
    for step in range(6):
        g = torch.randn(7)
        v.grad, v_ref.grad, m.grad = g.clone(), g.clone(), torch.randn(5, 3)
        soap.step()
        adamw.step()
        torch.testing.assert_close(v, v_ref, rtol=0, atol=0)
        if step == 0:
            assert torch.equal(m.detach(), m0)  # statistics and basis only
            assert soap.state[m]["step"] == 0
    assert not torch.equal(m.detach(), m0) and soap.state[m]["step"] == 5


@pytest.mark.parametrize("frequency", [1, 3, 100])
def test_diagonal_gradients_give_exact_adam(frequency):
    """diag gradients: GGᵀ and GᵀG are diagonal, the eigenbases signed permutations, so Adam in
    the rotated basis is elementwise Adam (the paper's bias correction: lr·√(1-β₂ᵗ)/(1-β₁ᵗ))."""
    n, lr, b1, b2, eps, wd = 6, 1e-2, 0.9, 0.95, 1e-8, 0.05
    g = torch.Generator().manual_seed(0)
    grads = [torch.diag(torch.rand(n, generator=g, dtype=torch.float64) + 0.1) for _ in range(30)]
    p = torch.nn.Parameter(torch.randn(n, n, generator=g, dtype=torch.float64))
    expected = p.detach().clone()
    opt = SOAP([p], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, precondition_frequency=frequency)
    m = torch.zeros(n, n, dtype=torch.float64)
    v = torch.zeros(n, n, dtype=torch.float64)
    for i, grad in enumerate(grads):
        p.grad = grad.clone()
        opt.step()
        if i == 0:
            continue
        t = i
        m = b1 * m + (1 - b1) * grad
        v = b2 * v + (1 - b2) * grad ** 2
        expected = expected * (1 - lr * wd) - lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t) * m / (v.sqrt() + eps)
        # atol: eigh leaves ~1e-17 off-diagonal noise, which eps turns into ~1e-11 updates
        torch.testing.assert_close(p.detach(), expected, rtol=1e-7, atol=1e-8, msg=f"step {i}")


def test_large_dimension_left_unrotated():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(50, 4))
    opt = SOAP([p], max_precond_dim=10)
    for _ in range(3):
        p.grad = torch.randn(50, 4)
        opt.step()
    L, R = opt.state[p]["GG"]
    assert L is None and R.shape == (4, 4) and opt.state[p]["Q"][0] is None
    q = torch.nn.Parameter(torch.randn(50, 40))
    opt = SOAP([q], max_precond_dim=10)  # both sides too large: AdamW
    q.grad = torch.randn(50, 40)
    opt.step()
    assert set(opt.state[q]) == {"step", "exp_avg", "exp_avg_sq"} and opt.state[q]["step"] == 1


def test_bad_hyperparameters():
    p = [torch.nn.Parameter(torch.zeros(2, 2))]
    for kw in ({"precondition_frequency": 0}, {"shampoo_beta": 1.0}, {"max_precond_dim": 0}, {"lr": -1}):
        with pytest.raises(ValueError):
            SOAP(p, **kw)
