"""Sweeps on disk: the sweep directory's name, its manifest (``sweep.json``: jobs, overrides,
run directories, scheduler ids and states), and each job's state read from its run directory.

A sweep directory holds one run directory per job, named by the job's number in the expanded
sweep (``<sweep>/<num>/``), each with the usual ``run.json`` / ``summary.json``. Rerunning the
same command computes the same default directory, so finished jobs are found and skipped.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from lmrun.errors import ConfigError, FormatError
from lmrun.tracking.files import FileLock, LockHeld, atomic_write_json

MANIFEST = "sweep.json"
#: held (flock) by the lmrun process that launches or submits a sweep, for the whole launch
LOCK = ".lock"

#: override keys that say how or where a job runs, not what it computes: they do not change a
#: job's identity (rerunning a sweep on another cluster or with more time finds its finished jobs)
LAUNCH_KEYS = ("launch", "sweep", "cluster", "stage.resources", "dry_run", "progress")


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def job_identity(overrides: list[str]) -> list[str]:
    """The overrides that define what a job computes (sorted; launch-related keys dropped)."""
    return sorted(o for o in overrides if not any(_key(o) == k or _key(o).startswith(k + ".") for k in LAUNCH_KEYS)
                  and not _key(o).startswith("hydra"))


def default_sweep_dir(multiruns_dir: str, stage: str, experiment: str | None, jobs: list[list[str]]) -> Path:
    """``<multiruns_dir>/<stage>/<experiment or 'sweep'>-<8 hex digits>``, the digits hashing
    every job's identity in order: the same command gives the same directory."""
    digest = hashlib.sha256(json.dumps([job_identity(j) for j in jobs]).encode()).hexdigest()[:8]
    return Path(multiruns_dir) / stage / f"{experiment or 'sweep'}-{digest}"


def read_json(path: Path) -> dict | None:
    """A JSON file's object, None if absent; FormatError if unreadable."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FormatError(f"corrupt {path}: {e}") from None


def run_status(run_dir: Path) -> str:
    """``completed``, ``failed``, ``preempted``, ``interrupted``, ``running`` (run.json says so),
    or ``missing`` (no run.json: not started)."""
    info = read_json(Path(run_dir) / "run.json")
    return "missing" if info is None else str(info.get("status", "running"))


def load_manifest(sweep_dir: Path) -> dict:
    """The sweep's manifest (``{"jobs": {num: {...}}}``), empty if the sweep is new."""
    return read_json(Path(sweep_dir) / MANIFEST) or {"jobs": {}}


