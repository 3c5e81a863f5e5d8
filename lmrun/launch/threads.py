"""CPU threads per process, chosen from the CPUs this process may use — never more.

PyTorch and the BLAS libraries under NumPy/SciPy each start one thread per *core of the
machine* by default, not per CPU the process was given. On a shared or loaded node that is
oversubscription: measured on a busy 2-core machine (issue 26), the scaling fit took 48.8 s with
OpenBLAS's default threads and 2.5 s with one, and training ran 3-30x slower with PyTorch's
default threads beside another job. lmrun therefore sets the thread count itself, once per
process, before the stage runs (top-level key ``threads``; null = automatic):

    threads = CPUs this process may run on // processes sharing them on this node

where the CPUs are the smaller of ``os.sched_getaffinity(0)`` (taskset, cgroups' cpusets) and
Slurm's ``SLURM_CPUS_PER_TASK`` (a Slurm task may see the whole node's CPUs), and the processes
are the local ranks of a distributed job (``LOCAL_WORLD_SIZE`` from torchrun, Slurm's
``SLURM_NTASKS_PER_NODE`` / ``SLURM_TASKS_PER_NODE``) unless Slurm already gave each task its
own CPUs. The count goes to ``torch.set_num_threads`` (intra-op), to every BLAS/OpenMP pool
already loaded (``threadpoolctl``), and to ``OMP_NUM_THREADS``/``OPENBLAS_NUM_THREADS``/
``MKL_NUM_THREADS`` for libraries loaded later; it is recorded in ``run.json`` (``threads``).
"""
from __future__ import annotations

import logging
import os
import sys

from lmrun.errors import ConfigError

log = logging.getLogger(__name__)

__all__ = ["THREAD_ENV_VARS", "apply_threads", "available_cpus", "local_processes", "plan_threads"]

#: environment variables that size the OpenMP/BLAS pools of libraries loaded after the choice
THREAD_ENV_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "VECLIB_MAXIMUM_THREADS",
                   "NUMEXPR_NUM_THREADS")


#: the values :func:`apply_threads` put into os.environ (told apart from ones the user exported)
_SET: dict[str, str] = {}


def _env_int(name: str, env: dict) -> int | None:
    value = str(env.get(name, "")).strip()
    if not value:
        return None
    head = value.split("(")[0].split(",")[0]  # SLURM_TASKS_PER_NODE looks like "2(x3),1"
    try:
        n = int(head)
    except ValueError:
        return None
    return n if n > 0 else None


def available_cpus(env: dict | None = None) -> tuple[int, str]:
    """``(cpus, source)``: the CPUs this process may run on and where that number comes from —
    ``"affinity"`` (``os.sched_getaffinity``, else ``os.cpu_count``) or ``"slurm"``
    (``SLURM_CPUS_PER_TASK`` when it is smaller)."""
    env = os.environ if env is None else env
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cpus = os.cpu_count() or 1
    slurm = _env_int("SLURM_CPUS_PER_TASK", env)
    if slurm is not None and slurm < cpus:
        return slurm, "slurm"
    return max(cpus, 1), "affinity"


def local_processes(env: dict | None = None) -> int:
    """How many processes of this job share this node's CPUs: torchrun's ``LOCAL_WORLD_SIZE``,
    else Slurm's tasks per node (``SLURM_NTASKS_PER_NODE``, ``SLURM_TASKS_PER_NODE``), else 1."""
    env = os.environ if env is None else env
    for name in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        n = _env_int(name, env)
        if n is not None:
            return n
    return 1


def plan_threads(requested: int | None = None, env: dict | None = None) -> dict:
    """The thread count for this process, without applying it.

    requested: ``threads`` from the config (an int >= 1), or None for automatic. Returns
    ``{"threads", "source", "cpus", "local_processes"}``; source is ``"config"``,
    ``"OMP_NUM_THREADS"`` (automatic, and the user exported it: their choice is kept), ``"slurm"``
    or ``"affinity"``. Automatic = cpus // local processes (at least 1); under Slurm with
    ``SLURM_CPUS_PER_TASK`` each task already has its own CPUs, so nothing is divided.
    Raises ConfigError for a requested count below 1."""
    env = os.environ if env is None else env
    cpus, source = available_cpus(env)
    procs = local_processes(env)
    if requested is not None:
        if int(requested) < 1:
            raise ConfigError(f"threads={requested}: expected an integer >= 1, or null for the CPUs this process "
                              f"may use ({cpus})")
        return {"threads": int(requested), "source": "config", "cpus": cpus, "local_processes": procs}
    exported = _env_int("OMP_NUM_THREADS", env)
    if exported is not None and env.get("OMP_NUM_THREADS") != _SET.get("OMP_NUM_THREADS"):
        return {"threads": exported, "source": "OMP_NUM_THREADS", "cpus": cpus, "local_processes": procs}
    share = cpus if source == "slurm" else cpus // procs
    return {"threads": max(1, share), "source": source, "cpus": cpus, "local_processes": procs}


def apply_threads(requested: int | None = None) -> dict:
    """Choose (:func:`plan_threads`) and apply this process's thread count: ``torch.set_num_threads``
    when torch is loaded, ``threadpoolctl.threadpool_limits`` for the BLAS/OpenMP pools already
    loaded, and the ``OMP_NUM_THREADS``-style variables (:data:`THREAD_ENV_VARS`) for those loaded
    later (a variable the user set is kept for libraries not yet loaded, but the loaded pools
    follow the choice). Returns the plan (for ``run.json``)."""
    plan = plan_threads(requested)
    n = plan["threads"]
    for name in THREAD_ENV_VARS:
        if requested is not None or name not in os.environ or os.environ[name] == _SET.get(name):
            os.environ[name] = _SET[name] = str(n)
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # a dependency of scikit-learn (curation's classifiers); absent, env vars only
        log.debug("threadpoolctl not installed: BLAS pools already loaded keep their size")
    else:
        threadpool_limits(limits=n)
    log.debug("threads: %d (%s: %d CPUs, %d local process(es))", n, plan["source"], plan["cpus"],
              plan["local_processes"])
    return plan
