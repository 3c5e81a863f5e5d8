"""Data-parallel training written out: every rank holds the whole model, computes gradients on
its share of the batch, and the gradients are averaged across ranks before the optimizer step.

Four variants, from slowest to fastest (Li et al. 2020, "PyTorch Distributed: Experiences on
Accelerating Data Parallel Training"; CS336 assignment 2):

- :class:`DDPNaive` — after the backward pass, one blocking all-reduce per parameter.
- :class:`DDPFlat` — after the backward pass, all gradients flattened into one buffer and
  all-reduced once (fewer, larger messages).
- :class:`DDP` — one asynchronous all-reduce per parameter, launched from a hook the moment
  its gradient is accumulated, so communication overlaps the rest of the backward pass.
- :class:`DDPBucketed` — parameters grouped (in reverse registration order, roughly the order
  gradients become ready) into buckets of at most ``bucket_size_mb``; a bucket's gradients are
  flattened and all-reduced asynchronously as soon as all of them are ready.

Common contract: the wrapper broadcasts rank 0's parameters and buffers at construction (every
rank starts equal); ``forward`` is the module's; call ``finish_gradient_synchronization()``
after ``loss.backward()`` and before ``optimizer.step()`` — afterwards every parameter's
``.grad`` is the mean over ranks of the per-rank gradients. Parameters that do not require
gradients are broadcast but never communicated; a parameter that gets no gradient in the
backward pass (unused in forward) keeps ``.grad = None`` — this assumes the set of unused
parameters is the same on every rank (a static graph), as ``torch.nn.parallel.
DistributedDataParallel`` does without ``find_unused_parameters``. Tied parameters (one
``Parameter`` under two names) are communicated once. Gradient accumulation: wrap all but the
last micro-batch's backward in ``no_sync()`` (hooks then do nothing; gradients accumulate
locally and are averaged once).
"""
from __future__ import annotations

import abc
import contextlib

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["DDP", "DDPBucketed", "DDPFlat", "DDPNaive", "broadcast_module", "unique_trainable"]


def unique_trainable(module: nn.Module) -> list[nn.Parameter]:
    """The module's parameters that require gradients, each once (tied ones once), in
    registration order."""
    seen, out = set(), []
    for p in module.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


@torch.no_grad()
def broadcast_module(module: nn.Module, src: int = 0, group=None) -> None:
    """Copy rank ``src``'s parameters and buffers into every rank's ``module`` (in place)."""
    tensors = list({id(t): t for t in [*module.parameters(), *module.buffers()]}.values())
    works = [dist.broadcast(t.data, src=src, group=group, async_op=True) for t in tensors]
    for w in works:
        w.wait()


class _DataParallel(nn.Module, abc.ABC):
    """Shared parts: wrapping, the initial broadcast, forward, ``no_sync``."""

    def __init__(self, module: nn.Module, group=None):
        super().__init__()
        self.module = module
        self.group = group
        self.world_size = dist.get_world_size(group)
        broadcast_module(module, group=group)
        self.params = unique_trainable(module)
        self._sync = True

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self):
        """Inside: backward passes accumulate gradients locally without communication."""
        before, self._sync = self._sync, False
        try:
            yield
        finally:
            self._sync = before

    @abc.abstractmethod
    def finish_gradient_synchronization(self) -> None:
        """Wait for (or run) the gradient communication of the last backward pass."""


class DDPNaive(_DataParallel):
    """Data parallelism with one blocking all-reduce per parameter after the backward pass
    (the baseline of CS336 assignment 2, §2.2). ``module``: any ``nn.Module``; ``group``: the
    process group (default: the world)."""

    @torch.no_grad()
    def finish_gradient_synchronization(self) -> None:
        """Average every gradient over ranks (blocking; one collective per parameter)."""
        for p in self.params:
            if p.grad is not None:
                p.grad.div_(self.world_size)
                dist.all_reduce(p.grad, group=self.group)


class DDPFlat(_DataParallel):
    """Data parallelism with all gradients flattened into one buffer and all-reduced once
    after the backward pass (CS336 assignment 2, §2.3.1: fewer calls, same bytes)."""

    @torch.no_grad()
    def finish_gradient_synchronization(self) -> None:
        """Average every gradient over ranks with one all-reduce of the concatenated gradients."""
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            return
        flat = torch._utils._flatten_dense_tensors(grads)
        flat.div_(self.world_size)
        dist.all_reduce(flat, group=self.group)
        for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
            g.copy_(synced)


