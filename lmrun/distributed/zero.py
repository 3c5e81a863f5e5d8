"""ZeRO stage 1: optimizer-state sharding (Rajbhandari et al. 2020, "ZeRO: Memory Optimizations
Toward Training Trillion Parameter Models"; CS336 assignment 2, §3).

Every rank holds all parameters and (after data-parallel gradient averaging) all gradients,
but each parameter is *owned* by one rank, which alone keeps its optimizer state and updates
it; the updated parameters are then broadcast from their owners. Ownership is whole parameters,
assigned greedily to the rank with the fewest owned elements so far, so any
``torch.optim.Optimizer`` works unchanged (including matrix-wise ones like Muon), and the
state per rank is about ``1/world_size`` of the unsharded state (exactly so when parameters
are small next to the total).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

__all__ = ["ShardedOptimizer"]


class ShardedOptimizer(torch.optim.Optimizer):
    """``ShardedOptimizer(params, optimizer_cls, **kwargs)``: ``optimizer_cls(owned_groups,
    **kwargs)`` steps only the parameters this rank owns; ``step()`` then broadcasts every
    parameter from its owner (one flattened broadcast per owner rank).

    params: tensors or parameter-group dicts, as for any optimizer; every rank must pass the
    same parameters in the same order. ``param_groups`` holds the *full* groups (set ``lr``
    there, e.g. with a schedule; hyperparameters are copied to the local optimizer on each
    step). ``add_param_group`` shards the new group's parameters too. ``owner[i]`` is the rank
    owning the i-th parameter (in group order); ``local_optimizer`` is the wrapped optimizer (None
    on a rank that owns nothing).

    ``state_dict()`` is collective (every rank must call it) and returns the *consolidated*
    state, in the format ``optimizer_cls`` over all parameters would produce, so checkpoints
    are independent of the world size; ``load_state_dict`` accepts that format on every rank
    and keeps each rank's owned part. Raises ValueError for an empty parameter list.
    """

    def __init__(self, params, optimizer_cls: type[torch.optim.Optimizer], group=None, **kwargs: Any):
        self.optimizer_cls, self.optimizer_kwargs = optimizer_cls, dict(kwargs)
        self.pg = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.local_optimizer: torch.optim.Optimizer | None = None
        self.owner: list[int] = []
        self._load = [0] * self.world_size
        self._local_groups: list[dict | None] = []
        super().__init__(params, dict(kwargs))

    # --- sharding ----------------------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        """Add a group (as ``torch.optim.Optimizer.add_param_group``) and shard its parameters."""
        super().add_param_group(param_group)
        full = self.param_groups[-1]
        owned = []
        for p in full["params"]:
            r = min(range(self.world_size), key=lambda k: (self._load[k], k))
            self._load[r] += p.numel()
            self.owner.append(r)
            if r == self.rank:
                owned.append(p)
        if not owned:
            self._local_groups.append(None)
            return
        local = {k: v for k, v in full.items() if k != "params"}
        local["params"] = owned
        if self.local_optimizer is None:
            self.local_optimizer = self.optimizer_cls([local], **self.optimizer_kwargs)
        else:
            self.local_optimizer.add_param_group(local)
        self._local_groups.append(self.local_optimizer.param_groups[-1])

    def _all_params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    # --- stepping ----------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None, **kwargs):
        """Step the owned parameters, then broadcast all parameters from their owners.
        Returns the closure's loss (or None)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for full, local in zip(self.param_groups, self._local_groups):
            if local is not None:
                for k, v in full.items():
                    if k != "params":
                        local[k] = v
        if self.local_optimizer is not None:
            self.local_optimizer.step(**kwargs)
        self._broadcast_params()
        return loss

    def _broadcast_params(self) -> None:
        params = self._all_params()
        works = []
        flats = []
        for r in range(self.world_size):
            mine = [p for p, o in zip(params, self.owner) if o == r]
            if not mine:
                continue
            flat = torch._utils._flatten_dense_tensors([p.data for p in mine])
            flats.append((mine, flat))
            works.append(dist.broadcast(flat, src=dist.get_global_rank(self.pg, r) if self.pg else r, group=self.pg,
                                        async_op=True))
        for w in works:
            w.wait()
        for mine, flat in flats:
            for p, new in zip(mine, torch._utils._unflatten_dense_tensors(flat, [p.data for p in mine])):
                p.data.copy_(new)

    # --- state ---------------------------------------------------------------------------------
    def local_state_bytes(self) -> int:
        """Bytes of optimizer-state tensors this rank holds."""
        if self.local_optimizer is None:
            return 0
        return sum(v.numel() * v.element_size() for s in self.local_optimizer.state.values() for v in s.values()
                   if isinstance(v, torch.Tensor))

    def _local_index(self) -> dict[int, torch.Tensor]:
        return {i: p for i, (p, o) in enumerate(zip(self._all_params(), self.owner)) if o == self.rank}

    def state_dict(self) -> dict:
        """The consolidated state (collective): ``{"state": {i: state of parameter i}, "param_groups":
        [...]}`` with parameters numbered across groups in order, as an unsharded optimizer's."""
        local = self.local_optimizer.state if self.local_optimizer is not None else {}
        mine = {i: {k: (v.detach().cpu() if isinstance(v, torch.Tensor) else v) for k, v in local[p].items()}
                for i, p in self._local_index().items() if p in local}
        gathered: list = [None] * self.world_size
        dist.all_gather_object(gathered, mine, group=self.pg)
        state: dict = {}
        for part in gathered:
            state.update(part)
        groups, start = [], 0
        for g in self.param_groups:
            entry = {k: v for k, v in g.items() if k != "params"}
            entry["params"] = list(range(start, start + len(g["params"])))
            start += len(g["params"])
            groups.append(entry)
        return {"state": dict(sorted(state.items())), "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a consolidated state (as :meth:`state_dict` returns); each rank keeps its part.
        Raises ValueError when the groups do not match this optimizer's."""
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups) or any(len(a["params"]) != len(b["params"])
                                                         for a, b in zip(groups, self.param_groups)):
            raise ValueError("loaded state dict has a different number of parameter groups or parameters")
        for g, saved in zip(self.param_groups, groups):
            g.update({k: v for k, v in saved.items() if k != "params"})
        if self.local_optimizer is None:
            return
        index = self._local_index()
        local_params = [p for g in self.local_optimizer.param_groups for p in g["params"]]
        position = {id(p): n for n, p in enumerate(local_params)}
        saved_state = state_dict["state"]
        local_state = {position[id(p)]: saved_state.get(i, saved_state.get(str(i))) for i, p in index.items()
                       if (i in saved_state or str(i) in saved_state)}
        local_groups, n = [], 0
        for full, local in zip(self.param_groups, self._local_groups):
            if local is None:
                continue
            entry = {k: v for k, v in full.items() if k != "params"}
            entry["params"] = list(range(n, n + len(local["params"])))
            n += len(local["params"])
            local_groups.append(entry)
        self.local_optimizer.load_state_dict({"state": local_state, "param_groups": local_groups})
