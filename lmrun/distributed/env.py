"""Process-group setup from torchrun or Slurm environment variables, rank-aware logging and
seeding, clean teardown, and a local launcher (``spawn``) for tests and benchmarks.

torchrun and lmrun's Slurm launcher (submitit's ``TorchDistributedEnvironment``) both export
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; a bare Slurm step
(``srun python ...``) exports ``SLURM_PROCID``, ``SLURM_NTASKS`` and ``SLURM_LOCALID`` instead,
which :func:`dist_env` also reads. Backend ``nccl`` on CUDA, ``gloo`` on CPU.
"""
from __future__ import annotations

import datetime
import logging
import os
import socket
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from lmrun.errors import LmrunError

log = logging.getLogger(__name__)

__all__ = ["DistEnv", "dist_env", "free_port", "init_distributed", "is_main_process", "joined_process_group",
           "quiet_non_main_logging", "seed_rank", "spawn", "teardown"]

_JOINED = False  # whether this process has joined a process group (init_distributed)


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: ``rank`` in ``[0, world_size)``, ``local_rank`` on its node,
    the backend (gloo | nccl) and the device it computes on (``cuda:<local_rank>`` or cpu)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = "gloo"
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(*names: str) -> int | None:
    for n in names:
        if os.environ.get(n, "").strip():
            return int(os.environ[n])
    return None


def dist_env(device: str = "auto", backend: str = "auto") -> DistEnv:
    """The ``DistEnv`` the environment describes (rank 0 of 1 when no launcher set one).

    device: auto | cpu | cuda; backend: auto (nccl for CUDA, gloo for CPU) | gloo | nccl.
    Raises LmrunError for nccl without CUDA, or a rank outside ``[0, world_size)``."""
    rank = _env_int("RANK", "SLURM_PROCID") or 0
    world = _env_int("WORLD_SIZE", "SLURM_NTASKS") or 1
    local = _env_int("LOCAL_RANK", "SLURM_LOCALID") or 0
    if not 0 <= rank < world:
        raise LmrunError(f"RANK={rank} is outside [0, WORLD_SIZE={world})")
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise LmrunError("device cuda: no CUDA device is available")
    if backend == "auto":
        backend = "nccl" if use_cuda else "gloo"
    if backend == "nccl" and not use_cuda:
        raise LmrunError("distributed.backend=nccl needs CUDA devices (use gloo on CPU)")
    dev = torch.device("cuda", local % max(1, torch.cuda.device_count())) if use_cuda else torch.device("cpu")
    return DistEnv(rank, world, local, backend, dev)


def init_distributed(device: str = "auto", backend: str = "auto", timeout_s: float = 600.0) -> DistEnv:
    """Join the process group the environment describes (``env://`` rendezvous on MASTER_ADDR:
    MASTER_PORT) and return this process's ``DistEnv``; a single process (WORLD_SIZE unset or 1)
    creates no group. Idempotent: an existing default group is reused. On CUDA the process's
    device becomes ``cuda:<local_rank>``. Raises LmrunError when MASTER_ADDR/PORT are missing."""
    env = dist_env(device, backend)
    if not env.distributed or dist.is_initialized():
        return env
    if env.device.type == "cuda":
        torch.cuda.set_device(env.device)
    os.environ.setdefault("RANK", str(env.rank))
    os.environ.setdefault("WORLD_SIZE", str(env.world_size))
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing:
        raise LmrunError(f"WORLD_SIZE={env.world_size} but {', '.join(missing)} is not set (launch with torchrun or "
                         "lmrun's Slurm launcher)")
    dist.init_process_group(env.backend, rank=env.rank, world_size=env.world_size,
                            timeout=datetime.timedelta(seconds=timeout_s),
                            device_id=env.device if env.device.type == "cuda" else None)
    global _JOINED
    _JOINED = True
    log.info("rank %d of %d joined the %s process group (%s)", env.rank, env.world_size, env.backend, env.device)
    return env


def teardown() -> None:
    """Leave the process group (a barrier first, so no rank exits while others still talk)."""
    if dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def joined_process_group() -> bool:
    """Whether this process joined a process group with :func:`init_distributed` (it may have
    left it since)."""
    return _JOINED


def is_main_process() -> bool:
    """True on rank 0 (and in a single process)."""
    return not dist.is_initialized() or dist.get_rank() == 0


def seed_rank(seed: int, rank: int = 0, offset_by_rank: bool = False) -> int:
    """Seed torch (and Python, NumPy) with ``seed`` (+ ``rank`` with ``offset_by_rank``, for
    per-rank randomness such as dropout in data-parallel training); returns the seed used.
    Model initialisation uses the same seed on every rank (parameters are also broadcast)."""
    from lmrun.tracking.run import seed_everything

    s = int(seed) + (int(rank) if offset_by_rank else 0)
    seed_everything(s)
    torch.manual_seed(s)
    return s


class _RankFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING


def quiet_non_main_logging(rank: int) -> None:
    """On ranks other than 0: drop the root logger's file handlers (only rank 0 writes the run's
    log) and keep warnings and errors on the console, prefixed with the rank."""
    if rank == 0:
        return
    root = logging.getLogger()
    for h in list(root.handlers):
        if isinstance(h, logging.FileHandler):
            root.removeHandler(h)
            h.close()
        else:
            h.addFilter(_RankFilter())
            if h.formatter is not None:
                h.setFormatter(logging.Formatter(f"[rank {rank}]" + (h.formatter._fmt or "%(message)s")))


def free_port() -> int:
    """A TCP port the OS reports free on 127.0.0.1 (for a local rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn_entry(rank: int, fn: Callable, world_size: int, port: int, backend: str, args: tuple, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=120))
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def spawn(fn: Callable, world_size: int = 2, *args, backend: str = "gloo") -> list:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` fresh processes joined in a
    ``backend`` process group on a free local port (no torchrun needed); returns the values the
    ranks returned, by rank. ``fn`` must be importable (a module-level function) and its result
    picklable. Raises the first failing rank's error (``torch.multiprocessing.ProcessRaisedException``)."""
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="lmrun-spawn-") as out:
        mp.start_processes(_spawn_entry, args=(fn, world_size, free_port(), backend, args, out), nprocs=world_size,
                           join=True, start_method="spawn")
        return [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]
