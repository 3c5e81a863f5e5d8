"""Weight-only int8 quantization of linear layers for decoding (per-output-channel scales).

Each weight row ``w_o`` (``in_features`` numbers) is stored as int8 ``round(w_o / s_o)`` with
``s_o = max|w_o| / 127`` (symmetric, absmax; as in LLM.int8()'s vector-wise quantization,
Dettmers et al. 2022, without its outlier decomposition, and gpt-fast's int8 weight-only mode).
Activations stay in floating point; the product is ``(x @ Wq^T) * s`` — decoding is memory-bound,
so moving a quarter of the fp32 bytes per token is the point. Per element the weight error is at
most ``s_o / 2``, so ``|y_o - y_q,o| <= s_o / 2 · Σ_i |x_i|``.
"""
from __future__ import annotations

import torch
from torch import nn

from lmrun.model.layers import Linear


def quantize_weight_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight ``(out, in)`` float -> ``(int8 (out, in), scales (out,) float32)``; a zero row gets scale 1."""
    absmax = weight.detach().abs().amax(dim=1).float()
    scales = torch.where(absmax > 0, absmax / 127.0, torch.ones_like(absmax))
    q = torch.clamp(torch.round(weight.detach().float() / scales[:, None]), -127, 127).to(torch.int8)
    return q, scales


class Int8Linear(nn.Module):
    """``y = x (Wq · s)ᵀ (+ b)`` with an int8 weight ``(out, in)`` and float32 ``scales (out,)``.

    Shapes as ``Linear``. ``weight`` (a property) is the dequantized matrix in the input dtype of
    the original layer, for code that reads it (MLA's absorbed form). On fp32/bf16/fp16 inputs the
    product uses ``torch._weight_int8pack_mm`` when this PyTorch build has it; float64 inputs (and
    builds without it) dequantize then multiply."""

    def __init__(self, linear: Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.dtype = linear.weight.dtype
        q, s = quantize_weight_int8(linear.weight)
        self.register_buffer("qweight", q)
        self.register_buffer("scales", s)
        self.bias = linear.bias

    @property
    def weight(self) -> torch.Tensor:
        return (self.qweight.to(self.scales.dtype) * self.scales[:, None]).to(self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in (torch.float32, torch.bfloat16, torch.float16) and hasattr(torch, "_weight_int8pack_mm"):
            lead = x.shape[:-1]
            y = torch._weight_int8pack_mm(x.reshape(-1, self.in_features), self.qweight,
                                          self.scales.to(x.dtype)).view(*lead, self.out_features)
        else:
            y = x @ self.weight.to(x.dtype).T
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


def quantize_int8(model: nn.Module, skip: tuple[str, ...] = ()) -> nn.Module:
    """Replace every ``Linear`` of ``model`` (in place) by an ``Int8Linear``, except those whose
    qualified name contains one of ``skip``; returns the model. Embeddings and norms stay float.
    Inference only (int8 buffers get no gradients)."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, Linear) and not any(s in full for s in skip):
                setattr(module, child_name, Int8Linear(child))
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers (what one decode step reads at least once)."""
    tensors = list(model.parameters()) + [b for b in model.buffers()]
    seen, total = set(), 0
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total
