"""The Hyena operator: gated implicit long convolutions computed with the FFT (attention-free).

Source: Poli et al. 2023, "Hyena Hierarchy: Towards Larger Convolutional Language Models"
(Definition 3.1, section 3.3 and Algorithms 1-3; the filter network, its sine activations and
the exponential decay window follow the authors' ``safari`` code).

For an order-N operator on ``u (batch, seq_len, d_model)``:

1. ``(x^1, ..., x^N, v) = ShortConv(W_in u)``: one projection to ``(N+1)·d_model`` channels
   followed by a causal depthwise convolution of ``short_kernel`` taps;
2. ``z = v``; for n = 1..N: ``z = x^n ⊙ (h^n * z + D^n ⊙ z)`` — ``*`` a causal convolution
   as long as the sequence with the implicit filter ``h^n`` (one per channel), ``D^n`` a
   learned per-channel skip weight;
3. ``y = W_out z``.

Implicit filters: ``h^n_t = FFN(PE(t)) · exp(-α_c t / context_length)``, with ``PE(t) = [t/L,
cos(2πkt/L), sin(2πkt/L)]_{k=1..(e-1)/2}`` (``L = context_length``, so a filter does not depend
on the length of the sequence it is applied to — prefixes give the same outputs), the FFN
``Linear -> sin(ω·) -> Linear -> sin(ω·) -> Linear`` with a learned frequency ω per hidden
unit, and fixed decay rates α_c spread over the channels so that the fastest filter falls to
1% within 30% of the context and the slowest within 150%.

The long convolutions run as FFTs of length ``2·seq_len`` (O(seq_len·log seq_len) per
channel); ``causal_conv_direct`` is the O(seq_len²) reference they are tested against.

State-dict keys under ``attn.``: ``in_proj``, ``short_filter`` ``((N+1)·d, 1, short_kernel)``,
``filter_fn.{in_proj,hidden,out_proj}``, ``filter_fn.freq``, ``filter_fn.skip`` ``(N, d)``,
``output_proj``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lmrun.model.layers import Linear
from lmrun.model.variants import HyenaConfig  # noqa: F401  (re-exported beside the module)


def fft_causal_conv(u: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Causal convolution ``y_t = Σ_{j<=t} h_j u_{t-j}`` along the last dimension, by FFT.

    u ``(..., channels, seq_len)``, h ``(channels, seq_len)`` (broadcast over the leading
    dims) -> ``(..., channels, seq_len)`` in u's dtype. Zero-pads to ``2·seq_len`` so the
    circular convolution of the FFT is the linear one; computed in float32 (float64 inputs stay
    float64)."""
    s = u.shape[-1]
    dt = torch.float64 if u.dtype == torch.float64 else torch.float32
    n = 2 * s
    y = torch.fft.irfft(torch.fft.rfft(u.to(dt), n=n) * torch.fft.rfft(h.to(dt), n=n), n=n)[..., :s]
    return y.to(u.dtype)


