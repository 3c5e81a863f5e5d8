"""FlashAttention-2 in plain PyTorch: the tiled forward pass with an online softmax, and the
backward pass by recomputation from the saved log-sum-exp, never holding an n×n matrix.

Source: Dao 2023, "FlashAttention-2: Faster Attention with Better Parallelism and Work
Partitioning" (Algorithms 1 and 2); Dao et al. 2022 (FlashAttention); Milakov & Gimelshein 2018
(online softmax); CS336 assignment 2. The Triton kernels of the same algorithm are in
``lmrun.kernels.flash_attention_triton``; :func:`flash_attention` is the multi-head entry point
the model uses.
"""
from __future__ import annotations

import math

import torch

#: tile sizes of the PyTorch version (rows of Q, rows of K/V per tile)
TORCH_Q_TILE = 64
TORCH_K_TILE = 64


def _flatten(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-2], x.shape[-1])


def check_attention_shapes(Q: torch.Tensor, K: torch.Tensor, V: torch.Tensor) -> None:
    """ValueError unless Q ``(..., n_queries, d)``, K and V ``(..., n_keys, d)`` agree (same
    leading dims, same head dim, same dtype and device, at least one key)."""
    if Q.dim() < 2 or K.shape != V.shape or Q.shape[:-2] != K.shape[:-2] or Q.shape[-1] != K.shape[-1]:
        raise ValueError(f"attention shapes: expected Q (..., n_queries, d), K and V (..., n_keys, d); "
                         f"got {tuple(Q.shape)}, {tuple(K.shape)}, {tuple(V.shape)}")
    if K.shape[-2] < 1:
        raise ValueError("attention needs at least one key")
    if not (Q.dtype == K.dtype == V.dtype) or not (Q.device == K.device == V.device):
        raise ValueError(f"attention inputs differ in dtype/device: {Q.dtype}/{Q.device}, {K.dtype}/{K.device}, "
                         f"{V.dtype}/{V.device}")


def _causal_tile_mask(i0: int, i1: int, j0: int, j1: int, device) -> torch.Tensor | None:
    """Boolean (i1-i0, j1-j0), True where key j may be seen by query i (j <= i); None when the
    whole tile is visible."""
    if j1 - 1 <= i0:
        return None
    rows = torch.arange(i0, i1, device=device)[:, None]
    cols = torch.arange(j0, j1, device=device)[None, :]
    return cols <= rows


def flash_forward_torch(Q: torch.Tensor, K: torch.Tensor, V: torch.Tensor, is_causal: bool,
                        q_tile: int = TORCH_Q_TILE, k_tile: int = TORCH_K_TILE) -> tuple[torch.Tensor, torch.Tensor]:
    """FlashAttention-2 forward (Dao 2023, Algorithm 1) on ``(batch, n, d)`` tensors.

    Returns O ``(batch, n_queries, d)`` in Q's dtype and L ``(batch, n_queries)`` float32, the
    log-sum-exp of each row of scaled scores. Accumulates in float32; with ``is_causal`` key
    tiles entirely above the diagonal are skipped.
    """
    b, nq, d = Q.shape
    nk = K.shape[1]
    scale = 1.0 / math.sqrt(d)
    O = torch.empty(b, nq, d, dtype=Q.dtype, device=Q.device)
    L = torch.empty(b, nq, dtype=torch.float32, device=Q.device)
    for i0 in range(0, nq, q_tile):
        i1 = min(i0 + q_tile, nq)
        q = Q[:, i0:i1].float() * scale
        m = torch.full((b, i1 - i0), float("-inf"), device=Q.device)
        l = torch.zeros(b, i1 - i0, device=Q.device)
        acc = torch.zeros(b, i1 - i0, d, device=Q.device)
        k_end = min(nk, i1) if is_causal else nk
        for j0 in range(0, k_end, k_tile):
            j1 = min(j0 + k_tile, nk)
            s = torch.bmm(q, K[:, j0:j1].float().transpose(1, 2))  # (b, tq, tk)
            if is_causal:
                keep = _causal_tile_mask(i0, i1, j0, j1, Q.device)
                if keep is not None:
                    s = s.masked_fill(~keep, float("-inf"))
            m_new = torch.maximum(m, s.amax(dim=-1))
            p = torch.exp(s - m_new.unsqueeze(-1))
            alpha = torch.exp(m - m_new)
            l = alpha * l + p.sum(dim=-1)
            acc = alpha.unsqueeze(-1) * acc + torch.bmm(p, V[:, j0:j1].float())
            m = m_new
        O[:, i0:i1] = (acc / l.unsqueeze(-1)).to(Q.dtype)
        L[:, i0:i1] = m + torch.log(l)
    return O, L


