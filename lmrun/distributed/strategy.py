"""A distributed strategy as the training loop sees it: wrap the model, build the optimizer,
split the batch, synchronise gradients, clip by the global norm, and save / load *full* state
(the same checkpoint format as a single process, whatever the strategy and world size).

``Parallel(cfg, env)`` with a single process (``env.world_size == 1``) does nothing: the model
is not wrapped and training is exactly the single-process loop.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist
from torch import nn

from lmrun.distributed.config import DistributedConfig
from lmrun.distributed.env import DistEnv
from lmrun.distributed.fsdp import _all_gather

__all__ = ["Parallel"]

_DDP_CLASSES = {"ddp": "DDP", "ddp_naive": "DDPNaive", "ddp_flat": "DDPFlat", "ddp_bucketed": "DDPBucketed",
                "zero1": "DDPBucketed"}


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


class Parallel:
    """The strategy ``cfg.strategy`` on the process group ``env`` describes (see
    ``lmrun.distributed.config.DistributedConfig``). Call :meth:`wrap` first, then
    :meth:`build_optimizer`; in each step :meth:`sync_context` around every micro-batch's
    backward, then :meth:`finish` and :meth:`clip_grad_norm`."""

    def __init__(self, cfg: DistributedConfig, env: DistEnv):
        self.cfg, self.env = cfg, env
        self.strategy = cfg.strategy if env.distributed else "none"
        self.model: nn.Module | None = None  # the plain model (parameters possibly replaced: fsdp)
        self.wrapped: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None

    @property
    def active(self) -> bool:
        return self.env.distributed

    @property
    def data_parallel(self) -> bool:
        """Whether ranks split the batch (all but tp)."""
        return self.active and self.strategy != "tp"

    # --- setup -----------------------------------------------------------------------------------
    def wrap(self, model: nn.Module, find_unused_parameters: bool = False) -> nn.Module:
        """The module to call for forward passes (``model`` itself for a single process and tp).
        ``find_unused_parameters`` is passed to torch_ddp (ours handle unused parameters anyway)."""
        from lmrun.distributed import ddp as ddp_mod

        self.model = model
        s = self.strategy
        if s == "none":
            self.wrapped = model
        elif s in _DDP_CLASSES:
            cls = getattr(ddp_mod, _DDP_CLASSES[s])
            self.wrapped = cls(model, self.cfg.bucket_size_mb) if cls is ddp_mod.DDPBucketed else cls(model)
        elif s == "fsdp":
            from lmrun.distributed.fsdp import FSDP

            dtype = torch.bfloat16 if self.cfg.compute_dtype == "bf16" else None
            self.wrapped = FSDP(model, compute_dtype=dtype)
        elif s == "tp":
            from lmrun.distributed.tensor_parallel import tensor_parallelize

            self.wrapped = tensor_parallelize(model)
        elif s == "torch_ddp":
            self.wrapped = nn.parallel.DistributedDataParallel(
                model, bucket_cap_mb=self.cfg.bucket_size_mb, find_unused_parameters=find_unused_parameters,
                device_ids=[self.env.device.index] if self.env.device.type == "cuda" else None)
        elif s == "torch_fsdp":
            from torch.distributed.fsdp import fully_shard

            ddp_mod.broadcast_module(model)  # fully_shard keeps each rank's own chunk: start equal
            for block in model.layers:
                fully_shard(block)
            fully_shard(model)
            self.wrapped = model
        else:
            raise ValueError(f"strategy {s!r}")
        return self.wrapped

    def build_optimizer(self, optimizer_cfg) -> torch.optim.Optimizer:
        """The optimizer of ``optimizer_cfg`` over the parameters this strategy trains (shards for
        fsdp, owned parameters' state for zero1)."""
        from lmrun.optim import build_optimizer

        if self.strategy == "zero1":
            from lmrun.distributed.zero import ShardedOptimizer

            full = build_optimizer(self.model, optimizer_cfg)  # groups and hyperparameters; no state yet
            self.optimizer = ShardedOptimizer(full.param_groups, type(full), **full.defaults)
        elif self.strategy == "fsdp":
            self.optimizer = build_optimizer(self.wrapped, optimizer_cfg)
        else:
            self.optimizer = build_optimizer(self.model, optimizer_cfg)
        return self.optimizer

    # --- a step ----------------------------------------------------------------------------------
    def shard_batch(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """This rank's rows of each ``(batch, ...)`` tensor (data-parallel strategies; all rows
        otherwise). Raises ValueError when the world size does not divide the batch."""
        if not self.data_parallel:
            return tensors
        n, w, r = tensors[0].shape[0], self.env.world_size, self.env.rank
        if n % w:
            raise ValueError(f"micro-batch of {n} sequences is not divisible by the world size {w}")
        k = n // w
        return tuple(t[r * k:(r + 1) * k] for t in tensors)

    def sync_context(self, last_micro_batch: bool):
        """Around a micro-batch's backward: DDP variants skip communication except on the last."""
        if not last_micro_batch and hasattr(self.wrapped, "no_sync") and self.strategy != "none":
            return self.wrapped.no_sync()
        return contextlib.nullcontext()

    def finish(self) -> None:
        """Complete gradient synchronisation (before clipping and the optimizer step)."""
        if hasattr(self.wrapped, "finish_gradient_synchronization"):
            self.wrapped.finish_gradient_synchronization()

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """Mean of a scalar over data-parallel ranks (the full batch's loss); unchanged otherwise."""
        if not self.data_parallel:
            return value
        value = value.detach().clone().float()
        dist.all_reduce(value)
        return value / self.env.world_size

    def trainable(self) -> list[torch.Tensor]:
        """The tensors the optimizer updates (shards for fsdp)."""
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    @torch.no_grad()
    def clip_grad_norm(self, max_norm: float) -> float:
        """Global L2 norm of the full gradient (as one process would compute it), clipping in
        place to ``max_norm`` (``inf``: measure only). Non-finite norms are returned unscaled."""
        from lmrun.optim import clip_grad_norm

        if self.strategy in ("none", "ddp", "ddp_naive", "ddp_flat", "ddp_bucketed", "zero1", "torch_ddp"):
            return clip_grad_norm([p for p in self.trainable() if p.grad is not None], max_norm)
        if self.strategy == "torch_fsdp":
            total = torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.grad is not None],
                                                   max_norm if math.isfinite(max_norm) else 1e30)
            return float(total.full_tensor() if hasattr(total, "full_tensor") else total)
        sharded, replicated = self._split_for_norm()
        sq = torch.zeros((), dtype=torch.float64, device=self.env.device)
        for p in sharded:
            sq += p.grad.double().square().sum()
        dist.all_reduce(sq)
        for p in replicated:
            sq += p.grad.double().square().sum()
        total = float(sq.sqrt())
        if math.isfinite(total) and max_norm / (total + 1e-6) < 1.0:
            for p in [*sharded, *replicated]:
                p.grad.mul_(max_norm / (total + 1e-6))
        return total

    def _split_for_norm(self):
        params = [p for p in self.trainable() if p.grad is not None]
        if self.strategy == "fsdp":
            return params, []
        from lmrun.distributed.tensor_parallel import ColumnParallelLinear, RowParallelLinear

        split = {id(m.weight) for m in self.model.modules() if isinstance(m, (ColumnParallelLinear, RowParallelLinear))}
        split |= {id(m.bias) for m in self.model.modules() if isinstance(m, ColumnParallelLinear) and m.bias is not None}
        return [p for p in params if id(p) in split], [p for p in params if id(p) not in split]

    # --- full state --------------------------------------------------------------------------------
    def model_state(self) -> dict[str, torch.Tensor]:
        """Collective: the plain model's full state dict (keys as a single process saves them)."""
        s = self.strategy
        if s == "fsdp":
            return {**self.model.state_dict(), **self.wrapped.gather_full_params()}
        if s == "tp":
            from lmrun.distributed.tensor_parallel import gather_tp_params

            return gather_tp_params(self.model)
        if s == "torch_fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                              broadcast_from_rank0=False))
        return self.model.state_dict()

    def load_model_state(self, state: dict[str, torch.Tensor]) -> None:
        """Load a full state dict (on every rank)."""
        s = self.strategy
        if s == "fsdp":
            self.wrapped.load_full_params(state)
            own = self.model.state_dict()
            self.model.load_state_dict({k: state[k] for k in own if k in state}, strict=False)
        elif s == "tp":
            from lmrun.distributed.tensor_parallel import load_tp_params

            load_tp_params(self.model, state)
        elif s == "torch_fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            set_model_state_dict(self.model, state, options=StateDictOptions(full_state_dict=True))
        else:
            self.model.load_state_dict(state)

    def _param_layout(self):
        """Per optimizer parameter (in optimizer order): (tensor, full shape, how to gather)."""
        out = []
        if self.strategy == "fsdp":
            info = {id(e.shard): e for e in self.wrapped._entries}
            for p in self.trainable():
                e = info[id(p)]
                out.append((p, e.shape, ("fsdp", e)))
        elif self.strategy == "tp":
            from lmrun.distributed.tensor_parallel import _kind

            names = {id(p): n for n, p in self.model.named_parameters()}
            for p in self.trainable():
                kind, dim = _kind(names[id(p)])
                out.append((p, None, ("tp", dim) if kind else None))
        return out

    @torch.no_grad()
    def optimizer_state(self) -> dict:
        """Collective: the optimizer's full state dict — as the same optimizer over the plain
        model would hold it (sharded state tensors gathered)."""
        s = self.strategy
        if s == "torch_fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            return get_optimizer_state_dict(self.model, self.optimizer,
                                            options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        sd = self.optimizer.state_dict()
        if s not in ("fsdp", "tp"):
            return sd
        w = self.env.world_size
        layout = self._param_layout()
        state = {}
        for i, (p, shape, how) in enumerate(layout):
            st = sd["state"].get(i)
            if st is None:
                continue
            new = {}
            for k, v in st.items():
                if isinstance(v, torch.Tensor) and how is not None and v.shape == p.shape:
                    if how[0] == "fsdp":
                        e = how[1]
                        full = torch.empty(w * e.chunk, dtype=v.dtype, device=v.device)
                        _all_gather(full, v.contiguous())
                        v = full[: e.numel].view(e.shape).clone()
                    else:
                        parts = [torch.empty_like(v) for _ in range(w)]
                        dist.all_gather(parts, v.contiguous())
                        v = torch.cat(parts, dim=how[1])
                new[k] = v
            state[i] = new
        return {"state": state, "param_groups": sd["param_groups"]}

    @torch.no_grad()
    def load_optimizer_state(self, sd: dict) -> None:
        """Load a full optimizer state dict (on every rank; each keeps its part)."""
        s = self.strategy
        if s == "torch_fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(self.model, self.optimizer, sd, options=StateDictOptions(full_state_dict=True))
            return
        if s not in ("fsdp", "tp"):
            self.optimizer.load_state_dict(sd)
            return
        w, r = self.env.world_size, self.env.rank
        state = {}
        for i, (p, shape, how) in enumerate(self._param_layout()):
            st = sd["state"].get(i, sd["state"].get(str(i)))
            if st is None:
                continue
            new = {}
            for k, v in st.items():
                if isinstance(v, torch.Tensor) and how is not None and v.dim() > 0 and v.shape != p.shape:
                    if how[0] == "fsdp":
                        e = how[1]
                        flat = torch.zeros(w * e.chunk, dtype=v.dtype, device=p.device)
                        flat[: e.numel] = v.reshape(-1)
                        v = flat[r * e.chunk:(r + 1) * e.chunk].clone()
                    else:
                        v = v.chunk(w, dim=how[1])[r].clone()
                new[k] = v
            state[i] = new
        self.optimizer.load_state_dict({"state": state, "param_groups": sd["param_groups"]})

    # --- accounting ----------------------------------------------------------------------------------
    def memory_bytes(self) -> dict[str, int]:
        """Bytes this rank holds: ``params`` (what persists between steps: shards for fsdp, plus
        its largest gathered unit as ``params_peak``), ``grads`` and ``optimizer_state``."""
        opt = self.optimizer
        if self.strategy == "zero1":
            opt_bytes = opt.local_state_bytes()
        else:
            opt_bytes = _tensor_bytes(_local(v) for s in opt.state.values() for v in s.values())
        params = self.trainable()
        out = {"params": _tensor_bytes(_local(p) for p in params),
               "grads": _tensor_bytes(_local(p.grad) for p in params if p.grad is not None),
               "optimizer_state": opt_bytes}
        if self.strategy == "fsdp":
            m = self.wrapped.memory_bytes()
            out["params_peak"] = out["params"] + m["root"] + m["largest_unit"]
        return out


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t
