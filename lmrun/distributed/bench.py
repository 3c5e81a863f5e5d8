"""Communication benchmarks of ``stage=benchmark``: ``benchmark=collectives`` (all-reduce,
all-gather, reduce-scatter over message sizes × world sizes × backends: time and bus bandwidth)
and ``benchmark=ddp`` (each distributed strategy's training step on the same model and global
batch: time, the share of it not spent computing, and memory per rank).

Each grid point runs in fresh processes (``lmrun.distributed.env.spawn``, a local rendezvous).
Every rank runs the same number of iterations, each started after a barrier; an iteration's time
is the slowest rank's (all-reduce MAX), and the median and 20th/80th percentiles are reported.
Bus bandwidth follows nccl-tests: all-reduce ``bytes/t · 2(n-1)/n``, all-gather and
reduce-scatter ``bytes/t · (n-1)/n``, with ``bytes`` the full (gathered / reduced) buffer.
"""
from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist

from lmrun.kernels.benchmark import _quantile

COLLECTIVES = ["all_reduce", "all_gather", "reduce_scatter"]
BUS_FACTOR = {"all_reduce": lambda n: 2 * (n - 1) / n, "all_gather": lambda n: (n - 1) / n,
              "reduce_scatter": lambda n: (n - 1) / n}


def _timed(fn, warmup: int, reps: int, device) -> list[float]:
    times = []
    for i in range(warmup + reps):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
        dist.all_reduce(dt, op=dist.ReduceOp.MAX)
        if i >= warmup:
            times.append(float(dt) * 1000)
    return times


def _row(params: dict, impl: str, pass_: str, times: list[float]) -> dict:
    return {**params, "impl": impl, "pass": pass_, "status": "ok", "median_ms": statistics.median(times),
            "p20_ms": _quantile(times, 0.2), "p80_ms": _quantile(times, 0.8), "reps": len(times), "peak_mb": None,
            "note": ""}


def collectives_worker(rank: int, world: int, ops: list[str], sizes_mb: list[float], backend: str, warmup: int,
                       reps: int) -> list[dict]:
    """Time each collective on float32 buffers of ``sizes_mb`` MiB (the full buffer); rows on rank 0."""
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    from lmrun.distributed.fsdp import _all_gather, _reduce_scatter

    rows = []
    for size in sizes_mb:
        n = max(world, int(size * 2**20 / 4) // world * world)
        full = torch.randn(n, device=device)
        part = torch.randn(n // world, device=device)
        fns = {"all_reduce": lambda: dist.all_reduce(full),
               "all_gather": lambda: _all_gather(full, part),
               "reduce_scatter": lambda: _reduce_scatter(part, full)}
        for op in ops:
            times = _timed(fns[op], warmup, reps, device)
            r = _row({"size_mb": size, "world_size": world, "backend": backend}, op, "collective", times)
            r["bus_gbps"] = n * 4 / (r["median_ms"] / 1000) * BUS_FACTOR[op](world) / 1e9
            rows.append(r)
    return rows if rank == 0 else []


def ddp_worker(rank: int, world: int, model_cfg: dict, strategies: list[str], batch_size: int, context_length: int,
               bucket_size_mb: float, warmup: int, reps: int) -> list[dict]:
    """Time one training step (forward, backward, gradient synchronisation, AdamW step) per
    strategy, plus ``local`` — the same per-rank work without any communication; rows on rank 0."""
    from omegaconf import OmegaConf

    from lmrun.distributed.config import DistributedConfig
    from lmrun.distributed.env import DistEnv
    from lmrun.distributed.strategy import Parallel
    from lmrun.model import build_model
    from lmrun.optim import build_optimizer
    from lmrun.optim.config import OptimizerConfig

    mcfg = OmegaConf.create(model_cfg)
    env = DistEnv(rank, world, rank, "gloo", torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(0, int(mcfg.vocab_size), (batch_size, context_length + 1), generator=g)
    ocfg = OptimizerConfig(name="adamw", lr=1e-3)
    rows = []
    for strategy in strategies:
        torch.manual_seed(0)
        model = build_model(mcfg)
        if strategy == "local":
            fwd, opt = model, build_optimizer(model, ocfg)
            x = batch[rank * batch_size // world:(rank + 1) * batch_size // world]
            par = None
        else:
            par = Parallel(DistributedConfig(strategy=strategy, bucket_size_mb=bucket_size_mb), env)
            fwd = par.wrap(model)
            opt = par.build_optimizer(ocfg)
            (x,) = par.shard_batch(batch)

        def step():
            logits = fwd(x[:, :-1])
            torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1)).backward()
            if par is not None:
                par.finish()
            opt.step()
            opt.zero_grad(set_to_none=True)

        times = _timed(step, warmup, reps, env.device)
        r = _row({"size": model_cfg.get("size_name", ""), "world_size": world, "batch": batch_size}, strategy, "step",
                 times)
        if par is not None:
            par.optimizer = opt
            # gradients exist between backward and step: measure them once more
            logits = fwd(x[:, :-1])
            torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1)).backward()
            par.finish()
            opt.step()
            mem = par.memory_bytes()
            opt.zero_grad(set_to_none=True)
        else:
            mem = {"params": sum(p.numel() * 4 for p in model.parameters()), "grads": None,
                   "optimizer_state": sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
                                          if isinstance(v, torch.Tensor))}
        r.update({f"{k}_mb": (v / 2**20 if v is not None else None) for k, v in mem.items()})
        rows.append(r)
        del fwd, opt, model, par
    local = next((r["median_ms"] for r in rows if r["impl"] == "local"), None)
    for r in rows:
        r["comm_share"] = max(0.0, 1 - local / r["median_ms"]) if local and r["impl"] != "local" else None
    return rows if rank == 0 else []
