"""Position-wise feed-forward networks: gated (``SwiGLU``, GeGLU) and ungated MLPs.

Gated (Shazeer 2020, "GLU Variants Improve Transformer"): ``w2(act(w1 x) * w3 x)`` with
``w1, w3: (d_ff, d_model)``, ``w2: (d_model, d_ff)``. Ungated (Vaswani et al. 2017 / GPT-2):
``w2(act(w1 x))`` with ``w1: (d_ff, d_model)``, ``w2: (d_model, d_ff)``. ReLU² is from So et
al. 2021 ("Primer"). Activations are written out here and checked against
``torch.nn.functional`` in the tests.

Default widths (``d_ff: null``): gated kinds ``8/3·d_model`` rounded to the nearest multiple of
64 (CS336: d_model 512 -> 1344); ungated kinds ``4·d_model``. The two then have about the same
parameter count (3·d·8/3·d = 2·d·4·d), which is the CS336 SwiGLU-vs-SiLU ablation's matching.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lmrun.model.config import FFN_KINDS, GATED, UNGATED, FFNConfig, default_d_ff, is_gated, validate_ffn  # noqa: F401
from lmrun.model.layers import Linear


# --- activations (elementwise; shapes unchanged) -------------------------------------------------
def silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU / swish: ``x·sigmoid(x)`` (Hendrycks & Gimpel 2016; Ramachandran et al. 2017).

    Runs PyTorch's fused kernel (one pass forward, one backward, no saved sigmoid): on the 2-core
    development CPU it is ~3x faster forward+backward than ``x * torch.sigmoid(x)``, which the
    tests check it against."""
    return F.silu(x)


def gelu(x: torch.Tensor) -> torch.Tensor:
    """Exact GELU: ``x·Φ(x) = 0.5·x·(1 + erf(x/√2))`` (Hendrycks & Gimpel 2016)."""
    return 0.5 * x * (1.0 + torch.erf(x * (1.0 / math.sqrt(2.0))))


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU's tanh approximation ``0.5·x·(1 + tanh(sqrt(2/π)·(x + 0.044715·x³)))`` (Hendrycks &
    Gimpel 2016; GPT-2's ``gelu``, transformers' ``gelu_new``, written as they write it)."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def relu(x: torch.Tensor) -> torch.Tensor:
    """``max(x, 0)``."""
    return torch.clamp_min(x, 0.0)


def relu2(x: torch.Tensor) -> torch.Tensor:
    """Squared ReLU ``max(x, 0)²`` (So et al. 2021, Primer)."""
    return torch.square(torch.clamp_min(x, 0.0))


ACTIVATIONS = {"silu": silu, "gelu": gelu, "relu": relu, "relu2": relu2, "gelu_tanh": gelu_tanh}


class GatedFFN(nn.Module):
    """``w2(act(w1 x) * w3 x)``; shapes ``(..., d_model)`` -> ``(..., d_model)``."""

    def __init__(self, d_model: int, d_ff: int, device=None, dtype=None, *,
                 activation: str = "silu", bias: bool = False):
        super().__init__()
        self.activation = activation
        self.act = ACTIVATIONS[activation]
        self.w1 = Linear(d_model, d_ff, device, dtype, bias=bias)
        self.w2 = Linear(d_ff, d_model, device, dtype, bias=bias)
        self.w3 = Linear(d_model, d_ff, device, dtype, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.act(self.w1(x)) * self.w3(x))

    def extra_repr(self) -> str:
        return f"activation={self.activation}"


class SwiGLU(GatedFFN):
    """SwiGLU feed-forward ``w2(silu(w1 x) * w3 x)`` (Shazeer 2020; Llama).

    Shapes: ``(..., d_model)`` -> ``(..., d_model)``; weights w1, w3 ``(d_ff, d_model)``,
    w2 ``(d_model, d_ff)``. ``d_ff=None`` uses ``default_d_ff(d_model, "swiglu")``.
    """

    def __init__(self, d_model: int, d_ff: int | None = None, device=None, dtype=None, *, bias: bool = False):
        super().__init__(d_model, d_ff or default_d_ff(d_model, "swiglu"), device, dtype, activation="silu", bias=bias)


class MLP(nn.Module):
    """Ungated feed-forward ``w2(act(w1 x))``; shapes ``(..., d_model)`` -> ``(..., d_model)``.

    activation: gelu | relu | silu | relu2 | gelu_tanh.
    """

    def __init__(self, d_model: int, d_ff: int, device=None, dtype=None, *,
                 activation: str = "gelu", bias: bool = False):
        super().__init__()
        self.activation = activation
        self.act = ACTIVATIONS[activation]
        self.w1 = Linear(d_model, d_ff, device, dtype, bias=bias)
        self.w2 = Linear(d_ff, d_model, device, dtype, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.act(self.w1(x)))

    def extra_repr(self) -> str:
        return f"activation={self.activation}"


def build_ffn(kind: str, d_model: int, d_ff: int | None = None, bias: bool = False,
              device=None, dtype=None) -> nn.Module:
    """The feed-forward module for ``kind`` (see ``FFN_KINDS``); ValueError otherwise."""
    if kind not in FFN_KINDS:
        raise ValueError(f"ffn kind {kind!r}: expected one of {', '.join(FFN_KINDS)}")
    d_ff = d_ff or default_d_ff(d_model, kind)
    if is_gated(kind):
        return GatedFFN(d_model, d_ff, device, dtype, activation=GATED[kind], bias=bias)
    return MLP(d_model, d_ff, device, dtype, activation=kind, bias=bias)
