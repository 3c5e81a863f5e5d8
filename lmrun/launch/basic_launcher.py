"""lmrun's in-process launcher: Hydra's basic launcher (jobs run one after another in this
process), plus the sweep manifest ``<sweep>/sweep.json`` that the submitit launchers write, so a
sweep directory has one format whatever ran it (``collect`` and reruns read it).

Exposed to Hydra as ``hydra_plugins.lmrun_launcher.lmrun_launcher.LmrunBasicLauncher`` and
selected by default (``conf/hydra/launcher/basic.yaml`` takes the place of Hydra's ``basic``),
under any sweeper: the basic sweeper hands it the whole job list, the Optuna sweeper one batch of
trials at a time (job numbers continue from batch to batch). Each job's entry records its
overrides and its state (``pending`` → ``running`` → ``completed`` / ``failed`` / ``skipped``),
saved before and after the job runs.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Sequence

from hydra._internal.core_plugins.basic_launcher import BasicLauncher
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from omegaconf import open_dict

from lmrun.launch import sweep as sweeps

log = logging.getLogger(__name__)

EXECUTOR = "basic"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


class BasicManifestLauncher(BasicLauncher):
    """Runs a sweep's jobs in this process, in order, keeping ``sweep.json`` up to date."""

    def __init__(self) -> None:
        super().__init__()
        self._opened = False

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        setup_globals()
        assert self.hydra_context is not None and self.config is not None and self.task_function is not None
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        sweep_dir = Path(str(self.config.hydra.sweep.dir)).absolute()
        manifest = sweeps.open_manifest(sweep_dir, EXECUTOR, new_command=not self._opened)
        self._opened = True
        jobs = [(initial_job_idx + i, list(o)) for i, o in enumerate(job_overrides)]
        for num, overrides in jobs:
            sweeps.check_same_job(manifest, sweep_dir, num, overrides)
        for num, overrides in jobs:
            entry = manifest["jobs"].get(str(num)) or {}
            manifest["jobs"][str(num)] = {**entry, "overrides": overrides, "job_id": None, "executor": EXECUTOR,
                                          "state": "pending"}
        sweeps.save_manifest(sweep_dir, manifest)
        log.info(f"Launching {len(jobs)} jobs locally")
        runs: list[JobReturn] = []
        for num, overrides in jobs:
            log.info(f"\t#{num} : {' '.join(filter_overrides(overrides))}")
            entry = manifest["jobs"][str(num)]
            entry.update(state="running", started=_now())
            sweeps.save_manifest(sweep_dir, manifest)
            sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
            with open_dict(sweep_config):
                sweep_config.hydra.job.id = num
                sweep_config.hydra.job.num = num
            try:
                ret = run_job(hydra_context=self.hydra_context, task_function=self.task_function,
                              config=sweep_config, job_dir_key="hydra.sweep.dir",
                              job_subdir_key="hydra.sweep.subdir")
            except BaseException:  # Ctrl-C, a preempted job: the manifest says where it stopped
                entry.update(state=sweeps.run_status(sweep_dir / str(num)), finished=_now())
                sweeps.save_manifest(sweep_dir, manifest)
                raise
            entry.update(state=self._state(num, sweep_dir, ret), finished=_now())
            sweeps.save_manifest(sweep_dir, manifest)
            runs.append(ret)
            configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        return runs

    @staticmethod
    def _state(num: int, sweep_dir: Path, ret: JobReturn) -> str:
        """The job's final state: what the task recorded (completed, failed, skipped), else its
        run record's status; ``failed`` if the task raised."""
        if ret.status == JobStatus.FAILED:
            return "failed"
        outcome = sweeps.last_outcome(num)
        if outcome is not None:
            return str(outcome["state"])
        status = sweeps.run_status(sweep_dir / str(num))
        return "failed" if status == "missing" else status
