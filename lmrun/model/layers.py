"""Parameterised building blocks: ``Linear`` and ``Embedding`` (own implementations, no ``nn.Linear``).

Initialisation follows CS336 assignment 1: a linear weight ``(d_out, d_in)`` is drawn from a
normal with std ``sqrt(2 / (d_in + d_out))`` truncated at ±3 std; an embedding from N(0, 1)
truncated at ±3.
"""
from __future__ import annotations

import math

import torch
from torch import nn


def trunc_normal_(tensor: torch.Tensor, std: float) -> torch.Tensor:
    """Fill ``tensor`` in place from N(0, std²) truncated to [-3·std, 3·std]; returns it."""
    return nn.init.trunc_normal_(tensor, mean=0.0, std=std, a=-3.0 * std, b=3.0 * std)


def linear_init_std(d_in: int, d_out: int) -> float:
    """The std of a linear weight's init: ``sqrt(2 / (d_in + d_out))`` (Glorot-style)."""
    return math.sqrt(2.0 / (d_in + d_out))


class Linear(nn.Module):
    """``y = x Wᵀ (+ b)``: weight ``(out_features, in_features)``, no bias by default.

    Shapes: input ``(..., in_features)`` -> output ``(..., out_features)``.
    Init: weight ~ truncated N(0, 2/(d_in+d_out)) clipped at 3 std; bias zeros.
    """

    def __init__(self, in_features: int, out_features: int,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None, *, bias: bool = False):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        trunc_normal_(self.weight, linear_init_std(self.in_features, self.out_features))
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.weight.T
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Embedding(nn.Module):
    """A lookup table: weight ``(num_embeddings, embedding_dim)``.

    Shapes: integer ids ``(...)`` -> vectors ``(..., embedding_dim)``.
    Init: truncated N(0, std²) clipped at 3 std, ``std=1`` by default.
    The lookup is ``index_select`` on the flattened ids: its backward (``index_add_``) is
    deterministic on CPU, while advanced indexing's (``index_put_`` with accumulate) sums rows in
    a thread-dependent order — a 1-ulp difference that breaks bit-exact resume (measured: two
    identical 2-thread runs differed in every weight after 12 steps).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None, *,
                 init_std: float = 1.0):
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.init_std = init_std
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        trunc_normal_(self.weight, self.init_std)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.weight.index_select(0, token_ids.reshape(-1)).view(*token_ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}"


def dropout_mask(shape: torch.Size | tuple[int, ...], p: float, dtype: torch.dtype,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """The scaled keep-mask of inverted dropout: ``1/(1 - p')`` where kept, 0 where dropped, with
    ``p' = round(p·65536)/65536`` (p quantized to 16 bits: 0.1 -> 0.1000061). Shape ``shape``,
    dtype ``dtype``.

    One 64-bit draw of the global generator gives four 16-bit uniforms (4x fewer draws than
    ``torch.rand``, whose per-element float draw dominated dropout's cost on CPU: the mask of a
    ``(32, 128, 192)`` input costs ~1.3 ms instead of ~4.6 ms on the 2-core development CPU)."""
    n = math.prod(shape)
    drop = round(p * 65536)
    bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-2**63, None)
    keep = bits.view(torch.int16)[:n].view(shape) >= drop - 32768
    return keep.to(dtype).mul_(1.0 / (1.0 - drop / 65536))


class _DropoutFunction(torch.autograd.Function):
    """``x · mask`` with the scaled keep-mask of ``dropout_mask``, saved (in x's dtype) for the
    backward pass: one multiply each way, where a boolean mask costs a slow mixed-dtype multiply."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        mask = dropout_mask(x.shape, p, x.dtype, x.device)
        ctx.save_for_backward(mask)
        return x * mask

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (mask,) = ctx.saved_tensors
        return g * mask, None


class Dropout(nn.Dropout):
    """Inverted dropout (Srivastava et al. 2014): in training mode each element is zeroed with
    probability ``p`` and the rest scaled by ``1/(1-p)``; identity in eval mode or at ``p = 0``.
    Shapes unchanged. The mask comes from ``dropout_mask`` (the global generator: seeded,
    checkpointed and resumed like every other draw; ``p`` quantized to 1/65536), which on CPU
    is several times faster than the Bernoulli sampling of ``torch.nn.Dropout``. ``p`` can be
    changed after construction (alignment stages set it to 0)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        return _DropoutFunction.apply(x, float(self.p))
