"""Causal linear attention: softmax(q·k) replaced by a kernel φ(q)·φ(k), three equal forms.

Source: Katharopoulos et al. 2020, "Transformers are RNNs: Fast Autoregressive Transformers with
Linear Attention" (φ(x) = elu(x) + 1, equations 4-9 and 16-20); RoPE on the numerator's
features only, as Su et al. 2021 (RoFormer, section 3.3) propose for linear attention; the
chunkwise-parallel form as in Yang et al. 2023 (Gated Linear Attention), without gates.

For query position i, with ``φ_q = φ(q_i)``, ``φ_k = φ(k_j)`` and ``R`` the RoPE rotation
(identity without RoPE):

    o_i = Σ_{j<=i} (R_i φ(q_i))·(R_j φ(k_j)) v_j  /  (φ(q_i) · Σ_{j<=i} φ(k_j) + eps)

- ``parallel``: the masked ``(seq_len × seq_len)`` score matrix, O(seq_len²·d);
- ``recurrent``: a ``(d_k × d_v)`` state ``S_i = S_{i-1} + (R_i φ(k_i)) v_iᵀ`` and a normaliser
  ``z_i = z_{i-1} + φ(k_i)``, O(1) memory per step — the RNN form used for decoding;
- ``chunked`` (training default): quadratic inside chunks of ``chunk_size`` tokens, the state
  carried between chunks; O(seq_len·(chunk·d + d²)).

All three give the same outputs (tested); the denominator is computed from a prefix sum of φ(k).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmrun.model.layers import Linear
from lmrun.model.positions import RotaryEmbedding
from lmrun.model.variants import FEATURE_MAPS, LinearAttentionConfig  # noqa: F401  (re-exported)

FORMS = ("chunked", "parallel", "recurrent")


def feature_map(x: torch.Tensor, kind: str = "elu") -> torch.Tensor:
    """φ(x), elementwise: ``elu`` — elu(x) + 1 (> 0; Katharopoulos et al. 2020) | ``relu`` — max(x, 0)."""
    if kind == "elu":
        return F.elu(x) + 1.0
    if kind == "relu":
        return torch.clamp_min(x, 0.0)
    raise ValueError(f"feature map {kind!r}: expected one of {', '.join(FEATURE_MAPS)}")


def linear_attention_parallel(fq, fk, rq, rk, v, eps: float = 1e-6) -> torch.Tensor:
    """The quadratic form. fq, fk: φ(q), φ(k) ``(..., s, d_k)``; rq, rk: the same after RoPE
    (or the same tensors); v ``(..., s, d_v)`` -> ``(..., s, d_v)``."""
    s = fq.shape[-2]
    mask = torch.ones(s, s, dtype=torch.bool, device=fq.device).tril()
    num = torch.matmul(rq, rk.transpose(-2, -1)).masked_fill(~mask, 0.0)
    den = torch.matmul(fq, fk.transpose(-2, -1)).masked_fill(~mask, 0.0).sum(-1, keepdim=True)
    return torch.matmul(num, v) / (den + eps)


def linear_attention_recurrent(fq, fk, rq, rk, v, eps: float = 1e-6) -> torch.Tensor:
    """The RNN form, one step per position with a ``(d_k, d_v)`` state and a ``(d_k,)`` normaliser;
    same arguments and result as ``linear_attention_parallel``."""
    *lead, s, d_k = fq.shape
    state = fq.new_zeros(*lead, d_k, v.shape[-1])
    z = fq.new_zeros(*lead, d_k)
    out = []
    for i in range(s):
        state = state + rk[..., i, :, None] * v[..., i, None, :]
        z = z + fk[..., i, :]
        num = (rq[..., i, :, None] * state).sum(-2)
        den = (fq[..., i, :] * z).sum(-1, keepdim=True)
        out.append(num / (den + eps))
    return torch.stack(out, dim=-2)


def linear_attention_chunked(fq, fk, rq, rk, v, chunk_size: int, eps: float = 1e-6) -> torch.Tensor:
    """The chunkwise-parallel form (chunks of ``chunk_size`` tokens; the last one zero-padded);
    same arguments and result as ``linear_attention_parallel``. One chunk is the parallel form."""
    *lead, s, d_k = fq.shape
    d_v = v.shape[-1]
    den = (fq * fk.cumsum(-2)).sum(-1, keepdim=True)
    if s <= chunk_size:
        num = torch.matmul(torch.matmul(rq, rk.transpose(-2, -1)).tril(), v)
        return num / (den + eps)
    n = -(-s // chunk_size)
    pad = n * chunk_size - s
    if pad:
        rq, rk, v = (F.pad(t, (0, 0, 0, pad)) for t in (rq, rk, v))
    c = chunk_size
    rq, rk, v = rq.reshape(*lead, n, c, d_k), rk.reshape(*lead, n, c, d_k), v.reshape(*lead, n, c, d_v)
    intra = torch.matmul(torch.matmul(rq, rk.transpose(-2, -1)).tril(), v)  # (..., n, c, d_v)
    kv = torch.matmul(rk.transpose(-2, -1), v)  # (..., n, d_k, d_v): each chunk's contribution
    state = kv.cumsum(-3) - kv  # the state before each chunk
    num = (intra + torch.matmul(rq, state)).reshape(*lead, n * c, d_v)[..., :s, :]
    return num / (den + eps)


class LinearAttention(nn.Module):
    """Causal multi-head linear attention with ``n_kv_heads`` key/value heads.

    ``forward(x, token_positions=None, form=None)``: x ``(..., seq_len, d_model)`` ->
    ``(..., seq_len, d_model)``; ``form``: chunked (default) | parallel | recurrent — equal
    results. Parameters as ``MultiHeadSelfAttention``: ``q_proj``, ``k_proj``, ``v_proj``,
    ``output_proj``. ``rope``: a ``RotaryEmbedding`` of dimension ``d_model/num_heads`` or None.
    ValueError for non-divisible head counts, an unknown feature map or chunk_size < 1.
    """

    def __init__(self, d_model: int, num_heads: int, n_kv_heads: int | None = None, *,
                 feature_map: str = "elu", chunk_size: int = 64, rope: RotaryEmbedding | None = None,
                 bias: bool = False, eps: float = 1e-6, device=None, dtype=None):
        super().__init__()
        n_kv_heads = n_kv_heads or num_heads
        if d_model % num_heads or num_heads % n_kv_heads:
            raise ValueError(f"d_model={d_model}, num_heads={num_heads}, n_kv_heads={n_kv_heads}: not divisible")
        if feature_map not in FEATURE_MAPS or chunk_size < 1:
            raise ValueError(f"feature_map={feature_map!r}, chunk_size={chunk_size}: expected one of "
                             f"{', '.join(FEATURE_MAPS)} and chunk_size >= 1")
        self.d_model, self.num_heads, self.n_kv_heads = d_model, num_heads, n_kv_heads
        self.d_k = d_model // num_heads
        self.feature_map, self.chunk_size, self.eps = feature_map, chunk_size, eps
        self.q_proj = Linear(d_model, num_heads * self.d_k, device, dtype, bias=bias)
        self.k_proj = Linear(d_model, n_kv_heads * self.d_k, device, dtype, bias=bias)
        self.v_proj = Linear(d_model, n_kv_heads * self.d_k, device, dtype, bias=bias)
        self.output_proj = Linear(num_heads * self.d_k, d_model, device, dtype, bias=bias)
        self.rope = rope

    def forward(self, x: torch.Tensor, token_positions: torch.Tensor | None = None,
                form: str | None = None) -> torch.Tensor:
        form = form or "chunked"
        if form not in FORMS:
            raise ValueError(f"form {form!r}: expected one of {', '.join(FORMS)}")
        *lead, s, _ = x.shape
        x = x.reshape(-1, s, self.d_model)
        b, h, kvh, d_k = x.shape[0], self.num_heads, self.n_kv_heads, self.d_k
        q = self.q_proj(x).view(b, s, h, d_k).transpose(1, 2)
        k = self.k_proj(x).view(b, s, kvh, d_k).transpose(1, 2)
        v = self.v_proj(x).view(b, s, kvh, d_k).transpose(1, 2)
        fq, fk = feature_map(q, self.feature_map), feature_map(k, self.feature_map)
        if self.rope is not None:
            if token_positions is None:
                pos = torch.arange(s, device=x.device)
            else:
                pos = token_positions.reshape(-1, s) if token_positions.dim() > 1 else token_positions
                pos = pos.unsqueeze(1) if pos.dim() > 1 else pos
            rq, rk = self.rope(fq, pos), self.rope(fk, pos)
        else:
            rq, rk = fq, fk
        if kvh != h:  # query head j reads key/value head j // (h / kvh)
            fk, rk, v = (t.repeat_interleave(h // kvh, dim=1) for t in (fk, rk, v))
        if form == "parallel":
            out = linear_attention_parallel(fq, fk, rq, rk, v, self.eps)
        elif form == "recurrent":
            out = linear_attention_recurrent(fq, fk, rq, rk, v, self.eps)
        else:
            out = linear_attention_chunked(fq, fk, rq, rk, v, self.chunk_size, self.eps)
        out = out.transpose(1, 2).reshape(b, s, h * d_k)
        return self.output_proj(out).view(*lead, s, self.d_model)

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, n_kv_heads={self.n_kv_heads}, d_k={self.d_k}, "
                f"feature_map={self.feature_map}, chunk_size={self.chunk_size}")
