"""Attention: a numerically stable ``softmax``, ``scaled_dot_product_attention`` and causal
multi-head self-attention with grouped-query (GQA) and multi-query (MQA) variants.

Sources: Vaswani et al. 2017 (scaled dot-product and multi-head attention); Shazeer 2019
(multi-query attention); Ainslie et al. 2023 (grouped-query attention); QK-norm — Henry et al.
2020, Dehghani et al. 2023 (here an RMSNorm over each head's dimension, shared by all heads,
as in Qwen3 / Gemma 3); CS336 assignment 1.

Sliding-window attention (Beltagy et al. 2020, Longformer; Jiang et al. 2023, Mistral 7B):
with ``window=w`` token ``i`` attends to tokens ``i-w+1 .. i`` (``w`` tokens, itself included);
``w >= seq_len`` is full causal attention. Both paths apply the band mask to the full score
matrix (the naive path explicitly, SDPA through ``attn_mask``).

Head grouping: query head ``j`` reads key/value head ``j // (num_heads // n_kv_heads)`` — the
convention of ``torch.nn.functional.scaled_dot_product_attention(enable_gqa=True)`` and of
Llama's ``repeat_kv``.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from lmrun.kernels.flash_attention_torch import FLASH_IMPLS, flash_attention
from lmrun.model.config import ATTENTION_IMPLS, AttentionConfig, validate_attention  # noqa: F401
from lmrun.model.layers import Linear
from lmrun.model.norms import RMSNorm
from lmrun.model.positions import RotaryEmbedding


def softmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``exp(x - max) / sum(exp(x - max))`` along ``dim``: shape unchanged, no overflow for
    large inputs. ``-inf`` entries get probability 0 (a row of only ``-inf`` gives NaN, as
    ``torch.softmax`` does)."""
    shifted = x - x.amax(dim=dim, keepdim=True)
    e = torch.exp(shifted)
    return e / e.sum(dim=dim, keepdim=True)


def scaled_dot_product_attention(Q: torch.Tensor, K: torch.Tensor, V: torch.Tensor,
                                 mask: torch.Tensor | None = None) -> torch.Tensor:
    """``softmax(Q Kᵀ / sqrt(d_k) masked) V``.

    Shapes: Q ``(..., n, d_k)``, K ``(..., m, d_k)``, V ``(..., m, d_v)``, mask boolean
    ``(n, m)`` or broadcastable to ``(..., n, m)``, ``True`` = may attend -> ``(..., n, d_v)``.
    Scores and softmax are computed in float32 for lower-precision inputs; the result has V's dtype.
    """
    d_k = Q.shape[-1]
    scores = torch.matmul(Q, K.transpose(-2, -1)).float() * (1.0 / math.sqrt(d_k))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(softmax(scores, dim=-1).to(V.dtype), V)


def _build_causal_mask(seq_len: int, groups: int, device: torch.device, window: int | None = None) -> torch.Tensor:
    mask = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()
    if window is not None:
        mask = mask.triu(1 - window)  # keep j >= i - window + 1
    return mask.repeat(groups, 1) if groups > 1 else mask


_cached_causal_mask = functools.lru_cache(maxsize=16)(_build_causal_mask)


def causal_mask(seq_len: int, groups: int, device: torch.device, window: int | None = None) -> torch.Tensor:
    """Boolean ``(groups·seq_len, seq_len)``: row ``g·seq_len + i`` may attend to columns ``<= i``
    (and ``> i - window`` with a sliding ``window``).

    Cached per (seq_len, groups, device, window) in eager mode; built in the graph under torch.compile."""
    if torch.compiler.is_compiling():
        return _build_causal_mask(seq_len, groups, device, window)
    return _cached_causal_mask(seq_len, groups, device, window)


