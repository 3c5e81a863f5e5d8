"""clip_grad_norm against torch.nn.utils.clip_grad_norm_: the returned norm and the gradients,
with and without clipping; parameters without gradients; non-finite norms left alone."""
from __future__ import annotations

import math

import pytest
import torch

from lmrun.optim import clip_grad_norm


def params_with_grads(seed: int = 0, scale: float = 1.0, dtype=torch.float32) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(7, 5), (5,), (3, 4, 2), (1,)]
    params = [torch.nn.Parameter(torch.randn(s, generator=g, dtype=dtype)) for s in shapes]
    for p in params:
        p.grad = scale * torch.randn(p.shape, generator=g, dtype=dtype)
    params.append(torch.nn.Parameter(torch.randn(3, dtype=dtype)))  # no gradient: ignored
    return params


@pytest.mark.parametrize("scale,max_norm", [(1.0, 1.0), (10.0, 0.5), (0.01, 1.0), (1.0, 100.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_torch(scale, max_norm, dtype):
    ours, ref = params_with_grads(scale=scale, dtype=dtype), params_with_grads(scale=scale, dtype=dtype)
    before = [p.grad.clone() for p in ours if p.grad is not None]
    norm = clip_grad_norm(ours, max_norm)
    ref_norm = torch.nn.utils.clip_grad_norm_(ref, max_norm)
    assert isinstance(norm, float)
    assert norm == pytest.approx(ref_norm.item(), rel=1e-6)
    assert norm == pytest.approx(math.sqrt(sum(float((g.double() ** 2).sum()) for g in before)), rel=1e-6)
    for a, b in zip(ours, ref):
        assert (a.grad is None) == (b.grad is None)
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7)
    after = math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in ours if p.grad is not None))
    clipped = norm > max_norm
    assert after == pytest.approx(max_norm if clipped else norm, rel=1e-5)
    if not clipped:
        assert all(torch.equal(p.grad, g) for p, g in zip([p for p in ours if p.grad is not None], before))


def test_single_tensor_and_no_grads():
    p = torch.nn.Parameter(torch.zeros(4))
    assert clip_grad_norm([p], 1.0) == 0.0
    p.grad = torch.full((4,), 2.0)  # norm 4
    assert clip_grad_norm(p, 1.0) == pytest.approx(4.0)
    torch.testing.assert_close(p.grad, torch.full((4,), 0.5), rtol=1e-5, atol=0)


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_non_finite_norm_returned_and_nothing_scaled(bad):
    params = params_with_grads()
    params[0].grad[0, 0] = bad
    before = [p.grad.clone() for p in params if p.grad is not None]
    norm = clip_grad_norm(params, 1.0)
    assert not math.isfinite(norm) and (math.isnan(norm) if math.isnan(bad) else norm == math.inf)
    for p, g in zip([p for p in params if p.grad is not None], before):
        assert torch.equal(p.grad.nan_to_num(), g.nan_to_num())


def test_bad_max_norm():
    with pytest.raises(ValueError):
        clip_grad_norm(params_with_grads(), 0.0)
