from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmrun.train.loss import cross_entropy, cross_entropy_with_z, linear_cross_entropy, logsumexp, z_loss


def _reference(logits, targets, ignore_index=-100, reduction="mean"):
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=ignore_index, reduction=reduction)


def _grads(fn, logits, targets, **kw):
    x = logits.detach().clone().requires_grad_()
    loss = fn(x, targets, **kw)
    loss.backward()
    return loss.detach(), x.grad


@pytest.mark.parametrize("shape", [(7, 11), (2, 5, 13), (2, 3, 4, 9)])
def test_matches_torch_value_and_gradient(shape):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(*shape, generator=g) * 3
    targets = torch.randint(0, shape[-1], shape[:-1], generator=g)
    ours, g_ours = _grads(cross_entropy, logits, targets)
    ref, g_ref = _grads(_reference, logits, targets)
    assert ours.shape == ()
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("scale", [1e4, 1e30])
def test_large_logits_are_stable(scale):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 4, 17, generator=g) * scale
    targets = torch.randint(0, 17, (6, 4), generator=g)
    ours, g_ours = _grads(cross_entropy, logits, targets)
    ref, g_ref = _grads(_reference, logits, targets)
    assert torch.isfinite(ours) and torch.isfinite(g_ours).all()
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-5, atol=1e-7)


def test_huge_equal_logits_give_log_vocab():
    """All logits 1e30: naive exp overflows; the answer is log(V) for every position."""
    logits = torch.full((3, 8), 1e30)
    targets = torch.tensor([0, 3, 7])
    torch.testing.assert_close(cross_entropy(logits, targets), torch.tensor(8.0).log())


def test_ignore_index_and_reductions():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(4, 6, 10, generator=g)
    targets = torch.randint(0, 10, (4, 6), generator=g)
    targets[0, :3] = -100
    targets[2, 5] = -100
    ours, g_ours = _grads(cross_entropy, logits, targets)
    ref, g_ref = _grads(_reference, logits, targets)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-5, atol=1e-7)
    assert (g_ours[0, :3] == 0).all() and (g_ours[2, 5] == 0).all()

    torch.testing.assert_close(cross_entropy(logits, targets, reduction="sum"),
                               _reference(logits, targets, reduction="sum"), rtol=1e-6, atol=1e-5)
    per_token = cross_entropy(logits, targets, reduction="none")
    assert per_token.shape == (4, 6)
    assert (per_token[targets == -100] == 0).all()
    torch.testing.assert_close(per_token.reshape(-1), _reference(logits, targets, reduction="none"))

    other = torch.where(targets == -100, torch.tensor(-1), targets)  # another ignore value
    torch.testing.assert_close(cross_entropy(logits, other, ignore_index=-1), ref)


def test_all_ignored_is_nan_like_torch():
    logits = torch.randn(3, 5)
    targets = torch.full((3,), -100)
    assert torch.isnan(cross_entropy(logits, targets)) and torch.isnan(_reference(logits, targets))


def test_bf16_logits_accumulate_in_float32():
    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(64, 300, generator=g) * 5).to(torch.bfloat16)
    targets = torch.randint(0, 300, (64,), generator=g)
    x = logits.clone().requires_grad_()
    loss = cross_entropy(x, targets)
    loss.backward()
    assert loss.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    # exact reference: the same bf16 values, upcast, in float64
    ref64 = F.cross_entropy(logits.double(), targets)
    torch.testing.assert_close(loss.double(), ref64, rtol=1e-6, atol=1e-6)
    x64 = logits.double().requires_grad_()
    F.cross_entropy(x64, targets).backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-2, atol=1e-5)


