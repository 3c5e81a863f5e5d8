"""FlashAttention-2 forward and backward as Triton kernels.

Forward (Dao 2023, Algorithm 1): one program per (batch row, query tile) streams the key/value
tiles through an online softmax in float32 (base-2 exponentials), writes O and the log-sum-exp
L. Backward (Algorithm 2, without atomics): ``D = rowsum(dO ∘ O)``; one kernel per key tile
accumulates dK and dV over the query tiles, another per query tile accumulates dQ over the key
tiles; both recompute ``P = exp(S - L)``. With ``is_causal`` tiles wholly above the diagonal are
never visited and only tiles that cross it are masked (forward and backward). Inputs float32,
bfloat16 or float16 (matmuls on the input dtype, accumulation in float32). Lengths need not be
multiples of the tiles; head dims that are not powers of two are padded with masked lanes. The
grid is (batch, tiles), batch fastest, so with ``is_causal`` the tiles with the most work (the
last query tiles in the forward and dQ kernels, the first key tiles in dK/dV) are launched first
for every batch row together. On CUDA, long sequences (``AUTOTUNE_MIN_LEN``) pick tile sizes,
warps and pipeline stages per kernel from ``HOPPER_TILES`` with ``triton.autotune``.

Source: Dao 2023, "FlashAttention-2"; Tillet et al. 2019 (Triton); CS336 assignment 2.
Runs on CUDA, or on the CPU under ``TRITON_INTERPRET=1`` (see ``lmrun.kernels.runtime``).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from lmrun.kernels.flash_attention_torch import check_attention_shapes
from lmrun.kernels.runtime import check_launch_device, language_interpreted, lazy_jit

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


def default_tiles(d: int, device: torch.device) -> tuple[int, int]:
    """(q_tile, k_tile) for head dim ``d``: 16 × 16 under the interpreter (fewer, cheaper Python
    steps), 128 × 64 on a GPU for d <= 64 and 64 × 64 above (shared-memory bound)."""
    if device.type != "cuda":
        return 16, 16
    return (128, 64) if d <= 64 else (64, 64)


@lazy_jit
def flash_fwd_kernel(Q, K, V, O, L,
                     stride_qb, stride_qn, stride_qd, stride_kb, stride_kn, stride_kd,
                     stride_vb, stride_vn, stride_vd, stride_ob, stride_on, stride_od, stride_lb, stride_ln,
                     N_QUERIES, N_KEYS, scale,
                     D: tl.constexpr, D_PAD: tl.constexpr, Q_TILE: tl.constexpr, K_TILE: tl.constexpr,
                     IS_CAUSAL: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    if IS_CAUSAL:  # the last query tiles see the most keys: launch them first (less tail imbalance)
        q_tile = tl.num_programs(1) - 1 - tl.program_id(1)
    else:
        q_tile = tl.program_id(1)
    b = tl.program_id(0)
    offs_q = q_tile * Q_TILE + tl.arange(0, Q_TILE)
    offs_d = tl.arange(0, D_PAD)
    q_ok = offs_q < N_QUERIES
    d_ok = offs_d < D
    q = tl.load(Q + b * stride_qb + offs_q[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                mask=q_ok[:, None] & d_ok[None, :], other=0.0).to(DOT_DTYPE)
    qk_scale = scale * 1.4426950408889634  # scores in base 2: exp(x) = exp2(x · log2 e)
    m = tl.full([Q_TILE], float("-inf"), tl.float32)
    l = tl.zeros([Q_TILE], tl.float32)
    acc = tl.zeros([Q_TILE, D_PAD], tl.float32)
    if IS_CAUSAL:
        k_end = tl.minimum((q_tile + 1) * Q_TILE, N_KEYS)  # later key tiles are all masked: skipped
        k_full = tl.minimum(q_tile * Q_TILE, N_KEYS) // K_TILE * K_TILE  # tiles below the diagonal
    else:
        k_end = N_KEYS
        k_full = N_KEYS // K_TILE * K_TILE
    # key tiles with every key visible to every query of this tile: no masks
    for start in range(0, k_full, K_TILE):
        offs_k = start + tl.arange(0, K_TILE)
        k = tl.load(K + b * stride_kb + offs_k[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                    mask=d_ok[None, :], other=0.0).to(DOT_DTYPE)
        v = tl.load(V + b * stride_vb + offs_k[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=d_ok[None, :], other=0.0).to(DOT_DTYPE)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        m_new = tl.maximum(m, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m - m_new)
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new
    # the rest: the diagonal tiles (causal) and the last, partial key tile
    for start in range(k_full, k_end, K_TILE):
        offs_k = start + tl.arange(0, K_TILE)
        k_ok = offs_k < N_KEYS
        k = tl.load(K + b * stride_kb + offs_k[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                    mask=k_ok[:, None] & d_ok[None, :], other=0.0).to(DOT_DTYPE)
        v = tl.load(V + b * stride_vb + offs_k[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=k_ok[:, None] & d_ok[None, :], other=0.0).to(DOT_DTYPE)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        keep = k_ok[None, :]
        if IS_CAUSAL:
            keep = keep & (offs_k[None, :] <= offs_q[:, None])
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m - m_new)
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new
    acc = acc / l[:, None]
    tl.store(O + b * stride_ob + offs_q[:, None] * stride_on + offs_d[None, :] * stride_od,
             acc.to(O.dtype.element_ty), mask=q_ok[:, None] & d_ok[None, :])
    tl.store(L + b * stride_lb + offs_q * stride_ln, (m + tl.log2(l)) * 0.6931471805599453, mask=q_ok)


@lazy_jit
def flash_bwd_dkdv_kernel(Q, K, V, dO, L, Dvec, dK, dV,
                          stride_qb, stride_qn, stride_qd, stride_kb, stride_kn, stride_kd,
                          stride_vb, stride_vn, stride_vd, stride_ob, stride_on, stride_od, stride_lb, stride_ln,
                          N_QUERIES, N_KEYS, scale,
                          D: tl.constexpr, D_PAD: tl.constexpr, Q_TILE: tl.constexpr, K_TILE: tl.constexpr,
                          IS_CAUSAL: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    # dO shares O's strides; dK and dV share K's and V's; Dvec shares L's
    k_tile = tl.program_id(1)  # the first key tiles see the most queries (causal): launched first
    b = tl.program_id(0)
    offs_k = k_tile * K_TILE + tl.arange(0, K_TILE)
    offs_d = tl.arange(0, D_PAD)
    k_ok = offs_k < N_KEYS
    d_ok = offs_d < D
    kd_ok = k_ok[:, None] & d_ok[None, :]
    k = tl.load(K + b * stride_kb + offs_k[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=kd_ok, other=0.0).to(DOT_DTYPE)
    v = tl.load(V + b * stride_vb + offs_k[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                mask=kd_ok, other=0.0).to(DOT_DTYPE)
    dk = tl.zeros([K_TILE, D_PAD], tl.float32)
    dv = tl.zeros([K_TILE, D_PAD], tl.float32)
    qk_scale = scale * 1.4426950408889634
    if IS_CAUSAL:
        q_start = (k_tile * K_TILE) // Q_TILE * Q_TILE  # earlier query tiles see none of these keys
        # query tiles from q_full on see every key of this tile: no mask there
        q_full = tl.minimum((k_tile * K_TILE + K_TILE - 1 + Q_TILE - 1) // Q_TILE * Q_TILE, N_QUERIES)
    else:
        q_full = 0
    # the query tiles that cross the diagonal (causal)
    if IS_CAUSAL:
        for start in range(q_start, q_full, Q_TILE):
            offs_q = start + tl.arange(0, Q_TILE)
            q_ok = offs_q < N_QUERIES
            qd_ok = q_ok[:, None] & d_ok[None, :]
            q = tl.load(Q + b * stride_qb + offs_q[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                        mask=qd_ok, other=0.0).to(DOT_DTYPE)
            do = tl.load(dO + b * stride_ob + offs_q[:, None] * stride_on + offs_d[None, :] * stride_od,
                         mask=qd_ok, other=0.0).to(DOT_DTYPE)
            lse2 = tl.load(L + b * stride_lb + offs_q * stride_ln, mask=q_ok, other=0.0) * 1.4426950408889634
            delta = tl.load(Dvec + b * stride_lb + offs_q * stride_ln, mask=q_ok, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
            keep = q_ok[:, None] & k_ok[None, :] & (offs_k[None, :] <= offs_q[:, None])
            p = tl.where(keep, tl.exp2(s - lse2[:, None]), 0.0)  # (Q_TILE, K_TILE)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    # the rest: no mask (rows past N_QUERIES and keys past N_KEYS load as zeros and add nothing
    # to dK and dV; the stores are masked)
    for start in range(q_full, N_QUERIES, Q_TILE):
        offs_q = start + tl.arange(0, Q_TILE)
        q_ok = offs_q < N_QUERIES
        qd_ok = q_ok[:, None] & d_ok[None, :]
        q = tl.load(Q + b * stride_qb + offs_q[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                    mask=qd_ok, other=0.0).to(DOT_DTYPE)
        do = tl.load(dO + b * stride_ob + offs_q[:, None] * stride_on + offs_d[None, :] * stride_od,
                     mask=qd_ok, other=0.0).to(DOT_DTYPE)
        lse2 = tl.load(L + b * stride_lb + offs_q * stride_ln, mask=q_ok, other=0.0) * 1.4426950408889634
        delta = tl.load(Dvec + b * stride_lb + offs_q * stride_ln, mask=q_ok, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        p = tl.exp2(s - lse2[:, None])
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    dk = dk * scale
    tl.store(dK + b * stride_kb + offs_k[:, None] * stride_kn + offs_d[None, :] * stride_kd,
             dk.to(dK.dtype.element_ty), mask=kd_ok)
    tl.store(dV + b * stride_vb + offs_k[:, None] * stride_vn + offs_d[None, :] * stride_vd,
             dv.to(dV.dtype.element_ty), mask=kd_ok)


@lazy_jit
def flash_bwd_dq_kernel(Q, K, V, dO, L, Dvec, dQ,
                        stride_qb, stride_qn, stride_qd, stride_kb, stride_kn, stride_kd,
                        stride_vb, stride_vn, stride_vd, stride_ob, stride_on, stride_od, stride_lb, stride_ln,
                        N_QUERIES, N_KEYS, scale,
                        D: tl.constexpr, D_PAD: tl.constexpr, Q_TILE: tl.constexpr, K_TILE: tl.constexpr,
                        IS_CAUSAL: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    # dQ shares Q's strides, dO shares O's, Dvec shares L's
    if IS_CAUSAL:  # heaviest query tiles first
        q_tile = tl.num_programs(1) - 1 - tl.program_id(1)
    else:
        q_tile = tl.program_id(1)
    b = tl.program_id(0)
    offs_q = q_tile * Q_TILE + tl.arange(0, Q_TILE)
    offs_d = tl.arange(0, D_PAD)
    q_ok = offs_q < N_QUERIES
    d_ok = offs_d < D
    qd_ok = q_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * stride_qb + offs_q[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                mask=qd_ok, other=0.0).to(DOT_DTYPE)
    do = tl.load(dO + b * stride_ob + offs_q[:, None] * stride_on + offs_d[None, :] * stride_od,
                 mask=qd_ok, other=0.0).to(DOT_DTYPE)
    lse2 = tl.load(L + b * stride_lb + offs_q * stride_ln, mask=q_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(Dvec + b * stride_lb + offs_q * stride_ln, mask=q_ok, other=0.0)
    dq = tl.zeros([Q_TILE, D_PAD], tl.float32)
    qk_scale = scale * 1.4426950408889634
    if IS_CAUSAL:
        k_end = tl.minimum((q_tile + 1) * Q_TILE, N_KEYS)  # later key tiles are all masked: skipped
        # whole key tiles wholly below the diagonal
        k_full = tl.minimum((q_tile * Q_TILE + 1) // K_TILE * K_TILE, N_KEYS // K_TILE * K_TILE)
    else:
        k_end = N_KEYS
        k_full = N_KEYS // K_TILE * K_TILE
    # whole key tiles every query of this tile sees: no mask (rows past N_QUERIES are not stored)
    for start in range(0, k_full, K_TILE):
        offs_k = start + tl.arange(0, K_TILE)
        k_ok = offs_k < N_KEYS
        kd_ok = k_ok[:, None] & d_ok[None, :]
        k = tl.load(K + b * stride_kb + offs_k[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                    mask=kd_ok, other=0.0).to(DOT_DTYPE)
        v = tl.load(V + b * stride_vb + offs_k[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=kd_ok, other=0.0).to(DOT_DTYPE)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        p = tl.exp2(s - lse2[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    # the tiles that cross the diagonal (causal) and the last, partial key tile
    for start in range(k_full, k_end, K_TILE):
        offs_k = start + tl.arange(0, K_TILE)
        k_ok = offs_k < N_KEYS
        kd_ok = k_ok[:, None] & d_ok[None, :]
        k = tl.load(K + b * stride_kb + offs_k[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                    mask=kd_ok, other=0.0).to(DOT_DTYPE)
        v = tl.load(V + b * stride_vb + offs_k[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=kd_ok, other=0.0).to(DOT_DTYPE)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        keep = q_ok[:, None] & k_ok[None, :]
        if IS_CAUSAL:
            keep = keep & (offs_k[None, :] <= offs_q[:, None])
        p = tl.where(keep, tl.exp2(s - lse2[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    dq = dq * scale
    tl.store(dQ + b * stride_qb + offs_q[:, None] * stride_qn + offs_d[None, :] * stride_qd,
             dq.to(dQ.dtype.element_ty), mask=qd_ok)


_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def dot_dtype(dtype: torch.dtype):
    """The Triton dtype the kernels multiply tiles in: the input's, except under the interpreter,
    whose ``tl.dot`` mishandles bfloat16 operands (Triton 3.x): there tiles are multiplied in
    float32 (loads, stores and the output dtype are unchanged)."""
    if dtype not in _TL_DTYPES:
        raise ValueError(f"FlashAttentionTriton: dtype {dtype} not supported (float32, bfloat16, float16)")
    return tl.float32 if language_interpreted() else _TL_DTYPES[dtype]


def dot_precision(dtype: torch.dtype) -> str | None:
    """``tl.dot``'s input_precision: for float32 inputs ``tf32`` when PyTorch allows TF32 matmuls
    (``torch.backends.cuda.matmul.allow_tf32``) and ``ieee`` otherwise, as PyTorch's own matmuls;
    None (Triton's default) for 16-bit inputs."""
    if dtype != torch.float32:
        return None
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _pad_dim(d: int) -> int:
    return max(16, triton.next_power_of_2(d))  # tl.dot needs every dim >= 16


def _strides3(x: torch.Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


#: on CUDA, sequences at least this long (queries or keys) run autotuned kernels when no tiles are
#: given; shorter ones use :func:`default_tiles` (tuning costs seconds per new shape, and short
#: sequences are bound by launch overhead, not by the tile shape)
AUTOTUNE_MIN_LEN = 4096


def _config(q_tile: int, k_tile: int, warps: int, stages: int):
    return triton.Config({"Q_TILE": q_tile, "K_TILE": k_tile}, num_warps=warps, num_stages=stages)


#: Hopper (H100/H200) candidates, (q_tile, k_tile, num_warps, num_stages), after Triton's fused-attention
#: tutorial (its backward: 32 × 128 tiles for dK/dV, 128 × 32 for dQ, 5 stages); configs that do not fit
#: the shared memory or registers of the GPU at hand are dropped by the autotuner. Forward: a
#: query tile per program, keys streamed; dK/dV: a key tile per program, queries streamed (small
#: query tiles); dQ: a query tile per program, keys streamed (small key tiles).
HOPPER_TILES = {
    "fwd": {64: [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 32, 4, 4), (64, 64, 4, 4),
                 (128, 64, 4, 4)],
            128: [(128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (128, 64, 4, 2), (128, 128, 8, 2),
                  (64, 32, 4, 4)]},
    "dkdv": {64: [(32, 128, 4, 3), (64, 128, 8, 3), (32, 64, 4, 3), (64, 64, 4, 3), (64, 128, 8, 2),
                  (32, 128, 8, 4), (32, 128, 4, 5)],
             128: [(32, 128, 8, 2), (64, 128, 8, 2), (32, 64, 4, 3), (64, 64, 4, 3), (32, 128, 4, 3)]},
    "dq": {64: [(128, 32, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 8, 2), (64, 32, 4, 4),
                (128, 32, 4, 5)],
           128: [(128, 32, 8, 2), (128, 64, 8, 2), (64, 64, 4, 3), (64, 32, 4, 3), (128, 32, 4, 3)]},
}
_TUNE_KEY = ["N_QUERIES", "N_KEYS", "D", "IS_CAUSAL", "PRECISION"]


def _tuned(kernel, which: str, d_pad: int):
    """``kernel`` autotuned over :data:`HOPPER_TILES` for head dims up to ``d_pad``."""
    group = 64 if d_pad <= 64 else 128
    configs = [_config(*t) for t in HOPPER_TILES[which][group]]
    return kernel.autotuned(f"{which}_d{group}", configs, _TUNE_KEY)


def use_autotune(Q: torch.Tensor, nq: int, nk: int, d: int, q_tile, k_tile) -> bool:
    """True when a launch is autotuned: CUDA tensors, compiled Triton, no tiles given, a head dim
    of at most 128 and a sequence of at least :data:`AUTOTUNE_MIN_LEN`."""
    return (Q.is_cuda and q_tile is None and k_tile is None and _pad_dim(d) <= 128
            and max(nq, nk) >= AUTOTUNE_MIN_LEN and not language_interpreted())


def tuned_configs() -> dict:
    """The configs the autotuner chose so far: ``{kernel: {key: "Q_TILE=.., K_TILE=.., num_warps=..,
    num_stages=.."}}`` (empty before the first autotuned launch)."""
    out = {}
    for kernel in (flash_fwd_kernel, flash_bwd_dkdv_kernel, flash_bwd_dq_kernel):
        for name, tuned in kernel._jitted.items():
            if isinstance(name, str) and getattr(tuned, "cache", None):
                out[f"{kernel.__name__}[{name}]"] = {str(k): str(v) for k, v in tuned.cache.items()}
    return out


def _launch_options(Q: torch.Tensor, d: int) -> dict:
    """``num_stages`` for launches with default tiles: 2 for float32 with head dims above 64 on CUDA
    (three stages of two 64 × 128 float32 tiles nearly fill an H100's 227 KiB of shared memory);
    Triton's default (3) otherwise."""
    if Q.is_cuda and Q.dtype == torch.float32 and _pad_dim(d) > 64:
        return {"num_stages": 2}
    return {}


def flash_forward_triton(Q: torch.Tensor, K: torch.Tensor, V: torch.Tensor, is_causal: bool,
                         q_tile: int | None = None, k_tile: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel on ``(batch, n, d)`` tensors -> O ``(batch, n_queries, d)`` (Q's
    dtype) and L ``(batch, n_queries)`` float32. Tiles: powers of two >= 16 (default
    :func:`default_tiles`, or autotuned over :data:`HOPPER_TILES`, see :func:`use_autotune`)."""
    b, nq, d = Q.shape
    nk = K.shape[1]
    O = torch.empty_like(Q)
    L = torch.empty(b, nq, dtype=torch.float32, device=Q.device)
    args = (Q, K, V, O, L, *_strides3(Q), *_strides3(K), *_strides3(V), *_strides3(O), L.stride(0), L.stride(1),
            nq, nk, 1.0 / math.sqrt(d))
    meta = dict(D=d, D_PAD=_pad_dim(d), IS_CAUSAL=bool(is_causal), DOT_DTYPE=dot_dtype(Q.dtype),
                PRECISION=dot_precision(Q.dtype))
    if use_autotune(Q, nq, nk, d, q_tile, k_tile):
        _tuned(flash_fwd_kernel, "fwd", _pad_dim(d))[lambda m: (b, triton.cdiv(nq, m["Q_TILE"]))](*args, **meta)
        return O, L
    dq, dk = default_tiles(d, Q.device)
    q_tile, k_tile = q_tile or dq, k_tile or dk
    flash_fwd_kernel[(b, triton.cdiv(nq, q_tile))](*args, Q_TILE=q_tile, K_TILE=k_tile, **meta,
                                                   **_launch_options(Q, d))
    return O, L


def flash_backward_triton(Q, K, V, O, L, dO, is_causal: bool, q_tile: int | None = None,
                          k_tile: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the two backward kernels on ``(batch, n, d)`` tensors -> dQ, dK, dV (inputs' dtypes)."""
    b, nq, d = Q.shape
    nk = K.shape[1]
    dO = dO.contiguous()
    if dO.stride() != O.stride():
        O = O.contiguous()
    delta = (dO.float() * O.float()).sum(dim=-1).contiguous()  # D = rowsum(dO ∘ O), (b, nq)
    L = L.contiguous()
    dQ, dK, dV = torch.empty_like(Q), torch.empty_like(K), torch.empty_like(V)
    common = (*_strides3(Q), *_strides3(K), *_strides3(V), *_strides3(dO), L.stride(0), L.stride(1),
              nq, nk, 1.0 / math.sqrt(d))
    meta = dict(D=d, D_PAD=_pad_dim(d), IS_CAUSAL=bool(is_causal), DOT_DTYPE=dot_dtype(Q.dtype),
                PRECISION=dot_precision(Q.dtype))
    if dK.stride() != K.stride() or dV.stride() != V.stride() or dQ.stride() != Q.stride():
        raise ValueError("flash_backward_triton: gradients must share their inputs' strides")
    if use_autotune(Q, nq, nk, d, q_tile, k_tile):
        _tuned(flash_bwd_dkdv_kernel, "dkdv", _pad_dim(d))[lambda m: (b, triton.cdiv(nk, m["K_TILE"]))](
            Q, K, V, dO, L, delta, dK, dV, *common, **meta)
        _tuned(flash_bwd_dq_kernel, "dq", _pad_dim(d))[lambda m: (b, triton.cdiv(nq, m["Q_TILE"]))](
            Q, K, V, dO, L, delta, dQ, *common, **meta)
        return dQ, dK, dV
    dq_, dk_ = default_tiles(d, Q.device)
    q_tile, k_tile = q_tile or dq_, k_tile or dk_
    meta.update(Q_TILE=q_tile, K_TILE=k_tile, **_launch_options(Q, d))
    flash_bwd_dkdv_kernel[(b, triton.cdiv(nk, k_tile))](Q, K, V, dO, L, delta, dK, dV, *common, **meta)
    flash_bwd_dq_kernel[(b, triton.cdiv(nq, q_tile))](Q, K, V, dO, L, delta, dQ, *common, **meta)
    return dQ, dK, dV


def _check_tiles(q_tile, k_tile) -> None:
    for name, t in (("q_tile", q_tile), ("k_tile", k_tile)):
        if t is not None and (t < 16 or t & (t - 1)):
            raise ValueError(f"{name}={t}: expected a power of two >= 16")


class FlashAttentionTriton(torch.autograd.Function):
    """FlashAttention-2 with Triton forward and backward kernels:
    ``FlashAttentionTriton.apply(Q, K, V, is_causal=False, q_tile=None, k_tile=None)``.

    Shapes: Q ``(..., n_queries, d)``, K and V ``(..., n_keys, d)`` (float32, bfloat16 or float16)
    -> O ``(..., n_queries, d)`` in Q's dtype. Saves Q, K, V, O and L ``(batch, n_queries)``
    (float32 log-sum-exp, ``batch`` = product of the leading dims; ``ctx.saved_tensors[-1]``).
    ``is_causal``: query ``i`` attends to keys ``j <= i``. Tiles: powers of two >= 16 (default
    :func:`default_tiles`). Raises LmrunError on a device Triton cannot run on (CPU without
    ``TRITON_INTERPRET=1``), ValueError for mismatched shapes or bad tiles. Source: Dao 2023.
    """

    @staticmethod
    def forward(ctx, Q, K, V, is_causal=False, q_tile=None, k_tile=None):
        check_attention_shapes(Q, K, V)
        check_launch_device(Q, "FlashAttentionTriton")
        _check_tiles(q_tile, k_tile)
        q3, k3, v3 = (x.reshape(-1, x.shape[-2], x.shape[-1]).contiguous() for x in (Q, K, V))
        O, L = flash_forward_triton(q3, k3, v3, bool(is_causal), q_tile, k_tile)
        ctx.save_for_backward(q3, k3, v3, O, L)
        ctx.is_causal, ctx.tiles, ctx.shapes = bool(is_causal), (q_tile, k_tile), (Q.shape, K.shape)
        return O.view(Q.shape)

    @staticmethod
    def backward(ctx, dO):
        q3, k3, v3, O, L = ctx.saved_tensors
        q_shape, k_shape = ctx.shapes
        dQ, dK, dV = flash_backward_triton(q3, k3, v3, O, L, dO.reshape(O.shape), ctx.is_causal, *ctx.tiles)
        return dQ.view(q_shape), dK.view(k_shape), dV.view(k_shape), None, None, None
