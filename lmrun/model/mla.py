"""Multi-head latent attention (MLA): keys and values from one low-rank latent, decoupled RoPE.

Source: DeepSeek-AI 2024, "DeepSeek-V2: A Strong, Economical, and Efficient Mixture-of-Experts
Language Model", section 2.1 (equations 9-19).

Training form, per token ``x`` (``d_model``), heads ``i = 1..h``:

- ``c_kv = RMSNorm(W_DKV x)`` (``kv_rank``), ``k_i^C = W_UK,i c_kv``, ``v_i = W_UV,i c_kv``;
- ``c_q = RMSNorm(W_DQ x)``, ``q_i^C = W_UQ,i c_q`` with a query latent, else ``q_i^C = W_Q,i x``;
  the same projection gives the RoPE slice ``q_i^R`` (``rope_dim``), rotated;
- ``k^R = RoPE(W_KR x)`` (``rope_dim``), one key slice shared by all heads;
- ``o_i = softmax([q_i^C; q_i^R]·[k_i^C; k^R]ᵀ / sqrt(nope_dim + rope_dim)) v_i``, causal;
  ``y = W_O [o_1; ...; o_h]``.

Inference form (``absorbed_forward``): ``q_i^Cᵀ k_i^C = (W_UK,iᵀ q_i^C)ᵀ c_kv``, so queries are
mapped into the latent space and scored against ``c_kv`` directly, and ``W_UV`` is applied once
to the attention-weighted latent. Only ``c_kv`` and ``k^R`` are cached: ``kv_rank + rope_dim``
numbers per token and layer, against ``2·n_kv_heads·head_dim`` for (grouped-query) attention.

State-dict keys under ``attn.``: ``q_proj`` or ``q_down_proj`` + ``q_latent_norm`` + ``q_up_proj``,
``kv_down_proj``, ``kv_latent_norm``, ``k_rope_proj`` (with RoPE), ``k_up_proj``, ``v_up_proj``,
``output_proj``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lmrun.model.attention import causal_mask, scaled_dot_product_attention
from lmrun.model.layers import Linear
from lmrun.model.norms import RMSNorm
from lmrun.model.positions import RotaryEmbedding
from lmrun.model.variants import MLAConfig  # noqa: F401  (re-exported beside the module)


class MultiHeadLatentAttention(nn.Module):
    """Causal multi-head latent attention (DeepSeek-V2).

    ``forward(x, token_positions=None)``: x ``(..., seq_len, d_model)``, token_positions integer
    ``(..., seq_len)`` or ``(seq_len,)`` (default ``arange(seq_len)``) -> ``(..., seq_len,
    d_model)``; the training form. ``absorbed_forward`` computes the same function in the
    inference form, optionally continuing a latent cache.

    Sizes: ``nope_dim = v_dim = d_model/num_heads``; ``kv_rank`` the latent width; ``q_rank``
    0 (queries straight from x) or the query latent width; ``rope`` a ``RotaryEmbedding`` of
    dimension ``rope_dim`` or None (no RoPE slice, ``rope_dim`` must then be 0). ``impl``:
    naive (explicit scores and mask) or sdpa. ValueError for a non-divisible d_model, a bad impl
    or a RoPE table whose dimension is not ``rope_dim``.
    """

    def __init__(self, d_model: int, num_heads: int, kv_rank: int, *, q_rank: int = 0, rope_dim: int = 0,
                 rope: RotaryEmbedding | None = None, impl: str = "sdpa", bias: bool = False, norm_eps: float = 1e-5,
                 device=None, dtype=None):
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"d_model={d_model} is not divisible by num_heads={num_heads}")
        if impl not in ("naive", "sdpa"):
            raise ValueError(f"MLA impl {impl!r}: expected naive or sdpa")
        if (rope is None) != (rope_dim == 0) or (rope is not None and rope.d_k != rope_dim):
            raise ValueError(f"rope_dim={rope_dim} needs a RotaryEmbedding of that dimension (or none for 0)")
        self.d_model, self.num_heads, self.impl = d_model, num_heads, impl
        self.nope_dim = self.v_dim = d_model // num_heads
        self.kv_rank, self.q_rank, self.rope_dim = kv_rank, q_rank, rope_dim
        h, qk = num_heads, self.nope_dim + rope_dim
        kw = dict(device=device, dtype=dtype)
        if q_rank:
            self.q_down_proj = Linear(d_model, q_rank, bias=bias, **kw)
            self.q_latent_norm = RMSNorm(q_rank, norm_eps, **kw)
            self.q_up_proj = Linear(q_rank, h * qk, bias=bias, **kw)
        else:
            self.q_proj = Linear(d_model, h * qk, bias=bias, **kw)
        self.kv_down_proj = Linear(d_model, kv_rank, bias=bias, **kw)
        self.kv_latent_norm = RMSNorm(kv_rank, norm_eps, **kw)
        if rope_dim:
            self.k_rope_proj = Linear(d_model, rope_dim, bias=bias, **kw)
        self.k_up_proj = Linear(kv_rank, h * self.nope_dim, bias=bias, **kw)
        self.v_up_proj = Linear(kv_rank, h * self.v_dim, bias=bias, **kw)
        self.output_proj = Linear(h * self.v_dim, d_model, bias=bias, **kw)
        self.rope = rope

    # --- shared pieces ---------------------------------------------------------------------
    def _queries(self, x: torch.Tensor, pos) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(b, s, d) -> q_nope (b, h, s, nope_dim), q_rope (b, h, s, rope_dim) or None."""
        b, s, _ = x.shape
        q = self.q_up_proj(self.q_latent_norm(self.q_down_proj(x))) if self.q_rank else self.q_proj(x)
        q = q.view(b, s, self.num_heads, self.nope_dim + self.rope_dim).transpose(1, 2)
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)
        return q_nope, (self.rope(q_rope, pos) if self.rope_dim else None)

    def _latents(self, x: torch.Tensor, pos) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(b, s, d) -> c_kv (b, s, kv_rank), k_rope (b, 1, s, rope_dim) or None: what the cache keeps."""
        c = self.kv_latent_norm(self.kv_down_proj(x))
        k_rope = self.rope(self.k_rope_proj(x).unsqueeze(1), pos) if self.rope_dim else None
        return c, k_rope

    @staticmethod
    def _positions(token_positions, b: int, s: int, offset: int, device):
        if token_positions is None:
            return torch.arange(offset, offset + s, device=device)
        pos = token_positions.reshape(-1, s) if token_positions.dim() > 1 else token_positions
        return pos.unsqueeze(1) if pos.dim() > 1 else pos  # (b, 1, s): broadcast over heads

    # --- training form -----------------------------------------------------------------------
    def forward(self, x: torch.Tensor, token_positions: torch.Tensor | None = None) -> torch.Tensor:
        *lead, s, _ = x.shape
        x = x.reshape(-1, s, self.d_model)
        b, h = x.shape[0], self.num_heads
        pos = self._positions(token_positions, b, s, 0, x.device)
        q_nope, q_rope = self._queries(x, pos)
        c, k_rope = self._latents(x, pos)
        k = self.k_up_proj(c).view(b, s, h, self.nope_dim).transpose(1, 2)
        v = self.v_up_proj(c).view(b, s, h, self.v_dim).transpose(1, 2)
        if self.rope_dim:
            q = torch.cat([q_nope, q_rope], dim=-1)
            k = torch.cat([k, k_rope.expand(b, h, s, self.rope_dim)], dim=-1)
        else:
            q = q_nope
        if self.impl == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            out = scaled_dot_product_attention(q, k, v, causal_mask(s, 1, x.device))
        out = out.transpose(1, 2).reshape(b, s, h * self.v_dim)
        return self.output_proj(out).view(*lead, s, self.d_model)

    # --- inference form ------------------------------------------------------------------------
    def absorbed_forward(self, x: torch.Tensor, token_positions: torch.Tensor | None = None,
                         cache: dict | None = None) -> tuple[torch.Tensor, dict]:
        """The inference form with absorbed up-projections, over new tokens ``x (batch, s, d_model)``.

        ``cache``: None, or the dict a previous call returned — ``{"c_kv": (batch, t, kv_rank),
        "k_rope": (batch, 1, t, rope_dim) or None}`` for the ``t`` tokens before ``x``; the new
        tokens take positions ``t .. t+s-1`` unless ``token_positions`` is given. Returns
        ``(y (batch, s, d_model), cache extended by the s new tokens)``. Scores are
        ``(W_UK,iᵀ q_i^C)·c_kv + q_i^R·k^R``; outputs ``W_O,i W_UV,i (P_i c_kv)``. Not meant for
        training (it materialises ``(batch, heads, s, t+s)`` scores).
        """
        b, s, _ = x.shape
        h, r, n = self.num_heads, self.kv_rank, self.nope_dim
        past = 0 if cache is None else cache["c_kv"].shape[1]
        pos = self._positions(token_positions, b, s, past, x.device)
        q_nope, q_rope = self._queries(x, pos)
        c_new, kr_new = self._latents(x, pos)
        c = c_new if cache is None else torch.cat([cache["c_kv"], c_new], dim=1)
        k_rope = kr_new if cache is None or kr_new is None else torch.cat([cache["k_rope"], kr_new], dim=2)
        w_uk = self.k_up_proj.weight.view(h, n, r)  # k_i^C = W_UK,i c
        q_lat = torch.einsum("bhsn,hnr->bhsr", q_nope, w_uk)  # W_UK,iᵀ q_i^C
        scores = torch.matmul(q_lat, c.unsqueeze(1).transpose(-2, -1))  # (b, h, s, t)
        if self.k_up_proj.bias is not None:  # q·(W c + β) = (Wᵀq)·c + q·β
            scores = scores + (q_nope * self.k_up_proj.bias.view(h, 1, n)).sum(-1, keepdim=True)
        if self.rope_dim:
            scores = scores + torch.matmul(q_rope, k_rope.transpose(-2, -1))
        if scores.dtype in (torch.float16, torch.bfloat16):
            scores = scores.float()
        scores = scores / math.sqrt(n + self.rope_dim)
        t = past + s
        allowed = torch.arange(t, device=x.device)[None, :] <= torch.arange(past, t, device=x.device)[:, None]
        probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1).to(c.dtype)
        o_lat = torch.matmul(probs, c.unsqueeze(1))  # (b, h, s, r)
        w_uv = self.v_up_proj.weight.view(h, self.v_dim, r)
        w_o = self.output_proj.weight.view(self.d_model, h, self.v_dim)
        w_ov = torch.einsum("dhv,hvr->hrd", w_o, w_uv)  # W_O,i W_UV,i: (h, r, d_model), absorbed
        y = torch.einsum("bhsr,hrd->bsd", o_lat, w_ov)
        if self.v_up_proj.bias is not None:  # rows of P sum to 1: P (W c + β) = W (P c) + β
            y = y + self.v_up_proj.bias @ self.output_proj.weight.T
        if self.output_proj.bias is not None:
            y = y + self.output_proj.bias
        return y, {"c_kv": c, "k_rope": k_rope}

    def kv_cache_elements_per_token(self) -> int:
        """Numbers the absorbed form caches per token: ``kv_rank + rope_dim``."""
        return self.kv_rank + self.rope_dim

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, kv_rank={self.kv_rank}, q_rank={self.q_rank}, "
                f"rope_dim={self.rope_dim}, impl={self.impl}")
