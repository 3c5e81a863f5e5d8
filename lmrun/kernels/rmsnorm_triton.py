"""RMSNorm as fused Triton kernels: one pass forward, one pass backward for the input, and
per-program partial sums for the weight gradient.

Forward, per row ``x`` of length d: ``r = 1/sqrt(mean(x²) + eps)``, ``y = x·r·w`` (statistics in
float32, y in x's dtype); ``r`` is saved per row. Backward with ``x̂ = x·r`` and ``g = dy·w``:
``dx = r·(g - x̂·mean(g·x̂))``, ``dw = Σ_rows dy·x̂``.

Source: Zhang & Sennrich 2019 (RMSNorm); CS336 assignment 2 (fused RMSNorm in Triton).
Runs on CUDA, or on the CPU under ``TRITON_INTERPRET=1`` (see ``lmrun.kernels.runtime``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lmrun.kernels.runtime import check_launch_device, lazy_jit


@lazy_jit
def rmsnorm_fwd_kernel(X, W, Y, RSTD, stride_x, stride_y, N_COLS, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    ok = cols < N_COLS
    x = tl.load(X + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, 0) / N_COLS + eps)
    tl.store(Y + row * stride_y + cols, (x * rstd * w).to(Y.dtype.element_ty), mask=ok)
    tl.store(RSTD + row, rstd)


@lazy_jit
def rmsnorm_bwd_kernel(X, W, DY, RSTD, DX, DW_PARTIAL, stride_x, stride_dy, stride_dx, N_ROWS, N_COLS,
                       ROWS_PER_PROGRAM, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    ok = cols < N_COLS
    w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], tl.float32)
    first = pid * ROWS_PER_PROGRAM
    last = tl.minimum(first + ROWS_PER_PROGRAM, N_ROWS)
    for row in range(first, last):
        x = tl.load(X + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * stride_dy + cols, mask=ok, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        xhat = x * rstd
        g = dy * w
        dx = rstd * (g - xhat * (tl.sum(g * xhat, 0) / N_COLS))
        tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=ok)
        dw += dy * xhat
    tl.store(DW_PARTIAL + pid * N_COLS + cols, dw, mask=ok)


def _warps(block: int) -> int:
    """Warps per program for a row of ``block`` lanes: one per 256 lanes, 1 to 8 (Triton's
    layer-norm tutorial); 4096 columns get 8 warps, 16 elements per thread."""
    return min(max(block // 256, 1), 8)


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def rmsnorm_forward_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, rstd)`` for x ``(rows, d)`` (last dim contiguous): y ``(rows, d)`` in x's dtype,
    rstd ``(rows,)`` float32."""
    rows, d = x.shape
    y = torch.empty(rows, d, dtype=x.dtype, device=x.device)
    rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
    block = triton.next_power_of_2(d)
    rmsnorm_fwd_kernel[(rows,)](x, weight, y, rstd, x.stride(0), y.stride(0), d, float(eps),
                                BLOCK=block, num_warps=_warps(block))
    return y, rstd


def rmsnorm_backward_triton(x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, dy: torch.Tensor,
                            rows_per_program: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dx, dw)`` for x and dy ``(rows, d)``: dx in x's dtype, dw ``(d,)`` in weight's dtype
    (partial sums per program in float32, reduced by PyTorch)."""
    rows, d = x.shape
    if rows_per_program is None:
        programs = 4 * torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 4
        rows_per_program = max(1, triton.cdiv(rows, programs))
    n_programs = triton.cdiv(rows, rows_per_program)
    dx = torch.empty_like(x)
    partial = torch.empty(n_programs, d, dtype=torch.float32, device=x.device)
    block = triton.next_power_of_2(d)
    rmsnorm_bwd_kernel[(n_programs,)](x, weight, dy, rstd, dx, partial, x.stride(0), dy.stride(0), dx.stride(0),
                                      rows, d, rows_per_program, BLOCK=block, num_warps=_warps(block))
    return dx, partial.sum(dim=0).to(weight.dtype)


class RMSNormTriton(torch.autograd.Function):
    """Fused RMSNorm: ``RMSNormTriton.apply(x, weight, eps=1e-5)``.

    Shapes: x ``(..., d)``, weight ``(d,)`` -> ``(..., d)`` in x's dtype; statistics in float32.
    Gradients for x and weight. Saves x, weight and ``rstd`` (float32, one per row). Raises
    LmrunError on a device Triton cannot run on (CPU without ``TRITON_INTERPRET=1``),
    ValueError when weight's length is not x's last dim. Source: Zhang & Sennrich 2019.
    """

    @staticmethod
    def forward(ctx, x, weight, eps=1e-5):
        if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
            raise ValueError(f"RMSNorm weight {tuple(weight.shape)} does not match input {tuple(x.shape)}")
        check_launch_device(x, "RMSNormTriton")
        x2 = _rows(x)
        weight = weight.contiguous()
        y, rstd = rmsnorm_forward_triton(x2, weight, eps)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.x_shape = x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        dx, dw = rmsnorm_backward_triton(x2, weight, rstd, _rows(dy))
        return dx.view(ctx.x_shape), dw, None


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Functional form of :class:`RMSNormTriton`."""
    return RMSNormTriton.apply(x, weight, eps)
