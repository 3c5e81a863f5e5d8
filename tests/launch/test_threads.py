"""lmrun.launch.threads: the per-process thread count from affinity, Slurm and local ranks."""
import json
import os
import subprocess
import sys

import pytest

from lmrun.errors import ConfigError
from lmrun.launch import threads
from lmrun.launch.threads import available_cpus, local_processes, plan_threads

CPUS = len(os.sched_getaffinity(0))


def test_affinity_is_the_default_source():
    assert available_cpus({}) == (CPUS, "affinity")
    assert plan_threads(None, {}) == {"threads": CPUS, "source": "affinity", "cpus": CPUS, "local_processes": 1}


def test_slurm_cpus_per_task_caps_the_affinity_and_is_not_divided():
    env = {"SLURM_CPUS_PER_TASK": "1", "SLURM_NTASKS_PER_NODE": "4"}
    assert available_cpus(env) == (1, "slurm")
    assert plan_threads(None, env)["threads"] == 1
    # a Slurm value above what the process may use does not raise the count
    assert available_cpus({"SLURM_CPUS_PER_TASK": str(CPUS + 8)}) == (CPUS, "affinity")


def test_local_ranks_share_the_cpus():
    assert local_processes({"LOCAL_WORLD_SIZE": "2"}) == 2
    assert local_processes({"SLURM_TASKS_PER_NODE": "3(x2),1"}) == 3
    plan = plan_threads(None, {"LOCAL_WORLD_SIZE": str(CPUS * 4)})
    assert plan["threads"] == 1 and plan["local_processes"] == CPUS * 4
    if CPUS >= 2:
        assert plan_threads(None, {"LOCAL_WORLD_SIZE": "2"})["threads"] == CPUS // 2


def test_config_wins_and_must_be_positive():
    assert plan_threads(3, {"SLURM_CPUS_PER_TASK": "1"})["threads"] == 3
    assert plan_threads(3, {})["source"] == "config"
    with pytest.raises(ConfigError, match="threads=0"):
        plan_threads(0, {})


def test_an_exported_omp_num_threads_is_kept_when_automatic():
    plan = plan_threads(None, {"OMP_NUM_THREADS": "1"})
    assert plan["threads"] == 1 and plan["source"] == "OMP_NUM_THREADS"


def test_apply_sets_torch_blas_and_the_environment(monkeypatch):
    import numpy  # noqa: F401  (loads a BLAS pool for threadpoolctl to size)
    import torch
    from threadpoolctl import threadpool_info

    for name in threads.THREAD_ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(threads, "_SET", {})
    before = torch.get_num_threads()
    try:
        plan = threads.apply_threads(1)
        assert plan["threads"] == 1
        assert torch.get_num_threads() == 1
        assert all(p["num_threads"] == 1 for p in threadpool_info())
        assert os.environ["OMP_NUM_THREADS"] == "1"
        # the value lmrun set is not mistaken for the user's on the next (automatic) choice
        assert threads.apply_threads(None)["source"] in ("affinity", "slurm")
    finally:
        torch.set_num_threads(before)


def test_torch_loaded_later_follows_the_choice():
    code = ("from lmrun.launch.threads import apply_threads; apply_threads(1); import torch; "
            "print(torch.get_num_threads())")
    env = {k: v for k, v in os.environ.items() if k not in threads.THREAD_ENV_VARS}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "1"


def test_run_json_records_the_threads_the_stage_ran_with(isolated_workspace, monkeypatch):
    import torch

    from lmrun import cli

    for name in threads.THREAD_ENV_VARS:  # restored after the test (apply_threads sets them)
        monkeypatch.setenv(name, os.environ.get(name, ""))
        monkeypatch.delenv(name)
    monkeypatch.setattr(threads, "_SET", {})
    before = torch.get_num_threads()
    try:
        assert cli.main(["stage=tokenizer", "logger=none", "progress=false", "tokenizer.vocab_size=300",
                         "threads=1"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    (run_json,) = (isolated_workspace / "runs" / "tokenizer").glob("*/run.json")
    info = json.loads(run_json.read_text())
    assert info["threads"] == {"threads": 1, "source": "config", "cpus": CPUS, "local_processes": 1}
