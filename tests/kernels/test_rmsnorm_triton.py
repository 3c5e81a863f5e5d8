"""Fused RMSNorm (Triton, under TRITON_INTERPRET=1) against the PyTorch reference and lmrun's
RMSNorm: output, input and weight gradients, odd widths, several row blocks, low precision."""
from __future__ import annotations

import pytest
import torch

from lmrun.errors import ConfigError, LmrunError
from lmrun.kernels import RMSNormTriton, rms_norm_reference
from lmrun.kernels.rmsnorm_triton import rmsnorm_backward_triton, rmsnorm_forward_triton
from lmrun.model import RMSNorm


def grads(fn, x, w, dy):
    x, w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    y = fn(x, w)
    y.backward(dy)
    return y.detach(), x.grad, w.grad


@pytest.mark.parametrize("shape", [(3, 5, 40), (7, 64), (1, 100)], ids=str)
def test_rmsnorm_triton_matches_reference(interpret, shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g) * 3
    w = torch.randn(shape[-1], generator=g)
    dy = torch.randn(*shape, generator=g)
    ref = grads(lambda a, b: rms_norm_reference(a.double(), b.double(), 1e-5), x, w, dy.double())
    got = grads(lambda a, b: RMSNormTriton.apply(a, b, 1e-5), x, w, dy)
    for name, a, b in zip(("y", "dx", "dw"), got, ref):
        assert a.dtype == torch.float32 and a.shape == b.shape, name
        torch.testing.assert_close(a.double(), b.double(), atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")


def test_weight_gradient_sums_over_row_blocks(interpret):
    """dw is reduced over programs that each handle several rows (including a short last block)."""
    g = torch.Generator().manual_seed(1)
    x, dy, w = torch.randn(11, 24, generator=g), torch.randn(11, 24, generator=g), torch.randn(24, generator=g)
    y, rstd = rmsnorm_forward_triton(x, w, 1e-5)
    torch.testing.assert_close(rstd, torch.rsqrt(x.pow(2).mean(-1) + 1e-5))
    for rows_per_program in (1, 3, 4, 11):
        dx, dw = rmsnorm_backward_triton(x, w, rstd, dy, rows_per_program)
        torch.testing.assert_close(dw, (dy * x * rstd[:, None]).sum(0), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rmsnorm_triton_low_precision(interpret, dtype):
    g = torch.Generator().manual_seed(2)
    x, dy = torch.randn(6, 48, generator=g).to(dtype), torch.randn(6, 48, generator=g).to(dtype)
    w = (1 + 0.1 * torch.randn(48, generator=g)).to(dtype)
    ref = grads(lambda a, b: rms_norm_reference(a, b), x, w, dy)
    got = grads(lambda a, b: RMSNormTriton.apply(a, b), x, w, dy)
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-3
    for name, a, b in zip(("y", "dx", "dw"), got, ref):
        assert a.dtype == dtype, name
        torch.testing.assert_close(a.float(), b.float(), atol=tol * 4, rtol=tol, msg=lambda m: f"{name}: {m}")


def test_rmsnorm_module_triton_impl_equals_torch_impl(interpret):
    torch.manual_seed(0)
    x = torch.randn(2, 9, 32)
    a, b = RMSNorm(32), RMSNorm(32, impl="triton")
    with torch.no_grad():
        a.weight.uniform_(0.5, 1.5)
        b.weight.copy_(a.weight)
    ya, yb = a(x), b(x)
    torch.testing.assert_close(ya, yb, atol=1e-6, rtol=1e-5)
    ya.square().sum().backward()
    yb.square().sum().backward()
    torch.testing.assert_close(a.weight.grad, b.weight.grad, atol=1e-5, rtol=1e-5)
    assert "impl=triton" in repr(b)


def test_weight_shape_error(interpret):
    with pytest.raises(ValueError, match="does not match"):
        RMSNormTriton.apply(torch.randn(2, 8), torch.ones(7))


def test_without_gpu_or_interpreter_triton_norm_is_a_one_line_error(no_gpu_no_interpreter):
    with pytest.raises(ConfigError, match=r"model.norm.impl=triton: Triton kernels cannot run: no CUDA GPU"):
        RMSNorm(16, impl="triton")
    with pytest.raises(LmrunError, match="TRITON_INTERPRET=1"):
        RMSNormTriton.apply(torch.randn(2, 16), torch.ones(16))
