"""Position information: rotary (RoPE), sinusoidal absolute, learned absolute, or none (NoPE).

Sources: RoPE — Su et al. 2021, "RoFormer: Enhanced Transformer with Rotary Position
Embedding" (the adjacent-pair convention of CS336 assignment 1: dimensions (2k, 2k+1) of a
head are rotated by angle ``position · theta^(-2k/d_k)``); sinusoidal — Vaswani et al. 2017;
learned — GPT-2 (Radford et al. 2019); NoPE — Kazemnejad et al. 2023 (causal attention alone
carries position).
"""
from __future__ import annotations

import torch
from torch import nn

from lmrun.model.config import POSITION_KINDS, PositionConfig, validate_position  # noqa: F401


class RotaryEmbedding(nn.Module):
    """Rotary position embedding applied to the last dimension of queries or keys.

    ``forward(x, token_positions)``: x ``(..., seq_len, d_k)``, token_positions integer
    ``(..., seq_len)`` broadcastable to ``x.shape[:-1]`` (any positions in
    ``[0, max_seq_len)``, e.g. offsets of a KV cache) -> rotated x, same shape and dtype.
    Pair ``(x[2k], x[2k+1])`` at position p is rotated by ``p · theta^(-2k/d_k)``.
    cos/sin tables ``(max_seq_len, d_k/2)`` are float32 non-persistent buffers (no
    state-dict keys), recomputed in float32 on ``.to()`` / ``.to_empty()`` so a bf16 model or
    one initialised on the meta device keeps exact tables. Raises ValueError for an odd ``d_k``.
    """

    def __init__(self, theta: float, d_k: int, max_seq_len: int, device: torch.device | str | None = None):
        super().__init__()
        if d_k % 2:
            raise ValueError(f"RotaryEmbedding needs an even head dimension, got d_k={d_k}")
        self.theta, self.d_k, self.max_seq_len = theta, d_k, max_seq_len
        cos, sin = self._tables(device)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _tables(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self.theta ** (-torch.arange(0, self.d_k, 2, device=device, dtype=torch.float64) / self.d_k)
        angles = torch.outer(torch.arange(self.max_seq_len, device=device, dtype=torch.float64), inv_freq)
        return torch.cos(angles).float(), torch.sin(angles).float()

    def _apply(self, fn, recurse=True):
        # .to(dtype) / .half() / .to_empty(): keep float32 tables with real values on the new device
        super()._apply(fn, recurse)
        self.cos, self.sin = self._tables(self.cos.device)
        return self

    def forward(self, x: torch.Tensor, token_positions: torch.Tensor) -> torch.Tensor:
        # (x[2k] + i·x[2k+1]) · e^{iθ} is the rotation: one complex multiply instead of strided
        # slices and a stack (~3x faster forward+backward on CPU, same values)
        # float32 (float64 for float64 inputs, so that double-precision checks stay exact)
        wide = torch.float64 if x.dtype == torch.float64 else torch.float32
        cos, sin = self.cos[token_positions].to(wide), self.sin[token_positions].to(wide)
        if torch.compiler.is_compiling():
            # Inductor has no complex kernels (it would fall back to eager); in real arithmetic the
            # rotation fuses into one kernel with its neighbours
            a, b = x.to(wide).unflatten(-1, (-1, 2)).unbind(-1)
            return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2).to(x.dtype)
        rot = torch.complex(cos, sin)
        pairs = torch.view_as_complex(x.to(wide).reshape(*x.shape[:-1], -1, 2).contiguous())
        return torch.view_as_real(pairs * rot).flatten(-2).to(x.dtype)

    def extra_repr(self) -> str:
        return f"theta={self.theta}, d_k={self.d_k}, max_seq_len={self.max_seq_len}"


def sinusoidal_table(max_seq_len: int, d_model: int, theta: float = 10000.0,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """``(max_seq_len, d_model)`` float32: ``PE[p, 2i] = sin(p / theta^(2i/d))``,
    ``PE[p, 2i+1] = cos(p / theta^(2i/d))`` (Vaswani et al. 2017, section 3.5). Works for odd d."""
    pos = torch.arange(max_seq_len, device=device, dtype=torch.float64)[:, None]
    i2 = torch.arange(0, d_model, 2, device=device, dtype=torch.float64)
    angles = pos * theta ** (-i2 / d_model)
    table = torch.zeros(max_seq_len, d_model, device=device, dtype=torch.float64)
    table[:, 0::2] = torch.sin(angles)
    table[:, 1::2] = torch.cos(angles[:, : d_model // 2])
    return table.float()


class SinusoidalPositionalEmbedding(nn.Module):
    """Fixed sinusoidal absolute positions: ``token_positions (...)`` -> ``(..., d_model)``.

    The table is a float32 non-persistent buffer (no state-dict keys, no parameters)."""

    def __init__(self, max_seq_len: int, d_model: int, theta: float = 10000.0, device=None):
        super().__init__()
        self.max_seq_len, self.d_model, self.theta = max_seq_len, d_model, theta
        self.register_buffer("table", sinusoidal_table(max_seq_len, d_model, theta, device), persistent=False)

    def _apply(self, fn, recurse=True):
        # like RotaryEmbedding: a float32 table with real values after .to(dtype) or .to_empty()
        super()._apply(fn, recurse)
        self.table = sinusoidal_table(self.max_seq_len, self.d_model, self.theta, self.table.device)
        return self

    def forward(self, token_positions: torch.Tensor) -> torch.Tensor:
        return self.table[token_positions]
