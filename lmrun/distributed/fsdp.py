"""Fully sharded data parallelism (Zhao et al. 2023, "PyTorch FSDP: Experiences on Scaling Fully
Sharded Data Parallel"; ZeRO stage 3, Rajbhandari et al. 2020; CS336 assignment 2).

Each trainable parameter is flattened, padded to a multiple of ``world_size`` and split: rank
``r`` keeps chunk ``r`` as a *master shard* in the parameter's dtype (fp32 for lmrun's models) (an ``nn.Parameter`` the optimizer updates).
The model is cut into *units* — by default each block of ``module.layers`` plus a *root* unit
holding everything else (embeddings, final norm, LM head, tied weights). Before a unit's
forward its parameters are all-gathered (in ``compute_dtype``) into one buffer whose storage is
freed again after the forward; the backward pass gathers them once more (a hook on the unit's
output fires before the unit's backward), and as soon as every parameter of the unit has its
gradient (``register_post_accumulate_grad_hook``), the gradients are reduce-scattered
asynchronously and the unit's buffer is freed. The root unit stays gathered from the start of
``forward`` to ``finish_gradient_synchronization()``, which reduce-scatters it, waits for all
reductions and sets each shard's ``.grad`` to the mean over ranks (fp32). Gradients accumulate
across several backward passes until the optimizer's ``zero_grad``.

Memory per rank: parameters ``≈ total/world_size`` (+ padding) in fp32, plus the gathered root
and at most one gathered block at a time in ``compute_dtype``.

Restrictions: the same parameters must be used on every rank; a parameter shared by several
units belongs to the root (this is automatic); parameters that do not require gradients and
buffers are replicated (broadcast from rank 0), not sharded; activation checkpointing is not
supported. Optimizers that treat a parameter as a matrix (Muon, SOAP) see 1-D shards and are not
equivalent to unsharded training; elementwise ones (AdamW, SGD) are.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

# PyTorch >= 2.10 names the single-tensor collectives *_single (the *_tensor names warn)
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

from lmrun.distributed.ddp import broadcast_module

__all__ = ["FSDP"]


class _Entry:
    """One trainable parameter: where it was used, its shape, its shard and its gathered view."""

    def __init__(self, names, uses, param: torch.Tensor, world: int, rank: int, dtype: torch.dtype):
        self.names, self.uses = names, uses
        self.shape, self.numel = tuple(param.shape), param.numel()
        self.chunk = math.ceil(self.numel / world)
        flat = torch.zeros(self.chunk * world, dtype=param.dtype, device=param.device)
        flat[: self.numel] = param.detach().reshape(-1)
        self.shard = nn.Parameter(flat[rank * self.chunk:(rank + 1) * self.chunk].clone())
        self.view: torch.Tensor | None = None
        self.offset = 0  # in the unit's gathered buffer (elements)
        self.shard_offset = 0  # in the unit's concatenated shards (elements)
        self.dtype = dtype


class _Unit:
    def __init__(self, name: str, module: nn.Module, entries: list[_Entry], dtype, device, is_root: bool):
        self.name, self.module, self.entries, self.is_root = name, module, entries, is_root
        self.dtype, self.device = dtype, device
        off = soff = 0
        for e in entries:
            e.offset, e.shard_offset = off, soff
            off += e.numel
            soff += e.chunk
        self.numel, self.shard_numel = off, soff
        self.buffer = torch.empty(max(off, 1), dtype=dtype, device=device)
        self.storage = self.buffer.untyped_storage()
        self.nbytes = self.storage.nbytes()
        for e in entries:  # each view: its own leaf with its own version counter, aliasing the buffer
            v = torch.empty(0, dtype=dtype, device=device)
            v.set_(self.storage, e.offset, e.shape, _contiguous_strides(e.shape))
            e.view = v.requires_grad_()
        self.gathered = True
        self.ready: set[int] = set()
        self.pending: list[tuple] = []  # (work, out, entries that had gradients) per reduce-scatter

    def free(self) -> None:
        if self.gathered:
            self.storage.resize_(0)
            self.gathered = False


def _contiguous_strides(shape) -> tuple:
    strides, acc = [], 1
    for s in reversed(shape):
        strides.append(acc)
        acc *= s
    return tuple(reversed(strides))


class FSDP(nn.Module):
    """``FSDP(module, compute_dtype=None)``: ``module`` sharded across the process group's ranks.

    module: the model (its trainable parameters are replaced by views of gathered buffers; use
        the wrapper, not the module, for forward). compute_dtype: dtype of gathered parameters,
        of the forward/backward computation and of gradient communication (e.g.
        ``torch.bfloat16``; None: the parameters' dtype); master shards and optimizer state keep
        the parameters' dtype.
    units: the submodules that are gathered and freed one at a time (default: the children of
        ``module.layers`` if it exists, else none — everything is in the root unit).

    ``parameters()`` / ``named_parameters()`` yield the fp32 shards (1-D, ``ceil(numel /
    world_size)`` elements) under the original names (a tied shard under each of its names with
    ``remove_duplicate=False``), so an optimizer built from names works unchanged.
    ``gather_full_params()`` (collective) returns ``{name: full fp32 tensor}``;
    ``load_full_params(state)`` sets the shards from full tensors. Raises ValueError for a
    parameter that requires gradients and is not floating point.
    """

    def __init__(self, module: nn.Module, compute_dtype: torch.dtype | None = None, units=None, group=None):
        super().__init__()
        self.module, self.group = module, group
        self.world_size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        broadcast_module(module, group=group)
        if units is None:
            units = list(module.layers) if isinstance(getattr(module, "layers", None), nn.ModuleList) else []
        unit_of_module = {id(m): i for i, u in enumerate(units) for m in u.modules()}
        # every trainable parameter, its names and (module, attribute) uses, and the unit it is in
        info: dict[int, dict] = {}
        for mod_name, mod in module.named_modules(remove_duplicate=False):
            for attr, p in list(mod._parameters.items()):
                if p is None or not p.requires_grad:
                    continue
                if not p.is_floating_point():
                    raise ValueError(f"{mod_name}.{attr}: FSDP shards floating-point parameters only")
                d = info.setdefault(id(p), {"param": p, "names": [], "uses": [], "units": set()})
                name = f"{mod_name}.{attr}" if mod_name else attr
                if name not in d["names"]:
                    d["names"].append(name)
                if (mod, attr) not in [(m, a) for m, a in d["uses"]]:
                    d["uses"].append((mod, attr))
                d["units"].add(unit_of_module.get(id(mod), -1))
        first = next(iter(info.values()))["param"] if info else torch.empty(0)
        device = first.device
        self.compute_dtype = compute_dtype or first.dtype
        grouped: dict[int, list[_Entry]] = {}
        self._entries: list[_Entry] = []
        for d in info.values():
            u = next(iter(d["units"])) if len(d["units"]) == 1 else -1
            e = _Entry(d["names"], d["uses"], d["param"], self.world_size, self.rank, self.compute_dtype)
            grouped.setdefault(u, []).append(e)
            self._entries.append(e)
        self.units = [_Unit("root", module, grouped.get(-1, []), self.compute_dtype, device, True)]
        self.units += [_Unit(f"unit{i}", m, grouped[i], self.compute_dtype, device, False)
                       for i, m in enumerate(units) if grouped.get(i)]
        self.root = self.units[0]
        self.shards = nn.ParameterList([e.shard for e in self._entries])
        for unit in self.units:
            for e in unit.entries:
                for mod, attr in e.uses:
                    del mod._parameters[attr]
                    setattr(mod, attr, e.view)
                e.view.register_post_accumulate_grad_hook(self._make_grad_hook(unit, e))
            if not unit.is_root:
                unit.module.register_forward_pre_hook(self._make_pre_forward(unit))
                unit.module.register_forward_hook(self._make_post_forward(unit))
            unit.free()

    # --- gathering -------------------------------------------------------------------------------
    @torch.no_grad()
    def _gather(self, unit: _Unit) -> None:
        if unit.gathered or not unit.entries:
            unit.gathered = True
            return
        send = torch.cat([e.shard.detach().reshape(-1) for e in unit.entries]).to(self.compute_dtype)
        recv = torch.empty(self.world_size * unit.shard_numel, dtype=self.compute_dtype, device=send.device)
        _all_gather(recv, send, group=self.group)
        unit.storage.resize_(unit.nbytes)
        writer = torch.empty(0, dtype=self.compute_dtype, device=send.device).set_(unit.storage, 0, (unit.numel,), (1,))
        table = recv.view(self.world_size, unit.shard_numel)
        for e in unit.entries:
            writer[e.offset:e.offset + e.numel].copy_(
                table[:, e.shard_offset:e.shard_offset + e.chunk].reshape(-1)[: e.numel])
        unit.gathered = True

    def _make_pre_forward(self, unit: _Unit):
        def hook(_module, _args):
            unit.free()  # shards may have changed since the last gather
            self._gather(unit)
        return hook

    def _make_post_forward(self, unit: _Unit):
        def hook(_module, _args, output):
            if torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.requires_grad:
                output.register_hook(lambda grad: self._gather(unit))
            unit.free()
        return hook

    # --- gradients ---------------------------------------------------------------------------------
    def _make_grad_hook(self, unit: _Unit, entry: _Entry):
        def hook(_view):
            if unit.is_root:
                return
            unit.ready.add(id(entry))
            if len(unit.ready) == len(unit.entries):
                self._reduce_scatter(unit)
        return hook

    @torch.no_grad()
    def _reduce_scatter(self, unit: _Unit) -> None:
        unit.ready.clear()
        if not any(e.view.grad is not None for e in unit.entries):
            return
        send = torch.zeros(self.world_size, unit.shard_numel, dtype=self.compute_dtype, device=unit.buffer.device)
        had = [e for e in unit.entries if e.view.grad is not None]
        for e in had:
            padded = torch.zeros(self.world_size * e.chunk, dtype=self.compute_dtype, device=send.device)
            padded[: e.numel] = e.view.grad.reshape(-1)
            send[:, e.shard_offset:e.shard_offset + e.chunk] = padded.view(self.world_size, e.chunk)
            e.view.grad = None
        out = torch.empty(unit.shard_numel, dtype=self.compute_dtype, device=send.device)
        work = _reduce_scatter(out, send.view(-1), group=self.group, async_op=True)
        unit.pending.append((work, out, had))
        if not unit.is_root:
            unit.free()

    @torch.no_grad()
    def finish_gradient_synchronization(self) -> None:
        """Reduce-scatter the root unit and any unit not yet reduced (parameters unused in
        forward), wait for every reduction, and add the mean gradient to each shard's ``.grad``
        (fp32). Frees the gathered root."""
        for unit in self.units:
            if unit.ready or unit.is_root or any(e.view.grad is not None for e in unit.entries):
                self._reduce_scatter(unit)
        for unit in self.units:
            for work, out, had in unit.pending:
                work.wait()
                for e in had:  # a parameter without a gradient keeps .grad None, as in one process
                    g = out[e.shard_offset:e.shard_offset + e.chunk].to(e.shard.dtype).div_(self.world_size)
                    e.shard.grad = g.clone() if e.shard.grad is None else e.shard.grad.add_(g)
            unit.pending.clear()
        self.root.free()

    # --- forward ----------------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        self.root.free()  # shards may have changed since the last gather
        self._gather(self.root)
        return self.module(*args, **kwargs)

    # --- parameters and state --------------------------------------------------------------------
    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        """The fp32 shards under the original parameters' names, then the replicated
        (non-trainable) parameters of the module."""
        for e in self._entries:
            for name in (e.names[:1] if remove_duplicate else e.names):
                yield prefix + name, e.shard
        for name, p in self.module.named_parameters(remove_duplicate=remove_duplicate):
            yield prefix + name, p

    @torch.no_grad()
    def gather_full_params(self) -> dict[str, torch.Tensor]:
        """Collective: ``{name: full fp32 parameter}`` for every trainable parameter name (tied
        names share one tensor) and the replicated non-trainable parameters."""
        out = {}
        for e in self._entries:
            full = torch.empty(self.world_size * e.chunk, dtype=e.shard.dtype, device=e.shard.device)
            _all_gather(full, e.shard.detach(), group=self.group)
            t = full[: e.numel].view(e.shape).clone()
            for n in e.names:
                out[n] = t
        for name, p in self.module.named_parameters():
            out[name] = p.detach().clone()
        return out

    @torch.no_grad()
    def load_full_params(self, state: dict[str, torch.Tensor]) -> None:
        """Set every shard from the full tensor under its first name (others are ignored)."""
        for e in self._entries:
            flat = torch.zeros(self.world_size * e.chunk, dtype=e.shard.dtype, device=e.shard.device)
            flat[: e.numel] = state[e.names[0]].reshape(-1).to(flat)
            e.shard.copy_(flat[self.rank * e.chunk:(self.rank + 1) * e.chunk])
        for unit in self.units:
            unit.free()

    def shard_info(self) -> list[tuple[list[str], tuple, int]]:
        """Per trainable parameter: its names, full shape and shard length (elements)."""
        return [(e.names, e.shape, e.chunk) for e in self._entries]

    def memory_bytes(self) -> dict[str, int]:
        """Bytes per rank: ``shards`` (fp32 master shards), ``root`` (the gathered root unit) and
        ``largest_unit`` (the largest gathered block), in ``compute_dtype``."""
        size = torch.tensor([], dtype=self.compute_dtype).element_size()
        return {"shards": sum(e.chunk * 4 for e in self._entries), "root": self.root.numel * size,
                "largest_unit": max((u.numel * size for u in self.units[1:]), default=0)}
