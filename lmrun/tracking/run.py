"""Run directories: provenance (``run.json``), per-step metrics (``metrics.jsonl``), final
metrics (``summary.json``) and the optional wandb run, for the stage being executed.

A stage gets the active run with :func:`active_run` and logs through it; the CLI starts and
finishes it around ``stage.run(cfg)``.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import random
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lmrun.errors import LmrunError
from lmrun.launch.threads import apply_threads
from lmrun.tracking.files import FileLock, LockHeld, atomic_write, atomic_write_json, config_digest, json_dumps

log = logging.getLogger(__name__)

PACKAGES = ["lmrun", "torch", "triton", "numpy", "hydra-core", "omegaconf", "regex", "wandb", "submitit",
            "hydra-submitit-launcher", "tokenizers", "tiktoken"]
SLURM_VARS = ["SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_JOB_NAME", "SLURM_NODELIST",
              "SLURM_RESTART_COUNT", "SLURM_PROCID"]

_ACTIVE: "Run | None" = None

#: held by the process writing a run directory, from :meth:`Run.start` to :meth:`Run.finish`
RUN_LOCK = ".lock"


def resolved_config(cfg: DictConfig) -> dict:
    """The resolved config as plain containers, without Hydra's own node."""
    container = OmegaConf.to_container(cfg, resolve=True)
    container.pop("hydra", None)
    return container


def config_hash(cfg: DictConfig) -> str:
    """8-hex-digit hash of the resolved config (without `hydra`): names run directories."""
    return config_digest(resolved_config(cfg))


def git_state(path: Path) -> dict:
    """Commit and dirty flag of the git checkout holding ``path`` (nulls outside a checkout)."""
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(path), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def package_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def seed_everything(seed: int) -> None:
    """Seed Python's and NumPy's generators, and torch's if torch is imported (stages that use
    torch import it before calling this)."""
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:
        pass
    if "torch" in sys.modules:
        sys.modules["torch"].manual_seed(seed)


def lock_run_dir(run_dir: str | os.PathLike) -> FileLock:
    """Take ``<run_dir>/.lock`` (the directory is created if new): one process at a time writes
    a run directory — two resumes of one run started at once would write the same checkpoints
    and metrics. Released by :meth:`Run.finish`, or by the kernel when the process ends.
    LmrunError "run directory <dir> is in use by pid N on host H" if another process holds it."""
    run_dir = Path(run_dir)
    try:
        return FileLock.acquire(run_dir / RUN_LOCK, command=" ".join(sys.argv))
    except LockHeld as e:
        raise LmrunError(f"run directory {run_dir} is in use by {e.holder}; wait for it to end") from None
    except OSError as e:
        raise LmrunError(f"run directory {run_dir}: cannot create its lock file ({e.strerror or e})") from None