def test_z_loss_by_formula_and_gradient():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 5, 7, generator=g) * 4
    targets = torch.randint(0, 7, (3, 5), generator=g)
    targets[1, 2] = -100
    mask = targets != -100
    lse = torch.log(torch.exp(logits.double()).sum(-1))
    expected_z = (lse[mask] ** 2).mean()
    torch.testing.assert_close(z_loss(logits, mask).double(), expected_z, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(z_loss(logits).double(), (lse ** 2).mean(), rtol=1e-5, atol=1e-6)

    # combined: same values, and the gradient of ce + w*z matches autograd through the formula
    w = 0.3
    x = logits.clone().requires_grad_()
    ce, z = cross_entropy_with_z(x, targets, z_weight=w)
    torch.testing.assert_close(ce, _reference(logits, targets), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(z.double(), expected_z, rtol=1e-5, atol=1e-6)
    (ce + w * z).backward()
    x_ref = logits.double().requires_grad_()
    lse_ref = torch.logsumexp(x_ref, -1)
    ref_total = F.cross_entropy(x_ref.reshape(-1, 7), targets.reshape(-1)) + w * (lse_ref[mask] ** 2).mean()
    ref_total.backward()
    torch.testing.assert_close(x.grad.double(), x_ref.grad, rtol=1e-5, atol=1e-7)


def test_z_weight_zero_detaches_z():
    x = torch.randn(4, 5, requires_grad=True)
    ce, z = cross_entropy_with_z(x, torch.tensor([0, 1, 2, 3]), z_weight=0.0)
    assert ce.requires_grad and not z.requires_grad


def test_logsumexp_stable():
    x = torch.tensor([[1e30, 1e30], [-1e30, 0.0], [1.0, 2.0]])
    out = logsumexp(x)
    torch.testing.assert_close(out, torch.logsumexp(x, -1))
    assert logsumexp(torch.full((2, 3), float("-inf"))).eq(float("-inf")).all()


def test_bad_input():
    with pytest.raises(ValueError, match="same leading shape"):
        cross_entropy(torch.randn(3, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        cross_entropy(torch.randn(3, 4), torch.zeros(3))
    with pytest.raises(ValueError, match="reduction"):
        cross_entropy(torch.randn(3, 4), torch.zeros(3, dtype=torch.long), reduction="avg")


def test_float64_logits_stay_float64():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(5, 9, 31, generator=g, dtype=torch.float64) * 10
    targets = torch.randint(0, 31, (5, 9), generator=g)
    ours, g_ours = _grads(cross_entropy, logits, targets)
    x = logits.clone().requires_grad_()
    ref = F.cross_entropy(x.reshape(-1, 31), targets.reshape(-1))
    ref.backward()
    assert ours.dtype == torch.float64 and g_ours.dtype == torch.float64
    torch.testing.assert_close(ours, ref.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_ours, x.grad, rtol=1e-10, atol=1e-14)


# --- fused LM head + loss ------------------------------------------------------------------------
@pytest.mark.parametrize("z_weight,chunk", [(0.0, 7), (1e-2, 64), (0.5, 1000)])
def test_linear_cross_entropy_matches_unfused(z_weight, chunk):
    torch.manual_seed(0)
    h = torch.randn(3, 40, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 37, (3, 40))
    t[0, :5] = -100
    loss, ce, z = linear_cross_entropy(h, w, t, z_weight, chunk_size=chunk)
    (2.0 * loss).backward()  # the incoming gradient scales the precomputed ones
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ce_ref, z_ref = cross_entropy_with_z(h @ w.T, t, z_weight)
    (2.0 * (ce_ref + z_weight * z_ref)).backward()
    torch.testing.assert_close(ce, ce_ref.detach())
    torch.testing.assert_close(z, z_ref.detach())
    torch.testing.assert_close(loss.detach(), (ce_ref + z_weight * z_ref).detach())
    torch.testing.assert_close(gh, h.grad)
    torch.testing.assert_close(gw, w.grad)
    assert not ce.requires_grad and not z.requires_grad and loss.requires_grad


def test_linear_cross_entropy_bf16_hidden_and_no_grad():
    torch.manual_seed(0)
    h = torch.randn(64, 16).bfloat16().requires_grad_()
    w = torch.randn(37, 16, requires_grad=True)
    t = torch.randint(0, 37, (64,))
    loss, ce, _ = linear_cross_entropy(h, w, t)
    loss.backward()
    assert h.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32
    ref = cross_entropy(h.float() @ w.detach().bfloat16().float().T, t)
    assert float(ce) == pytest.approx(float(ref), rel=1e-3)
    with torch.no_grad():
        loss, ce2, _ = linear_cross_entropy(h, w, t)
    assert not loss.requires_grad and float(ce2) == float(ce)


def test_linear_cross_entropy_all_ignored_and_bad_input():
    h, w = torch.randn(4, 8, requires_grad=True), torch.randn(5, 8)
    loss, ce, z = linear_cross_entropy(h, w, torch.full((4,), -100))
    assert torch.isnan(ce) and torch.isnan(z)
    with pytest.raises(ValueError, match="expected hidden"):
        linear_cross_entropy(h, torch.randn(5, 7), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        linear_cross_entropy(h, w, torch.zeros(4))
    with pytest.raises(ValueError, match="chunk_size"):
        linear_cross_entropy(h, w, torch.zeros(4, dtype=torch.long), chunk_size=0)