class MultiHeadSelfAttention(nn.Module):
    """Causal multi-head self-attention with ``n_kv_heads`` key/value heads (GQA; MQA when 1).

    ``forward(x, token_positions=None)``: x ``(..., seq_len, d_model)``; token_positions
    integer ``(..., seq_len)`` or ``(seq_len,)`` (default ``arange(seq_len)``), used by RoPE only
    -> ``(..., seq_len, d_model)``. Token ``i`` attends to tokens ``<= i`` of the same sequence.

    Parameters: ``q_proj (num_heads·d_k, d_model)``, ``k_proj`` and ``v_proj
    (n_kv_heads·d_k, d_model)``, ``output_proj (d_model, num_heads·d_k)`` with
    ``d_k = d_model / num_heads``. ``rope``: a shared ``RotaryEmbedding`` or None;
    ``theta`` + ``max_seq_len`` build one when ``rope`` is not given. ``impl``: naive | sdpa |
    flash_torch | flash_triton (``AttentionConfig``); flash_triton raises ConfigError when
    Triton cannot run here (no CUDA GPU and no ``TRITON_INTERPRET=1``). ``window``: None (full
    causal) or w >= 1 — sliding-window attention over the last w tokens (impl naive or sdpa).
    ValueError when d_model is not divisible by num_heads or num_heads by n_kv_heads, or for a
    window < 1 or with another impl.
    """

    def __init__(self, d_model: int, num_heads: int, n_kv_heads: int | None = None, *,
                 rope: RotaryEmbedding | None = None, theta: float | None = None, max_seq_len: int | None = None,
                 impl: str = "sdpa", qk_norm: bool = False, bias: bool = False, norm_eps: float = 1e-5,
                 window: int | None = None, device=None, dtype=None):
        super().__init__()
        n_kv_heads = n_kv_heads or num_heads
        if d_model % num_heads:
            raise ValueError(f"d_model={d_model} is not divisible by num_heads={num_heads}")
        if num_heads % n_kv_heads:
            raise ValueError(f"num_heads={num_heads} is not divisible by n_kv_heads={n_kv_heads}")
        if impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention impl {impl!r}: expected one of {', '.join(ATTENTION_IMPLS)}")
        if impl == "flash_triton":
            from lmrun.kernels.runtime import require_triton

            require_triton("model.attention.impl=flash_triton")
        self.d_model, self.num_heads, self.n_kv_heads = d_model, num_heads, n_kv_heads
        self.d_k = d_model // num_heads
        self.impl = impl
        if window is not None and (window < 1 or impl not in ("naive", "sdpa")):
            raise ValueError(f"window={window} with impl={impl!r}: expected a window >= 1 with impl naive or sdpa")
        self.window = window
        self.q_proj = Linear(d_model, num_heads * self.d_k, device, dtype, bias=bias)
        self.k_proj = Linear(d_model, n_kv_heads * self.d_k, device, dtype, bias=bias)
        self.v_proj = Linear(d_model, n_kv_heads * self.d_k, device, dtype, bias=bias)
        self.output_proj = Linear(num_heads * self.d_k, d_model, device, dtype, bias=bias)
        if qk_norm:
            self.q_norm = RMSNorm(self.d_k, norm_eps, device=device, dtype=dtype)
            self.k_norm = RMSNorm(self.d_k, norm_eps, device=device, dtype=dtype)
        else:
            self.q_norm = self.k_norm = None
        if rope is None and theta is not None and max_seq_len is not None:
            rope = RotaryEmbedding(theta, self.d_k, max_seq_len, device=device)
        self.rope = rope

    def forward(self, x: torch.Tensor, token_positions: torch.Tensor | None = None) -> torch.Tensor:
        *lead, s, _ = x.shape
        x = x.reshape(-1, s, self.d_model)
        b, h, kvh, d_k = x.shape[0], self.num_heads, self.n_kv_heads, self.d_k
        # QK-norm and RoPE act on the contiguous (b, s, heads, d_k) projections, before the
        # transpose to (b, heads, s, d_k): no copy to make the rotation's pairs contiguous
        q = self.q_proj(x).view(b, s, h, d_k)
        k = self.k_proj(x).view(b, s, kvh, d_k)
        v = self.v_proj(x).view(b, s, kvh, d_k).transpose(1, 2)  # (b, kvh, s, d_k)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope is not None:
            if token_positions is None:
                pos = torch.arange(s, device=x.device)
            else:
                pos = token_positions.reshape(-1, s) if token_positions.dim() > 1 else token_positions
            pos = pos.unsqueeze(-1)  # (s, 1) or (b, s, 1): broadcast over heads
            q, k = self.rope(q, pos), self.rope(k, pos)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (b, h, s, d_k), (b, kvh, s, d_k)
        if self.impl == "sdpa" and self.window is not None:
            mask = causal_mask(s, 1, x.device, self.window)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=kvh != h)
        elif self.impl == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=kvh != h)
        elif self.impl in FLASH_IMPLS:  # FlashAttention-2 (lmrun.kernels), K/V heads expanded for GQA
            out = flash_attention(q, k, v, is_causal=True, impl=self.impl)
        else:
            g = h // kvh  # fold the query heads of a group into the row dimension: K, V are not copied
            q = q.reshape(b, kvh, g * s, d_k)
            out = scaled_dot_product_attention(q, k, v, causal_mask(s, g, x.device, self.window)).view(b, h, s, d_k)
        out = out.transpose(1, 2).reshape(b, s, h * d_k)
        return self.output_proj(out).view(*lead, s, self.d_model)

    def extra_repr(self) -> str:
        window = f", window={self.window}" if self.window is not None else ""
        return f"num_heads={self.num_heads}, n_kv_heads={self.n_kv_heads}, d_k={self.d_k}, impl={self.impl}{window}"
