"""Plain PyTorch references the kernels are checked against: attention that materialises the
``(n_queries, n_keys)`` score matrix, and RMSNorm as tensor expressions.

Source: Vaswani et al. 2017 (scaled dot-product attention); Zhang & Sennrich 2019 (RMSNorm).
"""
from __future__ import annotations

import math

import torch


def attention_reference(Q: torch.Tensor, K: torch.Tensor, V: torch.Tensor, is_causal: bool = False
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """``O = softmax(Q Kᵀ / sqrt(d)) V`` and the row log-sum-exp ``L = logsumexp(Q Kᵀ / sqrt(d))``.

    Shapes: Q ``(..., n_queries, d)``, K and V ``(..., n_keys, d)`` -> O ``(..., n_queries, d)`` in
    V's dtype, L ``(..., n_queries)`` float32 (float64 for float64 inputs). Scores and softmax in
    float32 or wider. ``is_causal``: query
    ``i`` attends to keys ``j <= i`` (top-left aligned, as ``torch.nn.functional.
    scaled_dot_product_attention(is_causal=True)``). Differentiable (autograd keeps the n×n matrix).
    """
    d = Q.shape[-1]
    acc = torch.promote_types(Q.dtype, torch.float32)  # float64 inputs stay float64
    S = torch.matmul(Q.to(acc), K.to(acc).transpose(-2, -1)) / math.sqrt(d)
    if is_causal:
        nq, nk = S.shape[-2:]
        keep = torch.ones(nq, nk, dtype=torch.bool, device=S.device).tril()
        S = S.masked_fill(~keep, float("-inf"))
    L = torch.logsumexp(S, dim=-1)
    P = torch.exp(S - L.unsqueeze(-1))
    return torch.matmul(P, V.to(acc)).to(V.dtype), L


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """``x / sqrt(mean(x², -1) + eps) * weight`` in float32, returned in x's dtype.
    Shapes: x ``(..., d)``, weight ``(d,)`` -> ``(..., d)``."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)
