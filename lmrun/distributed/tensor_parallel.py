"""Tensor parallelism for the Transformer block (Shoeybi et al. 2019, "Megatron-LM: Training
Multi-Billion Parameter Language Models Using Model Parallelism").

Within a block the two matrix products of each sub-layer are split so that only one
all-reduce is needed per sub-layer in each direction:

- attention: ``q_proj``, ``k_proj``, ``v_proj`` are *column-parallel* (rank ``r`` holds the
  rows of its heads — heads ``r·h/W … (r+1)·h/W - 1`` and the matching key/value heads), each
  rank attends over its own heads, and ``output_proj`` is *row-parallel* (the columns of those
  heads); the partial outputs are summed by an all-reduce.
- FFN: ``w1`` (and ``w3`` of gated FFNs) column-parallel over ``d_ff``, ``w2`` row-parallel.

Column-parallel layers take their input through ``f`` (identity forward, all-reduce of the
input gradient backward); row-parallel layers end with ``g`` (all-reduce forward, identity
backward). Everything else — embeddings, norms, LM head — is replicated and, because every rank
sees the same batch and the same activations, gets identical gradients on every rank.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from lmrun.model.layers import Linear

__all__ = ["ColumnParallelLinear", "RowParallelLinear", "copy_to_tp", "gather_tp_params", "load_tp_params",
           "reduce_from_tp", "tensor_parallelize"]


class _CopyToTP(torch.autograd.Function):
    """``f``: identity forward; all-reduce (sum) of the gradient backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromTP(torch.autograd.Function):
    """``g``: all-reduce (sum) forward; identity backward."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def copy_to_tp(x: torch.Tensor, group=None) -> torch.Tensor:
    """Megatron's ``f`` operator (see the module docstring); shape unchanged."""
    return _CopyToTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group=None) -> torch.Tensor:
    """Megatron's ``g`` operator (see the module docstring); shape unchanged."""
    return _ReduceFromTP.apply(x, group)


def _split(t: torch.Tensor, dim: int, rank: int, world: int) -> torch.Tensor:
    return t.detach().chunk(world, dim=dim)[rank].clone()


class ColumnParallelLinear(nn.Module):
    """The rows ``[r·d_out/W, (r+1)·d_out/W)`` of a ``Linear`` (and of its bias): input
    ``(..., d_in)`` (replicated) -> output ``(..., d_out/W)`` (this rank's part). Built from a full
    ``Linear`` with :meth:`from_linear`. Raises ValueError when ``world_size`` does not divide d_out."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group=None):
        super().__init__()
        self.group = group
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias) if bias is not None else None

    @classmethod
    def from_linear(cls, linear: Linear, group=None) -> "ColumnParallelLinear":
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        if linear.weight.shape[0] % world:
            raise ValueError(f"output features {linear.weight.shape[0]} not divisible by world size {world}")
        bias = _split(linear.bias, 0, rank, world) if linear.bias is not None else None
        return cls(_split(linear.weight, 0, rank, world), bias, group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = copy_to_tp(x, self.group) @ self.weight.T
        return y + self.bias if self.bias is not None else y


class RowParallelLinear(nn.Module):
    """The columns ``[r·d_in/W, (r+1)·d_in/W)`` of a ``Linear``: input ``(..., d_in/W)`` (this
    rank's part) -> output ``(..., d_out)``, the sum over ranks (all-reduce), plus the bias
    (replicated, added once after the sum). Raises ValueError when ``world_size`` does not divide d_in."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group=None):
        super().__init__()
        self.group = group
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias) if bias is not None else None

    @classmethod
    def from_linear(cls, linear: Linear, group=None) -> "RowParallelLinear":
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        if linear.weight.shape[1] % world:
            raise ValueError(f"input features {linear.weight.shape[1]} not divisible by world size {world}")
        bias = linear.bias.detach().clone() if linear.bias is not None else None
        return cls(_split(linear.weight, 1, rank, world), bias, group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = reduce_from_tp(x @ self.weight.T, self.group)
        return y + self.bias if self.bias is not None else y


#: (module path inside a block, split kind) of the parallelised linears; the dim of the weight
#: that is split: column -> 0 (d_out), row -> 1 (d_in)
COLUMN, ROW = "column", "row"
SPLITS = {"attn.q_proj": COLUMN, "attn.k_proj": COLUMN, "attn.v_proj": COLUMN, "attn.output_proj": ROW,
          "ffn.w1": COLUMN, "ffn.w3": COLUMN, "ffn.w2": ROW}


def tensor_parallelize(model: nn.Module, group=None) -> nn.Module:
    """Split every block of ``model.layers`` in place (see the module docstring) across the
    group's ranks; parameters keep their names (``layers.{i}.attn.q_proj.weight`` now holds this
    rank's rows). Broadcasts rank 0's parameters first. Returns ``model``.

    Raises ValueError when world_size does not divide num_heads, n_kv_heads or d_ff, or the
    block has QK-norm (its weight is shared by all heads and would need its own all-reduce)."""
    from lmrun.distributed.ddp import broadcast_module

    world = dist.get_world_size(group)
    broadcast_module(model, group=group)
    for i, block in enumerate(model.layers):
        attn = block.attn
        if attn.num_heads % world or attn.n_kv_heads % world:
            raise ValueError(f"layers.{i}.attn: num_heads={attn.num_heads} and n_kv_heads={attn.n_kv_heads} must be "
                             f"divisible by the tensor-parallel size {world}")
        if attn.q_norm is not None:
            raise ValueError(f"layers.{i}.attn: QK-norm is not supported with tensor parallelism")
        for path, kind in SPLITS.items():
            parent_name, attr = path.split(".")
            parent = getattr(block, parent_name)
            lin = getattr(parent, attr, None)
            if lin is None:
                continue
            cls = ColumnParallelLinear if kind == COLUMN else RowParallelLinear
            setattr(parent, attr, cls.from_linear(lin, group))
        attn.num_heads //= world
        attn.n_kv_heads //= world
    return model


def _kind(name: str) -> tuple[str | None, int]:
    for path, kind in SPLITS.items():
        if f".{path}.weight" in name:
            return kind, 0 if kind == COLUMN else 1
        if f".{path}.bias" in name and kind == COLUMN:
            return kind, 0
    return None, 0


@torch.no_grad()
def gather_tp_params(model: nn.Module, group=None) -> dict[str, torch.Tensor]:
    """Collective: the full (unsplit) state dict of a tensor-parallel model — split tensors are
    all-gathered along their split dimension, replicated ones copied."""
    world = dist.get_world_size(group)
    out = {}
    for name, t in model.state_dict().items():
        kind, dim = _kind(name)
        if kind is None:
            out[name] = t.detach().clone()
            continue
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t.detach().contiguous(), group=group)
        out[name] = torch.cat(parts, dim=dim)
    return out


def split_tp_tensor(name: str, full: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's part of the full tensor ``name`` (unchanged for replicated ones)."""
    kind, dim = _kind(name)
    return full if kind is None else full.chunk(world, dim=dim)[rank]


@torch.no_grad()
def load_tp_params(model: nn.Module, state: dict[str, torch.Tensor], group=None) -> None:
    """Load a full (unsplit) state dict into a tensor-parallel model: each rank keeps its part."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    model.load_state_dict({k: split_tp_tensor(k, v, rank, world) for k, v in state.items()})
