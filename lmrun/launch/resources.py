"""What a job asks the scheduler for: the stage's `stage.resources`, completed from the
`cluster` profile, as submitit parameters."""
from __future__ import annotations


def job_resources(cfg) -> dict:
    """Resources of one job of ``cfg`` (a composed lmrun config).

    Returns ``{nodes, tasks_per_node, gpus_per_node, cpus_per_task, mem_gb, timeout_min,
    partition, account, qos, constraint, exclude, setup, additional_parameters}`` (None where
    Slurm's default applies). A GPU stage (``stage.resources.gpus_per_node`` null or > 0) gets
    the cluster's GPUs per node (at most that many when the stage names a number) and one task per
    GPU; a CPU stage one task. Memory is
    ``mem_gb`` per node, or ``mem_gb_per_gpu`` x GPUs for GPU jobs."""
    r, c = cfg.stage.resources, cfg.cluster
    gpus = int(c.gpus_per_node if r.gpus_per_node is None else min(int(r.gpus_per_node), int(c.gpus_per_node)))
    tasks = int(r.tasks_per_node if r.tasks_per_node is not None else max(gpus, 1))
    if r.mem_gb is not None:
        mem = int(r.mem_gb)
    elif gpus and c.mem_gb_per_gpu is not None:
        mem = int(c.mem_gb_per_gpu) * gpus
    else:
        mem = None if c.mem_gb is None else int(c.mem_gb)
    return {
        "nodes": int(r.nodes),
        "tasks_per_node": tasks,
        "gpus_per_node": gpus,
        "cpus_per_task": int(r.cpus_per_task if r.cpus_per_task is not None else c.cpus_per_task),
        "mem_gb": mem,
        "timeout_min": int(r.timeout_min if r.timeout_min is not None else c.timeout_min),
        "partition": c.partition,
        "account": c.account,
        "qos": c.qos,
        "constraint": c.constraint,
        "exclude": c.exclude,
        "setup": list(c.setup),
        "additional_parameters": dict(c.additional_parameters),
    }


#: keys submitit's executors take without a cluster prefix
GENERIC_KEYS = ("nodes", "tasks_per_node", "gpus_per_node", "cpus_per_task", "mem_gb", "timeout_min")


def submitit_parameters(resources: dict, executor: str, launch) -> dict:
    """``resources`` (from :func:`job_resources`) and the `launch` node as keyword arguments of
    ``submitit.AutoExecutor.update_parameters`` for ``executor`` ("slurm" or "local")."""
    params = {k: resources[k] for k in GENERIC_KEYS if resources[k] is not None}
    if executor == "slurm":
        for key in ("partition", "account", "qos", "constraint", "exclude"):
            if resources[key]:
                params[f"slurm_{key}"] = resources[key]
        if resources["setup"]:
            params["slurm_setup"] = list(resources["setup"])
        if resources["additional_parameters"]:
            params["slurm_additional_parameters"] = dict(resources["additional_parameters"])
        params["slurm_array_parallelism"] = int(launch.array_parallelism)
        params["slurm_signal_delay_s"] = int(launch.signal_delay_s)
    else:  # the local executor has no memory, partition or sbatch options
        params.pop("mem_gb", None)
        params.pop("nodes", None)
        params.pop("cpus_per_task", None)
        # submitit's AutoExecutor accepts only `local_setup` for this executor (1.5.x): the local
        # executor has no scheduler to send a signal before the time limit
        if resources["setup"]:
            params["local_setup"] = list(resources["setup"])
    return params