def flash_backward_torch(Q, K, V, O, L, dO, is_causal: bool, q_tile: int = TORCH_Q_TILE,
                         k_tile: int = TORCH_K_TILE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FlashAttention-2 backward (Dao 2023, Algorithm 2) on ``(batch, n, d)`` tensors: recomputes
    ``P = exp(S - L)`` tile by tile; ``D = rowsum(dO ∘ O)``; ``dS = P ∘ (dP - D)``.

    Returns dQ, dK, dV in the inputs' shapes and dtypes (accumulated in float32).
    """
    b, nq, d = Q.shape
    nk = K.shape[1]
    scale = 1.0 / math.sqrt(d)
    Df = (dO.float() * O.float()).sum(dim=-1)  # (b, nq)
    dQ = torch.zeros(b, nq, d, dtype=torch.float32, device=Q.device)
    dK = torch.empty(b, nk, d, dtype=K.dtype, device=Q.device)
    dV = torch.empty(b, nk, d, dtype=V.dtype, device=Q.device)
    for j0 in range(0, nk, k_tile):
        j1 = min(j0 + k_tile, nk)
        k, v = K[:, j0:j1].float(), V[:, j0:j1].float()
        dk = torch.zeros(b, j1 - j0, d, device=Q.device)
        dv = torch.zeros(b, j1 - j0, d, device=Q.device)
        i_start = (j0 // q_tile) * q_tile if is_causal else 0  # query tiles wholly before j0 see none of these keys
        for i0 in range(i_start, nq, q_tile):
            i1 = min(i0 + q_tile, nq)
            q, do = Q[:, i0:i1].float(), dO[:, i0:i1].float()
            s = torch.bmm(q, k.transpose(1, 2)) * scale
            if is_causal:
                keep = _causal_tile_mask(i0, i1, j0, j1, Q.device)
                if keep is not None:
                    s = s.masked_fill(~keep, float("-inf"))
            p = torch.exp(s - L[:, i0:i1].unsqueeze(-1))
            dv += torch.bmm(p.transpose(1, 2), do)
            dp = torch.bmm(do, v.transpose(1, 2))
            ds = p * (dp - Df[:, i0:i1].unsqueeze(-1))
            dQ[:, i0:i1] += torch.bmm(ds, k) * scale
            dk += torch.bmm(ds.transpose(1, 2), q) * scale
        dK[:, j0:j1] = dk.to(K.dtype)
        dV[:, j0:j1] = dv.to(V.dtype)
    return dQ.to(Q.dtype), dK, dV


class FlashAttentionTorch(torch.autograd.Function):
    """FlashAttention-2 in PyTorch: ``FlashAttentionTorch.apply(Q, K, V, is_causal=False)``.

    Shapes: Q ``(..., n_queries, d)``, K and V ``(..., n_keys, d)`` -> O ``(..., n_queries, d)``
    (Q's dtype). Saves Q, K, V, O and L ``(batch, n_queries)`` (float32 log-sum-exp; ``batch`` is
    the product of the leading dims; ``ctx.saved_tensors[-1]``); the backward pass recomputes the
    probabilities from L tile by tile. ``is_causal``: query ``i`` attends to keys ``j <= i``.
    ValueError for mismatched shapes. Source: Dao 2023, Algorithms 1-2.
    """

    @staticmethod
    def forward(ctx, Q, K, V, is_causal=False, q_tile=TORCH_Q_TILE, k_tile=TORCH_K_TILE):
        check_attention_shapes(Q, K, V)
        O, L = flash_forward_torch(_flatten(Q), _flatten(K), _flatten(V), bool(is_causal), q_tile, k_tile)
        O = O.view(Q.shape)
        ctx.save_for_backward(Q, K, V, O, L)
        ctx.is_causal, ctx.tiles = bool(is_causal), (q_tile, k_tile)
        return O

    @staticmethod
    def backward(ctx, dO):
        Q, K, V, O, L = ctx.saved_tensors
        dQ, dK, dV = flash_backward_torch(_flatten(Q), _flatten(K), _flatten(V), _flatten(O), L,
                                          _flatten(dO.contiguous()), ctx.is_causal, *ctx.tiles)
        return dQ.view(Q.shape), dK.view(K.shape), dV.view(V.shape), None, None, None


FLASH_IMPLS = ["flash_torch", "flash_triton"]


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool = True,
                    impl: str = "flash_torch") -> torch.Tensor:
    """Multi-head FlashAttention-2 for the model: q ``(batch, num_heads, n_queries, d)``, k and v
    ``(batch, n_kv_heads, n_keys, d)`` with ``num_heads % n_kv_heads == 0`` (GQA/MQA: query head
    ``j`` reads key/value head ``j // (num_heads // n_kv_heads)``; the key/value heads are
    expanded, and their gradients summed back, by autograd) -> ``(batch, num_heads, n_queries, d)``.

    ``impl``: ``flash_torch`` (:class:`FlashAttentionTorch`) or ``flash_triton``
    (:class:`lmrun.kernels.flash_attention_triton.FlashAttentionTriton`; CUDA, or the CPU under
    ``TRITON_INTERPRET=1``, else LmrunError). ValueError for another impl or mismatched heads.
    """
    b, h, nq, d = q.shape
    kvh = k.shape[1]
    if h % kvh:
        raise ValueError(f"num_heads={h} is not divisible by n_kv_heads={kvh}")
    if kvh != h:
        g = h // kvh
        k = k.unsqueeze(2).expand(b, kvh, g, *k.shape[2:]).reshape(b, h, *k.shape[2:])
        v = v.unsqueeze(2).expand(b, kvh, g, *v.shape[2:]).reshape(b, h, *v.shape[2:])
    if impl == "flash_torch":
        return FlashAttentionTorch.apply(q, k, v, is_causal)
    if impl == "flash_triton":
        return _flash_triton(q, k, v, is_causal)
    raise ValueError(f"flash attention impl {impl!r}: expected one of {', '.join(FLASH_IMPLS)}")


def _flash_triton_eager(q, k, v, is_causal):
    from lmrun.kernels.flash_attention_triton import FlashAttentionTriton

    return FlashAttentionTriton.apply(q, k, v, is_causal)


def _flash_triton(q, k, v, is_causal):
    """``FlashAttentionTriton`` outside ``torch.compile``'s graphs: the kernels are launched through
    ``lazy_jit``, which Dynamo cannot trace, so a compiled model breaks its graph here on purpose
    (and runs the kernels eagerly) instead of failing or tracing Triton's launcher."""
    global _flash_triton_disabled
    if _flash_triton_disabled is None:
        _flash_triton_disabled = torch.compiler.disable(_flash_triton_eager)
    return _flash_triton_disabled(q, k, v, is_causal)


_flash_triton_disabled = None