class Run:
    """One run directory. Use :func:`start_run`; then :meth:`log` per step and :meth:`finish`.

    ``writes=False`` (ranks other than 0 of a distributed job): the same directory, but nothing is
    written — no run.json, metrics, summary or wandb run; rank 0 writes them. A writing run holds
    the directory's lock (:func:`lock_run_dir`; ``lock``: one the caller took already) from
    :meth:`start` to :meth:`finish`."""

    def __init__(self, cfg: DictConfig, run_dir: Path, overrides: list[str] | None = None, resumable: bool = False,
                 writes: bool = True, lock: FileLock | None = None):
        self.cfg = cfg
        self.writes = writes
        self.resumable = resumable
        self.dir = Path(run_dir)
        self.overrides = list(overrides or [])
        self.info: dict[str, Any] = {}
        self._metrics = None
        self._wandb = None
        self._t0 = time.time()
        self._previous: dict | None = None  # run.json of the attempt this one restarts, if any
        self._lock = lock

    # lifecycle -------------------------------------------------------------------------------
    def start(self) -> "Run":
        """Set up the process (thread count from ``threads``: :func:`lmrun.launch.threads.apply_threads`;
        seeds) and, when it writes, the run directory's files."""
        self.threads = apply_threads(self.cfg.get("threads"))
        if not self.writes:
            seed_everything(int(self.cfg.seed))
            return self
        self.dir.mkdir(parents=True, exist_ok=True)
        if self._lock is None:
            self._lock = lock_run_dir(self.dir)
        try:
            return self._start()
        except BaseException:
            self._release()
            raise

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _start(self) -> "Run":
        previous = None
        if (self.dir / "run.json").exists():
            if not self.resumable:
                raise LmrunError(f"run directory already used: {self.dir} (runs are never overwritten)")
            try:
                previous = json.loads((self.dir / "run.json").read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise LmrunError(f"cannot resume: corrupt {self.dir / 'run.json'} ({e})") from None
        seed_everything(int(self.cfg.seed))
        resolved = resolved_config(self.cfg)
        self.info = {
            "stage": self.cfg.stage.name,
            "status": "running",
            "config_hash": config_digest(resolved),
            "overrides": self.overrides,
            "argv": sys.argv,
            "cwd": os.getcwd(),
            "run_dir": str(self.dir.absolute()),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "seed": int(self.cfg.seed),
            "threads": self.threads,
            "git": git_state(Path(__file__).resolve().parent),
            "packages": package_versions(),
            "python": platform.python_version(),
            "host": socket.gethostname(),
            "platform": platform.platform(),
            "slurm": {k.lower().removeprefix("slurm_"): os.environ[k] for k in SLURM_VARS if k in os.environ},
        }
        if previous is not None:  # a restart in the same directory (resume): keep its identity
            if previous.get("config_hash") != self.info["config_hash"]:
                log.warning("resuming %s with a different config (hash %s, was %s)", self.dir,
                            self.info["config_hash"], previous.get("config_hash"))
            self.info.update(first_started=previous.get("first_started", previous.get("started")),
                             restarts=int(previous.get("restarts", 0)) + 1,
                             wandb_run_id=previous.get("wandb_run_id"))
            failed = list(previous.get("failed_restarts") or [])
            if isinstance(previous.get("restarting"), dict):  # an attempt killed while it restarted a completed run
                failed.append(previous.pop("restarting") | {"status": "lost", "error": "ended without a record "
                                                            "(killed, or its node failed)"})
            if failed:
                self.info["failed_restarts"] = previous["failed_restarts"] = failed
            self._previous = previous
        self._metrics = open(self.dir / "metrics.jsonl", "a", encoding="utf-8")
        if self._metrics.tell() > 0 and not _ends_with_newline(self.dir / "metrics.jsonl"):
            self._metrics.write("\n")  # a line torn by a kill: the next record starts on its own line
        if self.cfg.logger.name == "wandb":
            self._start_wandb(resolved)
        self._write_info()
        return self

    def _restarts_completed(self) -> bool:
        """Whether this attempt restarts a run that had completed (its record must survive)."""
        return self._previous is not None and self._previous.get("status") == "completed"

    def _attempt(self) -> dict:
        """This attempt, as recorded in a completed run's ``restarting`` / ``failed_restarts``."""
        return {k: self.info.get(k) for k in ("started", "config_hash", "overrides", "argv", "host")} | {
            "pid": os.getpid(), "slurm": self.info.get("slurm") or None}

    def _start_wandb(self, resolved: dict) -> None:
        import wandb

        lc = self.cfg.logger
        os.environ.setdefault("WANDB_SILENT", "true")
        self._wandb = wandb.init(
            project=lc.project, entity=lc.entity, group=lc.group, tags=list(lc.tags), mode=lc.mode,
            dir=str(self.dir), name=f"{self.cfg.stage.name}/{self.dir.name}", config=resolved,
            id=self.info.get("wandb_run_id") or None, resume="allow",
        )
        self.info["wandb_run_id"] = self._wandb.id
        self.info["wandb_dir"] = str(Path(self._wandb.dir).parent)

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        """Append one JSON line (``step``, wall ``time`` in seconds since start, the metrics) and
        forward to wandb. Non-finite floats, nested ones included, are written as null (the line
        is strict JSON); flushes every call."""
        if not self.writes:
            return
        record = {"step": step, "time": round(time.time() - self._t0, 3), **metrics}
        line = json_dumps(record)
        self._metrics.write(line + "\n")
        self._metrics.flush()
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)

    def drop_metrics_after(self, step: int) -> int:
        """Forget the metrics logged after ``step``: call it on resume, right after loading the
        checkpoint of ``step``, so that the steps the killed or requeued attempt logged after its
        last checkpoint (which this attempt will log again) are not in metrics.jsonl twice.
        Returns the number of lines dropped.

        metrics.jsonl is rewritten atomically (temp file + rename; streamed, memory O(1)) keeping,
        in order: every line whose ``step`` is a number <= ``step``, and every line without a
        step (``null`` or no key) that comes before the first dropped line. Dropped: lines whose
        step is > ``step``, step-less lines after the first of those, and lines that are not a
        JSON object (a line torn by the kill). Nothing is rewritten when nothing is dropped, and
        nothing happens for a run that writes nothing (``writes=False``) or has no metrics.jsonl
        yet. The run's append handle is reopened, so :meth:`log` continues after the kept lines."""
        if not self.writes:
            return 0
        path = self.dir / "metrics.jsonl"
        if self._metrics is not None:
            self._metrics.flush()
        if not path.is_file():
            return 0

        def keep_flags():
            dropping = False
            with open(path, "rb") as src:
                for raw in src:
                    try:
                        record = json.loads(raw)
                    except (json.JSONDecodeError, UnicodeDecodeError):
                        record = None
                    if not isinstance(record, dict):
                        yield raw, False
                        continue
                    s = record.get("step")
                    if isinstance(s, (int, float)) and not isinstance(s, bool):
                        keep = s <= step
                    else:
                        keep = not dropping
                    dropping = dropping or not keep
                    yield raw, keep

        dropped = sum(1 for _, keep in keep_flags() if not keep)
        if dropped == 0:
            return 0
        if self._metrics is not None:
            self._metrics.close()

        def write(f):
            for raw, keep in keep_flags():
                if keep:
                    f.write(raw if raw.endswith(b"\n") else raw + b"\n")

        try:
            atomic_write(path, write)
        finally:
            if self._metrics is not None:
                self._metrics = open(path, "a", encoding="utf-8")
        log.info("metrics.jsonl: dropped %d line(s) logged after step %d (resumed from its checkpoint)", dropped, step)
        return dropped

    def finish(self, summary: dict[str, Any] | None, status: str = "completed", error: str | None = None) -> None:
        """Write ``summary.json`` and the final ``run.json`` (status, end time, seconds).

        A finished run's records are never made worse by a restart that does not complete
        (``status`` other than "completed"): an existing ``summary.json`` (an earlier attempt's) is
        kept, not replaced; and if the restarted run had completed, run.json stays that completed
        record, with this attempt (start, end, status, error, config hash, overrides) appended to
        its ``failed_restarts`` list (and counted in ``restarts``). A restart of a completed run
        that completes again (e.g. resumed from the final checkpoint) updates the summary's keys
        and keeps those it did not report. The directory's lock is released, whatever happens."""
        if not self.writes:
            return
        try:
            self._finish(summary, status, error)
        finally:
            self._release()

    def _finish(self, summary: dict[str, Any] | None, status: str, error: str | None) -> None:
        summary = dict(summary or {})
        if status == "completed" and self._restarts_completed():  # what the restart did not report stays
            try:
                earlier = json.loads((self.dir / "summary.json").read_text(encoding="utf-8"))
            except (OSError, ValueError):
                earlier = None
            if isinstance(earlier, dict):
                summary = earlier | summary
        keep_summary = status != "completed" and (self.dir / "summary.json").exists()
        if not keep_summary:
            atomic_write_json(self.dir / "summary.json", summary)
        now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        if status != "completed" and self._restarts_completed():
            attempt = self._attempt() | {"finished": now, "seconds": round(time.time() - self._t0, 3),
                                         "status": status, "error": error}
            record = {k: v for k, v in self._previous.items() if k != "restarting"}
            record["failed_restarts"] = list(record.get("failed_restarts") or []) + [attempt]
            record["restarts"] = self.info.get("restarts", 1)
            self.info = record
            log.warning("%s: the restart ended %s; the completed run's records are kept", self.dir, status)
        else:
            self.info.update(status=status, finished=now, seconds=round(time.time() - self._t0, 3))
            if error:
                self.info["error"] = error
        self._write_info()
        if self._metrics is not None:
            self._metrics.close()
        if self._wandb is not None:
            self._wandb.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float, str))})
            self._wandb.finish(exit_code=0 if status == "completed" else 1)

    def _write_info(self) -> None:
        """Write run.json. While a completed run is restarted it keeps saying "completed" (a kill
        in the middle loses nothing); the attempt in progress is its ``restarting`` entry."""
        if self._restarts_completed() and self.info.get("status") == "running":
            atomic_write_json(self.dir / "run.json", self._previous | {"restarting": self._attempt(),
                                                                        "restarts": self.info.get("restarts")})
            return
        atomic_write_json(self.dir / "run.json", self.info)


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def start_run(cfg: DictConfig, run_dir: str | os.PathLike, overrides: list[str] | None = None,
              resumable: bool = False, writes: bool = True, lock: FileLock | None = None) -> Run:
    """Create the run directory's files and make the run active for :func:`active_run`.

    An existing run directory is an error unless ``resumable`` (a stage that resumes from its
    checkpoints): then run.json records the restart and metrics.jsonl is appended to.
    ``writes=False``: a run that writes nothing (ranks > 0 of a distributed job). The run holds
    the directory's lock until it finishes (``lock``: one taken with :func:`lock_run_dir` before);
    LmrunError if another process is writing the directory."""
    global _ACTIVE
    _ACTIVE = Run(cfg, Path(run_dir), overrides, resumable, writes, lock).start()
    return _ACTIVE


def active_run() -> Run:
    """The run started for the stage now executing (LmrunError if none)."""
    if _ACTIVE is None:
        raise LmrunError("no active run: stages are started by the lmrun CLI or lmrun.tracking.run.start_run")
    return _ACTIVE


def end_run() -> None:
    global _ACTIVE
    _ACTIVE = None
