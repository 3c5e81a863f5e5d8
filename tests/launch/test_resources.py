"""Per-job resources from the cluster profile and the stage's defaults."""
from __future__ import annotations

import pytest

from lmrun import cli
from lmrun.errors import ConfigError
from lmrun.launch.resources import job_resources, submitit_parameters


def resources(*overrides):
    cfg = cli.compose(list(overrides))
    return job_resources(cfg), cfg


def test_gpu_stage_gets_gpus_from_the_profile():
    r, _ = resources("stage=pretrain", "cluster=h100", "logger=none")  # distributed: the node's GPUs, one task each
    assert (r["gpus_per_node"], r["tasks_per_node"], r["cpus_per_task"], r["mem_gb"]) == (8, 8, 12, 1600)
    assert r["timeout_min"] == 1440 and r["partition"] == "gpu"
    r, _ = resources("stage=pretrain", "cluster=h100", "logger=none", "stage.resources.gpus_per_node=1",
                     "stage.resources.timeout_min=30")
    assert (r["gpus_per_node"], r["tasks_per_node"], r["mem_gb"], r["timeout_min"]) == (1, 1, 200, 30)


def test_multi_process_jobs_need_a_distributed_stage(capsys):
    assert cli.main(["stage=pretrain", "hydra/launcher=slurm", "cluster=h100", "dry_run=true"]) == 0
    capsys.readouterr()
    assert cli.main(["stage=tokenizer", "hydra/launcher=slurm", "cluster=h100", "stage.resources.tasks_per_node=2",
                     "dry_run=true"]) == 2
    assert "1 node(s) x 2 task(s), but stage tokenizer runs as one process" in capsys.readouterr().err


def test_cpu_stages_ask_for_no_gpu_and_gpu_requests_are_capped_by_the_node():
    r, _ = resources("stage=tokenizer", "cluster=h100")
    assert (r["gpus_per_node"], r["tasks_per_node"], r["mem_gb"]) == (0, 1, 256)
    r, _ = resources("stage=evaluate", "evaluate.checkpoint=x.pt", "cluster=local")  # local: no GPUs
    assert r["gpus_per_node"] == 0 and r["tasks_per_node"] == 1
    r, _ = resources("stage=evaluate", "evaluate.checkpoint=x.pt", "cluster=h100")
    assert r["gpus_per_node"] == 1


def test_submitit_parameters_for_slurm_and_local():
    r, cfg = resources("stage=pretrain", "cluster=h100", "logger=none", "launch.array_parallelism=4",
                       "stage.resources.gpus_per_node=1")
    p = submitit_parameters(r, "slurm", cfg.launch)
    assert p["slurm_partition"] == "gpu" and p["slurm_constraint"] == "h100" and p["slurm_array_parallelism"] == 4
    assert p["slurm_setup"][0].startswith("export OMP_NUM_THREADS")
    assert p["gpus_per_node"] == 1 and "slurm_account" not in p
    p = submitit_parameters(r, "local", cfg.launch)
    assert not any(k.startswith("slurm_") for k in p) and "mem_gb" not in p


@pytest.mark.parametrize("override, key", [("stage.resources.nodes=0", "stage.resources.nodes"),
                                           ("launch.max_requeues=-1", "launch.max_requeues"),
                                           ("cluster.cpus_per_task=0", "cluster.cpus_per_task"),
                                           ("collect.confidence=1.5", "collect.confidence")])
def test_invalid_launch_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        cli.preflight(["stage=tokenizer", override])
