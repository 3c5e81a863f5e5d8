"""Distributed training written from scratch: process-group setup (torchrun or Slurm), DDP
variants, ZeRO-1 optimizer-state sharding, FSDP and tensor parallelism, and the strategy layer
the training loop uses (``distributed.strategy``). See each module's docstring for its source."""
from lmrun.distributed.config import STRATEGIES, DistributedConfig, validate_distributed

_ENV = ("DistEnv", "dist_env", "free_port", "init_distributed", "is_main_process", "quiet_non_main_logging",
        "seed_rank", "spawn", "teardown")

__all__ = ["STRATEGIES", "DistEnv", "DistributedConfig", "dist_env", "free_port", "init_distributed",
           "is_main_process", "quiet_non_main_logging", "seed_rank", "spawn", "teardown", "validate_distributed", "DDP", "DDPBucketed", "DDPFlat",
           "DDPNaive", "ShardedOptimizer", "FSDP", "Parallel", "ColumnParallelLinear", "RowParallelLinear",
           "tensor_parallelize"]


def __getattr__(name):  # everything importing torch loads on first use (the CLI composes configs without it)
    if name in _ENV:
        from lmrun.distributed import env

        return getattr(env, name)
    if name in ("DDP", "DDPBucketed", "DDPFlat", "DDPNaive"):
        from lmrun.distributed import ddp

        return getattr(ddp, name)
    if name == "ShardedOptimizer":
        from lmrun.distributed.zero import ShardedOptimizer

        return ShardedOptimizer
    if name == "FSDP":
        from lmrun.distributed.fsdp import FSDP

        return FSDP
    if name == "Parallel":
        from lmrun.distributed.strategy import Parallel

        return Parallel
    if name in ("ColumnParallelLinear", "RowParallelLinear", "tensor_parallelize"):
        from lmrun.distributed import tensor_parallel

        return getattr(tensor_parallel, name)
    raise AttributeError(name)