def save_manifest(sweep_dir: Path, manifest: dict) -> None:
    manifest["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    atomic_write_json(Path(sweep_dir) / MANIFEST, manifest)


def open_manifest(sweep_dir: Path, executor: str, new_command: bool = True) -> dict:
    """The manifest of ``sweep_dir`` (created with the directory if new), stamped for a launch by
    ``executor`` ("basic", "local" or "slurm"); ``new_command`` appends this process's command
    line to ``commands`` (once per launcher: a sweeper may call the launcher batch by batch)."""
    sweep_dir = Path(sweep_dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    manifest = load_manifest(sweep_dir)
    manifest.setdefault("jobs", {})
    manifest.update(executor=executor, sweep_dir=str(sweep_dir))
    manifest.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    if new_command:
        manifest.setdefault("commands", []).append(" ".join(["lmrun", *sys.argv[1:]]))
    return manifest


@contextlib.contextmanager
def sweep_lock(sweep_dir: Path):
    """Hold the sweep directory's lock (``<sweep_dir>/.lock``, a :class:`FileLock`) while
    launching: two identical commands started at once must not both submit the sweep's jobs into
    one directory. The directory is created if new. The lock file records the holder (pid, host,
    Slurm job id if any, command, start time); a killed launch never blocks the next one.

    ConfigError "sweep <dir> is already being submitted by pid N on host H" (nothing written or
    submitted) if another process holds it; DataError if the lock file cannot be created."""
    from lmrun.errors import DataError

    sweep_dir = Path(sweep_dir)
    try:
        lock = FileLock.acquire(sweep_dir / LOCK, command=" ".join(["lmrun", *sys.argv[1:]]))
    except LockHeld as e:
        raise ConfigError(f"sweep {sweep_dir} is already being submitted by {e.holder}; "
                          "run the command again once it is done (finished jobs are skipped)") from None
    except OSError as e:
        raise DataError(f"sweep {sweep_dir}: cannot create its lock file ({e.strerror or e})") from None
    with lock:
        yield


def check_same_job(manifest: dict, sweep_dir: Path, num: int, overrides: list[str]) -> None:
    """ConfigError if the manifest's job ``num`` computes something else than ``overrides``
    (the sweep directory belongs to another sweep)."""
    entry = manifest.get("jobs", {}).get(str(num))
    if entry and job_identity(entry.get("overrides", [])) != job_identity(list(overrides)):
        raise ConfigError(f"sweep directory {sweep_dir} holds a different job {num} "
                          f"({' '.join(entry.get('overrides', []))}); choose a new sweep.dir")


def job_result(summary: dict | None, objective: str | None):
    """What a job hands back to Hydra's sweeper: its summary, or with ``objective`` (a summary key,
    ``sweep.objective``) that metric as a float — what an optimizing sweeper (Optuna) needs.
    None when the job has no such value (failed, or the key is missing): the sweeper records a
    failed trial."""
    if not objective:
        return summary or {}
    value = (summary or {}).get(objective)
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def archive_attempt(run_dir: Path) -> Path:
    """Move everything in ``run_dir`` except earlier attempts, submitit's files and the lock into
    ``run_dir/attempts/<k>/`` (a rerun of a job that failed starts clean and loses nothing)."""
    run_dir = Path(run_dir)
    k = 0
    while (run_dir / "attempts" / str(k)).exists():
        k += 1
    dest = run_dir / "attempts" / str(k)
    dest.mkdir(parents=True)
    for p in run_dir.iterdir():
        if p.name not in ("attempts", ".submitit", ".lock"):
            shutil.move(str(p), dest / p.name)
    return dest


def scheduler_states(job_ids: list[str]) -> dict[str, str] | None:
    """Slurm states (PENDING, RUNNING, ...) of those of ``job_ids`` still known to ``squeue``;
    jobs that ended are absent. None if squeue is missing or failed (state unknown)."""
    ids = [str(j) for j in job_ids if j]
    if not ids:
        return {}
    try:
        out = subprocess.run(["squeue", "-h", "-r", "-o", "%i|%T", "-j", ",".join(ids)], capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        if "Invalid job id" in out.stderr:  # every id has left the queue (and slurmctld forgot it)
            return {}
        return None
    states = {}
    for line in out.stdout.splitlines():
        if "|" in line:
            jid, state = line.strip().split("|", 1)
            states[jid] = state
    return states


def job_rows(sweep_dir: Path) -> list[dict]:
    """One row per job of the manifest: num, overrides, scheduler id, and the current state:
    ``completed`` / ``failed`` / ``interrupted`` from the run's own record; else the scheduler's
    (``pending``, ``running``, ...); else, for a Slurm job gone from the queue without a final
    record, ``lost`` (killed from outside: out of memory, node failure, scancel)."""
    sweep_dir = Path(sweep_dir)
    jobs = load_manifest(sweep_dir).get("jobs", {})
    slurm_ids = [j.get("job_id") for j in jobs.values() if j.get("executor") == "slurm"]
    live = scheduler_states(slurm_ids)
    unknown = live is None
    live = live or {}
    rows = []
    for num in sorted(jobs, key=int):
        j = jobs[num]
        status = run_status(sweep_dir / str(num))
        sched = live.get(str(j.get("job_id")))
        if status == "completed":
            state = "completed"
        elif sched:
            state = sched.lower()
        elif status in ("failed", "interrupted"):
            state = status
        elif j.get("executor") == "slurm" and j.get("job_id") and j.get("state") != "skipped" and not unknown:
            state = "lost"
        else:
            state = {"missing": str(j.get("state", "missing"))}.get(status, status)
        rows.append({"num": int(num), "overrides": j.get("overrides", []), "job_id": j.get("job_id"),
                     "state": state, "dir": str(sweep_dir / str(num))})
    return rows


# --- outcomes of the jobs this process launched (read by the CLI for its report and exit code) ---
_OUTCOMES: list[dict] = []


def record_outcome(num: int, overrides: list[str], state: str, run_dir: str, error: str | None = None,
                   job_id: str | None = None) -> None:
    _OUTCOMES.append({"num": int(num), "overrides": list(overrides), "state": state, "dir": run_dir,
                      "error": error, "job_id": job_id})


def last_outcome(num: int) -> dict | None:
    """The latest outcome recorded in this process for job ``num`` (None if none yet)."""
    return next((o for o in reversed(_OUTCOMES) if o["num"] == int(num)), None)


def take_outcomes() -> list[dict]:
    """The outcomes recorded since the last call (and forget them)."""
    out = sorted(_OUTCOMES, key=lambda o: o["num"])
    _OUTCOMES.clear()
    return out


def format_outcomes(outcomes: list[dict]) -> str:
    """A few lines: counts per state, then one line per job that did not complete or skip."""
    counts: dict[str, int] = {}
    for o in outcomes:
        counts[o["state"]] = counts.get(o["state"], 0) + 1
    lines = [f"sweep: {len(outcomes)} job(s): " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))]
    for o in outcomes:
        if o["state"] not in ("completed", "skipped"):
            jid = f" ({o['job_id']})" if o.get("job_id") else ""
            lines.append(f"  job {o['num']}{jid} {o['state'].upper()}: {' '.join(o['overrides'])} -> {o['dir']}"
                         + (f": {o['error']}" if o.get("error") else ""))
    return "\n".join(lines)