class DDP(_DataParallel):
    """Data parallelism that overlaps communication with the backward pass: a hook on each
    parameter (``register_post_accumulate_grad_hook``) launches an asynchronous all-reduce of
    its gradient as soon as it is accumulated (Li et al. 2020 §3.2.3; CS336 assignment 2,
    §2.3.2). ``finish_gradient_synchronization()`` waits for all of them."""

    def __init__(self, module: nn.Module, group=None):
        super().__init__(module, group)
        self._works: list = []
        for p in self.params:
            p.register_post_accumulate_grad_hook(self._hook)

    def _hook(self, p: torch.Tensor) -> None:
        if not self._sync:
            return
        with torch.no_grad():
            p.grad.div_(self.world_size)
        self._works.append(dist.all_reduce(p.grad, group=self.group, async_op=True))

    def finish_gradient_synchronization(self) -> None:
        """Wait for every all-reduce launched during the backward pass."""
        for w in self._works:
            w.wait()
        self._works.clear()


class _Bucket:
    def __init__(self, params: list[nn.Parameter]):
        self.params = params
        self.ready: set[int] = set()
        self.work = None
        self.flat: torch.Tensor | None = None
        self.grads: list[torch.Tensor] = []


class DDPBucketed(_DataParallel):
    """Data parallelism with gradient bucketing (Li et al. 2020 §3.2.3; CS336 assignment 2,
    §2.3.3): parameters are assigned, in reverse registration order, to buckets of at most
    ``bucket_size_mb`` MiB (2**20 bytes; a larger parameter gets a bucket of its own); when the
    last gradient of a bucket is accumulated its gradients are flattened and all-reduced
    asynchronously. Buckets still incomplete when the backward pass ends (parameters unused in
    forward) are all-reduced in ``finish_gradient_synchronization()``, which then waits and
    copies the averaged gradients back. ``bucket_sizes_bytes`` lists the buckets' sizes.

    Raises ValueError for ``bucket_size_mb <= 0``."""

    def __init__(self, module: nn.Module, bucket_size_mb: float = 25.0, group=None):
        if not bucket_size_mb > 0:
            raise ValueError(f"bucket_size_mb={bucket_size_mb}: expected a positive number of MiB")
        super().__init__(module, group)
        cap = bucket_size_mb * 2**20
        self.buckets: list[_Bucket] = []
        current, size = [], 0
        for p in reversed(self.params):
            nbytes = p.numel() * p.element_size()
            if current and size + nbytes > cap:
                self.buckets.append(_Bucket(current))
                current, size = [], 0
            current.append(p)
            size += nbytes
        if current:
            self.buckets.append(_Bucket(current))
        self._bucket_of = {id(p): b for b in self.buckets for p in b.params}
        for p in self.params:
            p.register_post_accumulate_grad_hook(self._hook)

    @property
    def bucket_sizes_bytes(self) -> list[int]:
        return [sum(p.numel() * p.element_size() for p in b.params) for b in self.buckets]

    def _hook(self, p: torch.Tensor) -> None:
        if not self._sync:
            return
        b = self._bucket_of[id(p)]
        b.ready.add(id(p))
        if len(b.ready) == len(b.params):
            self._launch(b)

    @torch.no_grad()
    def _launch(self, b: _Bucket) -> None:
        b.grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in b.params]
        b.flat = torch._utils._flatten_dense_tensors(b.grads)
        b.flat.div_(self.world_size)
        b.work = dist.all_reduce(b.flat, group=self.group, async_op=True)

    @torch.no_grad()
    def finish_gradient_synchronization(self) -> None:
        """Launch any bucket not yet launched, wait for all, write the averages into ``.grad``."""
        for b in self.buckets:
            if b.work is None and any(p.grad is not None for p in b.params):
                self._launch(b)
        for b in self.buckets:
            if b.work is None:
                continue
            b.work.wait()
            for p, synced in zip(b.params, torch._utils._unflatten_dense_tensors(b.flat, b.grads)):
                if p.grad is not None:
                    p.grad.copy_(synced)
            b.work, b.flat, b.grads = None, None, []
            b.ready.clear()
