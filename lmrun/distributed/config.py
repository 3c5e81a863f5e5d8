"""Config schema of the `distributed` node (how ``stage=pretrain`` trains across processes) and
its validation. No torch import: the CLI loads this to compose and validate."""
from __future__ import annotations

from dataclasses import dataclass

from lmrun.errors import check, check_choice

#: ours: ddp (per-parameter async all-reduce overlapping the backward pass), ddp_bucketed,
#: ddp_naive, ddp_flat, zero1 (bucketed DDP + ShardedOptimizer), fsdp, tp;
#: PyTorch's own as baselines: torch_ddp (DistributedDataParallel), torch_fsdp (fully_shard)
STRATEGIES = ["ddp_bucketed", "ddp", "ddp_naive", "ddp_flat", "zero1", "fsdp", "tp", "torch_ddp", "torch_fsdp"]
#: strategies whose optimizer sees shards or slices of matrices: matrix-wise optimizers differ
SHARDED_PARAMS = {"fsdp", "tp", "torch_fsdp"}


@dataclass
class DistributedConfig:
    """``distributed``: used when the job runs several processes (torchrun, or a Slurm job with
    several tasks — both set RANK / WORLD_SIZE); a single process ignores it.

    strategy: one of :data:`STRATEGIES`. Data-parallel ones split each micro-batch across ranks
        (``train.batch_size / train.grad_accum_steps`` must be divisible by the world size); ``tp``
        gives every rank the whole batch and splits attention heads and the FFN instead.
    bucket_size_mb: gradient bucket size in MiB (ddp_bucketed, zero1, torch_ddp's bucket_cap_mb).
    backend: auto (nccl on CUDA, gloo on CPU), gloo or nccl.
    compute_dtype: fsdp's dtype of gathered parameters, computation and gradient communication
        (fp32 or bf16; master shards and optimizer state stay fp32).
    timeout_s: collective timeout (seconds) before a stuck job fails.
    """

    strategy: str = "ddp_bucketed"
    bucket_size_mb: float = 25.0
    backend: str = "auto"
    compute_dtype: str = "fp32"
    timeout_s: float = 600.0


def validate_distributed(cfg: DistributedConfig, optimizer_name: str | None = None) -> None:
    """Raise ConfigError for an impossible ``distributed`` config."""
    check_choice("distributed.strategy", cfg.strategy, STRATEGIES)
    check_choice("distributed.backend", cfg.backend, ["auto", "gloo", "nccl"])
    check_choice("distributed.compute_dtype", cfg.compute_dtype, ["fp32", "bf16"])
    check("distributed.bucket_size_mb", cfg.bucket_size_mb, cfg.bucket_size_mb > 0, "a positive number of MiB")
    check("distributed.timeout_s", cfg.timeout_s, cfg.timeout_s > 0, "a positive number of seconds")
    check("distributed.compute_dtype", cfg.compute_dtype, cfg.compute_dtype == "fp32" or cfg.strategy == "fsdp",
          "fp32 unless distributed.strategy=fsdp")
    if optimizer_name is not None and cfg.strategy in SHARDED_PARAMS:
        check("distributed.strategy", cfg.strategy, optimizer_name in ("adamw", "sgd"),
              f"a strategy that keeps whole matrices (ddp*, zero1, torch_ddp) with optimizer={optimizer_name}, "
              "whose update is not elementwise")
