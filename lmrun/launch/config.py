"""Config schemas for launching: the `cluster` profile, a stage's `stage.resources`, and the
run-wide `launch`, `sweep` and `collect` nodes."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lmrun.errors import check


@dataclass
class ClusterConfig:
    """A Slurm cluster profile (group `cluster`, conf/cluster/<name>.yaml).

    partition/account/qos/constraint/exclude: passed to sbatch as given (null: not passed).
    gpus_per_node: GPUs of one node — what a GPU stage asks for unless `stage.resources` says.
    cpus_per_task: CPUs per task (GPU jobs run one task per GPU). mem_gb: memory per node for
    CPU-only jobs; mem_gb_per_gpu: per GPU for GPU jobs (null: Slurm's default).
    timeout_min: time limit of a job in minutes. setup: shell lines run in the sbatch script
    before the job (module loads, venv activation). additional_parameters: other sbatch options
    (e.g. {mail-type: END})."""

    name: str = "local"
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    exclude: str | None = None
    gpus_per_node: int = 0
    cpus_per_task: int = 1
    mem_gb: int | None = None
    mem_gb_per_gpu: int | None = None
    timeout_min: int = 60
    setup: list[str] = field(default_factory=list)
    additional_parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class ResourcesConfig:
    """What one job of a stage asks for (`stage.resources`; each stage's YAML sets defaults).

    gpus_per_node: null = the cluster's gpus_per_node (GPU stages), 0 = CPU only.
    tasks_per_node: null = one process per GPU (1 without GPUs). cpus_per_task, mem_gb,
    timeout_min: null = the cluster profile's."""

    gpus_per_node: int | None = 0
    nodes: int = 1
    tasks_per_node: int | None = None
    cpus_per_task: int | None = None
    mem_gb: int | None = None
    timeout_min: int | None = None


@dataclass
class LaunchConfig:
    """Submission behaviour with `hydra/launcher=slurm|submitit_local`.

    wait: block until every job ends and report each job's outcome (false: return after
    submission, printing job ids and the sweep directory). max_requeues: how many times a job
    that hits its time limit is requeued (preemptions always requeue). signal_delay_s: seconds
    before the time limit at which Slurm signals the job to checkpoint. array_parallelism: most
    jobs of one array running at once. poll_s: seconds between state checks while waiting."""

    wait: bool = True
    max_requeues: int = 3
    signal_delay_s: int = 120
    array_parallelism: int = 64
    poll_s: float = 5.0


@dataclass
class SweepConfig:
    """dir: the sweep directory of a multirun (null: multiruns/<stage>/<experiment|sweep>-<hash of
    the job list>, so rerunning the same command finds the same sweep); for stage=collect, the
    sweep to collect (`lmrun stage=collect sweep=<dir>` is short for `sweep.dir=<dir>`).
    skip_done: rerunning a sweep skips jobs whose run completed (failed ones run again).
    objective: the summary metric (e.g. ``val_bpb``) each job of a multirun returns to Hydra's
    sweeper instead of its whole summary — what an optimizing sweeper (``hydra/sweeper=optuna``,
    set by ``hparams_search=<preset>``) minimizes or maximizes; null: jobs return their summary."""

    dir: str | None = None
    skip_done: bool = True
    objective: str | None = None


@dataclass
class CollectConfig:
    """metrics: summary keys to tabulate (empty: every numeric key the runs share).
    compare: a swept key whose variants get Welch's t-test p-values on each metric.
    plot: a swept key to draw each metric against (PNG per metric). confidence: CI level."""

    metrics: list[str] = field(default_factory=list)
    compare: str | None = None
    plot: str | None = None
    confidence: float = 0.95


def validate_launch(cluster: ClusterConfig, resources: ResourcesConfig, launch: LaunchConfig,
                    collect: CollectConfig) -> None:
    check("cluster.gpus_per_node", cluster.gpus_per_node, cluster.gpus_per_node >= 0, "an integer >= 0")
    check("cluster.cpus_per_task", cluster.cpus_per_task, cluster.cpus_per_task >= 1, "an integer >= 1")
    check("cluster.timeout_min", cluster.timeout_min, cluster.timeout_min >= 1, "minutes >= 1")
    for key in ("gpus_per_node", "tasks_per_node", "cpus_per_task", "mem_gb", "timeout_min"):
        value = getattr(resources, key)
        low = 0 if key == "gpus_per_node" else 1
        check(f"stage.resources.{key}", value, value is None or value >= low, f"null or an integer >= {low}")
    check("stage.resources.nodes", resources.nodes, resources.nodes >= 1, "an integer >= 1")
    check("launch.max_requeues", launch.max_requeues, launch.max_requeues >= 0, "an integer >= 0")
    check("launch.signal_delay_s", launch.signal_delay_s, launch.signal_delay_s >= 0, "seconds >= 0")
    check("launch.array_parallelism", launch.array_parallelism, launch.array_parallelism >= 1, "an integer >= 1")
    check("launch.poll_s", launch.poll_s, launch.poll_s > 0, "seconds > 0")
    check("collect.confidence", collect.confidence, 0 < collect.confidence < 1, "a level in (0, 1), e.g. 0.95")
