"""lmrun's launchers for Hydra: hydra-submitit-launcher's, plus what sweeps need.

On top of :class:`hydra_plugins.hydra_submitit_launcher.submitit_launcher.BaseSubmititLauncher`:

* resources per job from ``cluster`` + ``stage.resources`` + ``launch`` (jobs that need the same
  resources go in one job array, ``launch.array_parallelism`` at once);
* a manifest ``<sweep>/sweep.json`` (jobs, overrides, scheduler ids, states); jobs whose run
  completed are skipped (``sweep.skip_done``), jobs still queued are not submitted twice;
* ``launch.wait=false`` returns after submission; ``launch.wait=true`` waits and reports each
  job's outcome from its run record (a failed or killed job is reported as such);
* in the job: preemption/time-limit signals checkpoint at a step boundary and requeue into the
  same run directory (:mod:`lmrun.launch.preemption`); multi-task jobs export the torch
  distributed environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT).

The Hydra plugin classes (which must live in ``hydra_plugins``) are in
``hydra_plugins/lmrun_launcher``.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import BaseSubmititLauncher

from lmrun.launch import sweep as sweeps
from lmrun.launch.resources import job_resources, submitit_parameters

log = logging.getLogger("lmrun")


def _say(msg: str) -> None:
    print(f"lmrun: {msg}", file=sys.stderr, flush=True)


class LmrunSubmititLauncher(BaseSubmititLauncher):
    """Submits a sweep's jobs with submitit (``_EXECUTOR`` "slurm" or "local")."""

    # --- in the job ---------------------------------------------------------------------------
    def __call__(self, sweep_overrides: list[str], job_dir_key: str, job_num: int, job_id: str,
                 singleton_state: dict) -> JobReturn:
        import submitit

        from lmrun.launch import preemption

        _quiet_schema_warnings()
        env = submitit.JobEnvironment()
        preemption.install(env._usr_sig())
        if env.num_tasks > 1:
            submitit.helpers.TorchDistributedEnvironment().export()
        ret = super().__call__(sweep_overrides, job_dir_key, job_num, job_id, singleton_state)
        if ret.status == JobStatus.FAILED and isinstance(ret._return_value, preemption.Preempted):
            preemption.requeue_now()  # requeues this job and exits the process
        return ret

    # --- on the submitting machine ------------------------------------------------------------
    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        import submitit

        cfg = self.config
        sweep_dir = Path(str(cfg.hydra.sweep.dir)).absolute()
        manifest = sweeps.open_manifest(sweep_dir, self._EXECUTOR, new_command=not getattr(self, "_opened", False))
        self._opened = True
        live = (sweeps.scheduler_states([str(j.get("job_id")) for j in manifest["jobs"].values()
                                         if j.get("executor") == "slurm"]) or {}) if self._EXECUTOR == "slurm" else {}

        groups: dict[str, list[tuple[int, list[str]]]] = {}
        group_resources: dict[str, dict] = {}
        skipped, queued = [], []
        for i, overrides in enumerate(job_overrides):
            num, overrides = initial_job_idx + i, list(overrides)
            job_cfg = self.hydra_context.config_loader.load_sweep_config(cfg, overrides)
            entry = manifest["jobs"].get(str(num))
            sweeps.check_same_job(manifest, sweep_dir, num, overrides)
            status = sweeps.run_status(sweep_dir / str(num))
            if status == "completed" and bool(job_cfg.sweep.skip_done):
                skipped.append(num)
                manifest["jobs"][str(num)] = {**(entry or {}), "overrides": overrides, "state": "skipped"}
                continue
            if entry and str(entry.get("job_id")) in live:
                queued.append((num, entry["job_id"], live[str(entry["job_id"])]))
                continue
            resources = job_resources(job_cfg)
            key = json.dumps(resources, sort_keys=True)
            group_resources[key] = resources
            groups.setdefault(key, []).append((num, overrides))
        if skipped:
            _say(f"{len(skipped)} job(s) already completed in {sweep_dir}, skipped (sweep.skip_done=true): "
                 f"{', '.join(map(str, skipped))}")
        for num, jid, state in queued:
            _say(f"job {num} is still {state.lower()} as {jid}: not submitted again")

        submitted: list[tuple[int, list[str], Any]] = []
        for key, members in groups.items():
            resources = group_resources[key]
            executor = submitit.AutoExecutor(folder=str(sweep_dir / ".submitit" / "%j"), cluster=self._EXECUTOR,
                                             **({"slurm_max_num_timeout": int(cfg.launch.max_requeues)}
                                                if self._EXECUTOR == "slurm" else {}))
            executor.update_parameters(name=str(cfg.hydra.job.name),
                                       **submitit_parameters(resources, self._EXECUTOR, cfg.launch))
            args = [(overrides, "hydra.sweep.dir", num, f"job_id_for_{num}", Singleton.get_state())
                    for num, overrides in members]
            jobs = executor.map_array(self, *zip(*args))
            array_id = jobs[0].job_id.split("_")[0] if jobs else "?"
            _say(f"submitted {len(jobs)} job(s) to {self._EXECUTOR} as {array_id}"
                 f" ({resources['nodes']} node(s) x {resources['tasks_per_node']} task(s), "
                 f"{resources['gpus_per_node']} GPU(s)/node, {resources['cpus_per_task']} CPU(s)/task, "
                 f"{resources['timeout_min']} min)")
            for (num, overrides), job in zip(members, jobs):
                _say(f"  job {num}: {job.job_id}  {' '.join(filter_overrides(overrides)) or '(defaults)'}")
                manifest["jobs"][str(num)] = {"overrides": overrides, "job_id": str(job.job_id),
                                              "executor": self._EXECUTOR, "state": "submitted",
                                              "submitted": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                              "resources": resources}
                submitted.append((num, overrides, job))
        sweeps.save_manifest(sweep_dir, manifest)
        _say(f"sweep directory: {sweep_dir}")

        if submitted and not bool(cfg.launch.wait):
            _say(f"not waiting (launch.wait=false); states: lmrun stage=collect sweep={sweep_dir}")
            return [JobReturn(overrides=list(o), status=JobStatus.COMPLETED, _return_value={"job_id": j.job_id})
                    for _, o, j in submitted]
        self._wait(submitted, float(cfg.launch.poll_s))
        rows = {r["num"]: r for r in sweeps.job_rows(sweep_dir)}
        for num, overrides, job in submitted:
            row = rows.get(num, {"state": "lost"})
            error = None
            if row["state"] != "completed":
                info = sweeps.read_json(sweep_dir / str(num) / "run.json") or {}
                error = info.get("error") or _job_error(job)
            sweeps.record_outcome(num, overrides, row["state"], str(sweep_dir / str(num)), error, job.job_id)
            manifest["jobs"][str(num)]["state"] = row["state"]
        for num in skipped:
            sweeps.record_outcome(num, manifest["jobs"][str(num)]["overrides"], "skipped", str(sweep_dir / str(num)))
        sweeps.save_manifest(sweep_dir, manifest)
        # one result per job, in order: its summary, or the `sweep.objective` metric an optimizing
        # sweeper (Optuna) needs, read from the run directory (None where the job did not complete)
        objective = cfg.sweep.get("objective")
        returns = []
        for i, overrides in enumerate(job_overrides):
            num = initial_job_idx + i
            done = rows.get(num, {}).get("state") == "completed"
            summary = sweeps.read_json(sweep_dir / str(num) / "summary.json") if done else None
            returns.append(JobReturn(overrides=list(overrides), status=JobStatus.COMPLETED,
                                     _return_value=sweeps.job_result(summary, objective) if done else None))
        return returns

    def _wait(self, submitted: list, poll_s: float) -> None:
        """Block until every job ended: its result file exists (it returned or raised), or, on
        Slurm, it left the queue (killed from outside). Requeued jobs are waited for."""
        pending = {num: job for num, _, job in submitted}
        if pending:
            _say(f"waiting for {len(pending)} job(s) (launch.wait=true; Ctrl-C stops waiting, not the jobs)")
        slurm = self._EXECUTOR == "slurm"
        while pending:
            live = sweeps.scheduler_states([j.job_id for j in pending.values()]) if slurm else None
            if not (slurm and live is None):  # squeue failed this time: ask again later
                for num, job in list(pending.items()):
                    # a requeued Slurm job goes back to the queue: done only once it left it
                    if (str(job.job_id) not in live) if slurm else job.done():
                        del pending[num]
            if pending:
                time.sleep(poll_s)


def _quiet_schema_warnings() -> None:
    """lmrun's conf/hydra/launcher/{basic,submitit_local}.yaml extend the launcher schemas Hydra
    and hydra-submitit-launcher register under the same names, on purpose; Hydra warns about
    every such match (a deprecation notice aimed at Hydra 1.0 configs)."""
    import warnings

    warnings.filterwarnings("ignore", message=r"(?s).*'hydra/launcher/\w+' is validated against ConfigStore schema",
                            category=UserWarning)


def _job_error(job) -> str:
    """What the scheduler or submitit knows about a job that did not complete."""
    try:
        if job.paths.result_pickle.exists():
            exc = job.exception()
            if exc is not None:
                return " ".join(str(exc).split())[-500:]
        log_text = job.stderr() or ""
        tail = [line for line in log_text.splitlines() if line.strip()][-3:]
        return "no result: " + (" | ".join(tail)[-500:] if tail else "killed before writing its run record")
    except Exception as e:  # reading a crashed job's files must not hide the other outcomes
        return f"no result ({type(e).__name__})"