def causal_conv_direct(u: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """The O(seq_len²) reference of ``fft_causal_conv``: a depthwise ``conv1d`` with the flipped
    filter and ``seq_len - 1`` zeros of left padding. Same shapes."""
    *lead, c, s = u.shape
    x = F.pad(u.reshape(-1, c, s), (s - 1, 0))
    y = F.conv1d(x, h.flip(-1).unsqueeze(1).to(u.dtype), groups=c)
    return y.reshape(*lead, c, s)


class HyenaFilter(nn.Module):
    """The implicit filters of an order-N Hyena operator: ``forward(seq_len)`` ->
    ``(order, d_model, seq_len)``, positions ``0..seq_len-1`` of a ``max_seq_len`` context.

    Parameters: ``in_proj (filter_dim, emb_dim)`` and ``hidden (filter_dim, filter_dim)`` with
    biases, ``out_proj (order·d_model, filter_dim)``, ``freq (filter_dim,)`` (init 1), ``skip
    (order, d_model)`` (the D terms, init N(0, 1)). ValueError for an even ``emb_dim`` < 3."""

    def __init__(self, d_model: int, order: int, max_seq_len: int, emb_dim: int = 33, filter_dim: int = 64,
                 fast_decay: float = 0.3, slow_decay: float = 1.5, target: float = 1e-2, device=None, dtype=None):
        super().__init__()
        if emb_dim < 3 or emb_dim % 2 == 0:
            raise ValueError(f"emb_dim={emb_dim}: expected an odd integer >= 3")
        self.d_model, self.order, self.max_seq_len, self.emb_dim = d_model, order, max_seq_len, emb_dim
        self.in_proj = Linear(emb_dim, filter_dim, device, dtype, bias=True)
        self.hidden = Linear(filter_dim, filter_dim, device, dtype, bias=True)
        self.out_proj = Linear(filter_dim, order * d_model, device, dtype)
        self.freq = nn.Parameter(torch.ones(filter_dim, device=device, dtype=dtype))
        self.skip = nn.Parameter(torch.randn(order, d_model, device=device, dtype=dtype))
        # decay rates: exp(-α t) falls to `target` at t = fast_decay (fastest channel) .. slow_decay
        self.decay_range = (-math.log(target) / fast_decay, -math.log(target) / slow_decay)

    def positional_encoding(self, seq_len: int, device, dtype) -> torch.Tensor:
        """``(seq_len, emb_dim)``: ``[t/L, cos(2πkt/L), sin(2πkt/L)]`` for k = 1..(emb_dim-1)/2."""
        t = torch.arange(seq_len, device=device, dtype=torch.float32)[:, None] / self.max_seq_len
        k = torch.arange(1, (self.emb_dim - 1) // 2 + 1, device=device, dtype=torch.float32)
        angles = 2 * math.pi * t * k
        return torch.cat([t, torch.cos(angles), torch.sin(angles)], dim=-1).to(dtype)

    def forward(self, seq_len: int) -> torch.Tensor:
        w = self.freq
        z = self.positional_encoding(seq_len, w.device, w.dtype)
        h = self.out_proj(torch.sin(w * self.hidden(torch.sin(w * self.in_proj(z)))))  # (s, N·d)
        fast, slow = self.decay_range
        alpha = torch.linspace(fast, slow, self.d_model, device=w.device, dtype=torch.float32).repeat(self.order)
        t = torch.arange(seq_len, device=w.device, dtype=torch.float32)[:, None] / self.max_seq_len
        h = h * torch.exp(-alpha * t).to(h.dtype)
        return h.T.reshape(self.order, self.d_model, seq_len)


class HyenaOperator(nn.Module):
    """Order-N Hyena token mixer (Poli et al. 2023), causal, a drop-in for self-attention.

    ``forward(x, token_positions=None, conv=None)``: x ``(..., seq_len, d_model)`` with
    ``seq_len <= max_seq_len`` -> ``(..., seq_len, d_model)``; ``token_positions`` is ignored
    (the filters carry position); ``conv``: ``fft`` (default) | ``direct`` (the O(seq_len²)
    reference). Parameters: ``in_proj ((N+1)·d, d)``, ``short_filter ((N+1)·d, 1, k)``,
    ``filter_fn`` (``HyenaFilter``), ``output_proj (d, d)``. ValueError for order < 1 or
    short_kernel < 1, or a sequence longer than max_seq_len.
    """

    def __init__(self, d_model: int, max_seq_len: int, *, order: int = 2, filter_dim: int = 64,
                 filter_emb_dim: int = 33, short_kernel: int = 3, bias: bool = False, device=None, dtype=None):
        super().__init__()
        if order < 1 or short_kernel < 1:
            raise ValueError(f"order={order}, short_kernel={short_kernel}: expected integers >= 1")
        self.d_model, self.max_seq_len, self.order, self.short_kernel = d_model, max_seq_len, order, short_kernel
        channels = (order + 1) * d_model
        self.in_proj = Linear(d_model, channels, device, dtype, bias=bias)
        self.short_filter = nn.Parameter(torch.empty(channels, 1, short_kernel, device=device, dtype=dtype))
        bound = 1.0 / math.sqrt(short_kernel)  # nn.Conv1d's default init for a depthwise filter
        nn.init.uniform_(self.short_filter, -bound, bound)
        self.filter_fn = HyenaFilter(d_model, order, max_seq_len, filter_emb_dim, filter_dim, device=device, dtype=dtype)
        self.output_proj = Linear(d_model, d_model, device, dtype, bias=bias)

    def forward(self, x: torch.Tensor, token_positions: torch.Tensor | None = None,
                conv: str | None = None) -> torch.Tensor:
        *lead, s, d = x.shape
        if s > self.max_seq_len:
            raise ValueError(f"sequence of {s} tokens is longer than max_seq_len={self.max_seq_len}")
        long_conv = {None: fft_causal_conv, "fft": fft_causal_conv, "direct": causal_conv_direct}[conv]
        u = self.in_proj(x.reshape(-1, s, d)).transpose(1, 2)  # (b, (N+1)·d, s)
        u = F.conv1d(F.pad(u, (self.short_kernel - 1, 0)), self.short_filter, groups=u.shape[1])
        *gates, z = u.split(d, dim=1)
        h = self.filter_fn(s)  # (N, d, s)
        skip = self.filter_fn.skip
        for n, gate in enumerate(gates):
            z = gate * (long_conv(z, h[n]) + z * skip[n, :, None])
        return self.output_proj(z.transpose(1, 2)).reshape(*lead, s, d)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, order={self.order}, short_kernel={self.short_kernel}, max_seq_len={self.max_seq_len}"
