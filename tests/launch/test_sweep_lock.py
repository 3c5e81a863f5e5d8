"""One launch per sweep directory at a time: the same `lmrun -m ...` started twice at once must
not submit the sweep's jobs twice into one directory (real processes; basic, submitit local and
Slurm launchers)."""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmrun import cli
from lmrun.errors import ConfigError
from lmrun.launch import sweep as sweeps

FAST = ["logger=none", "progress=false", "tokenizer.vocab_size=300"]

#: `lmrun ARGS...` whose attempt to take the sweep lock waits for the instant argv[1], so that two
#: processes reach it together whatever their start-up and pre-flight times
GATED = ("import sys, time\n"
         "import lmrun.launch.sweep as sweeps\n"
         "_lock, start = sweeps.sweep_lock, float(sys.argv[1])\n"
         "def gated(d):\n"
         "    while time.time() < start:\n"
         "        time.sleep(0.001)\n"
         "    return _lock(d)\n"
         "sweeps.sweep_lock = gated\n"
         "from lmrun.cli import main\n"
         "sys.exit(main(sys.argv[2:]))\n")

#: holds the lock of sweep argv[1] until killed
HOLDER = ("import sys, time\n"
          "from pathlib import Path\n"
          "from lmrun.launch.sweep import sweep_lock\n"
          "with sweep_lock(Path(sys.argv[1])):\n"
          "    print('locked', flush=True)\n"
          "    time.sleep(600)\n")


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(Path(cli.__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.fixture(autouse=True)
def _clear_outcomes():
    sweeps.take_outcomes()
    yield
    sweeps.take_outcomes()


@pytest.fixture
def small_train(tmp_path) -> Path:
    src = Path(cli.__file__).resolve().parent / "data" / "corpora" / "tinyshakespeare.txt"
    path = tmp_path / "small.txt"
    path.write_bytes(src.read_bytes()[:20_000])
    return path


@pytest.fixture
def holder(tmp_path):
    """Start a process that holds a sweep directory's lock; yields (process, sweep_dir)."""
    procs = []

    def start(sweep_dir: Path) -> subprocess.Popen:
        p = subprocess.Popen([sys.executable, "-c", HOLDER, str(sweep_dir)], env=_env(), stdout=subprocess.PIPE,
                             text=True)
        procs.append(p)
        assert p.stdout.readline().strip() == "locked"
        return p

    yield start
    for p in procs:
        p.kill()
        p.wait()
        p.stdout.close()


def test_the_lock_names_its_holder_and_is_released_when_it_dies(tmp_path, holder):
    sweep_dir = tmp_path / "sweep"
    p = holder(sweep_dir)
    with pytest.raises(ConfigError, match=rf"^sweep {re.escape(str(sweep_dir))} is already being submitted by "
                                          rf"pid {p.pid} on host {re.escape(socket.gethostname())}"):
        with sweeps.sweep_lock(sweep_dir):
            pytest.fail("two holders")
    p.kill()
    p.wait()
    with sweeps.sweep_lock(sweep_dir):  # the kernel released a killed holder's lock
        record = json.loads((sweep_dir / sweeps.LOCK).read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
    assert (sweep_dir / sweeps.LOCK).read_text() == ""  # released: names no holder


@pytest.mark.parametrize("launcher", ["basic", "submitit_local"])
def test_a_sweep_being_launched_elsewhere_is_refused_in_one_line(launcher, small_train, holder, isolated_workspace,
                                                                 capsys):
    sweep_dir = isolated_workspace / "multiruns" / "locked"
    p = holder(sweep_dir)
    args = ["-m", "stage=tokenizer", "data=text_files", f"data.train={small_train}", *FAST,
            "tokenizer.vocab_size=300,270", f"hydra/launcher={launcher}", "launch.wait=false", f"sweep={sweep_dir}"]
    assert cli.main(args) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("lmrun: checking")]
    assert err == [f"lmrun: error: sweep {sweep_dir} is already being submitted by pid {p.pid} on host "
                   f"{socket.gethostname()}; run the command again once it is done (finished jobs are skipped)"]
    assert sorted(q.name for q in sweep_dir.iterdir()) == [sweeps.LOCK]  # no manifest, no job, nothing submitted


@pytest.mark.slow
def test_two_identical_launches_at_once_submit_once(small_train, isolated_workspace):
    """Before the lock both submitted the sweep: two local jobs per job number, in one directory."""
    sweep_dir = isolated_workspace / "multiruns" / "twice"
    args = ["-m", "stage=tokenizer", "data=text_files", f"data.train={small_train}", *FAST,
            "tokenizer.vocab_size=300,270", "hydra/launcher=submitit_local", "launch.wait=false",
            "cluster.setup=['export OMP_NUM_THREADS=1']", f"sweep={sweep_dir}"]
    start = f"{time.time() + 25:.3f}"
    procs = [subprocess.Popen([sys.executable, "-c", GATED, start, *args], env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    codes = sorted(p.returncode for p in procs)
    errs = [err for _, err in results]
    assert codes == [0, 2], errs
    refused = next(err for p, (_, err) in zip(procs, results) if p.returncode == 2)
    winner = next(p for p in procs if p.returncode == 0)
    assert f"is already being submitted by pid {winner.pid} on host" in refused and "submitted" not in \
        refused.replace("already being submitted", "")
    manifest = json.loads((sweep_dir / "sweep.json").read_text())
    assert len(manifest["commands"]) == 1 and sorted(manifest["jobs"]) == ["0", "1"]
    job_ids = {manifest["jobs"][n]["job_id"] for n in "01"}
    assert len(job_ids) == 2
    deadline = time.time() + 240  # let the local jobs finish (they write into the sweep directory)
    while any(sweeps.run_status(sweep_dir / n) != "completed" for n in "01"):
        assert time.time() < deadline, [sweeps.run_status(sweep_dir / n) for n in "01"]
        time.sleep(0.5)
    submitted = {d.name for d in (sweep_dir / ".submitit").iterdir()} - {"%j"}
    assert submitted == job_ids  # two local jobs, not four
    assert all(not (sweep_dir / n / "attempts").exists() for n in "01")


def _cluster_up() -> bool:
    if not shutil.which("sinfo"):
        return False
    out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20)
    return out.returncode == 0 and any(s.startswith(("idle", "mixed", "alloc")) for s in out.stdout.split())


@pytest.mark.slurm
@pytest.mark.slow
def test_two_identical_slurm_submissions_at_once_submit_one_array(small_train, isolated_workspace):
    if not _cluster_up():
        if os.environ.get("LMRUN_REQUIRE_SLURM") == "1":
            pytest.fail("no Slurm cluster answers (slurm/start.sh starts one)")
        pytest.skip("no Slurm cluster (start one with slurm/start.sh)")
    sweep_dir = isolated_workspace / "multiruns" / "slurm-twice"
    args = ["-m", "stage=tokenizer", "data=text_files", f"data.train={small_train}", *FAST,
            "tokenizer.vocab_size=300,270", "hydra/launcher=slurm", "launch.wait=false", "launch.poll_s=0.5",
            "cluster.setup=['export OMP_NUM_THREADS=1']", f"sweep={sweep_dir}"]
    start = f"{time.time() + 25:.3f}"
    procs = [subprocess.Popen([sys.executable, "-c", GATED, start, *args], env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    assert sorted(p.returncode for p in procs) == [0, 2], [err for _, err in results]
    arrays = [m for _, err in results for m in re.findall(r"submitted 2 job\(s\) to slurm as (\d+)", err)]
    assert len(arrays) == 1
    manifest = json.loads((sweep_dir / "sweep.json").read_text())
    assert [manifest["jobs"][n]["job_id"] for n in "01"] == [f"{arrays[0]}_0", f"{arrays[0]}_1"]
    deadline = time.time() + 240
    while sweeps.scheduler_states([f"{arrays[0]}_0", f"{arrays[0]}_1"]):
        assert time.time() < deadline, "jobs still queued"
        time.sleep(0.5)
    assert [r["state"] for r in sweeps.job_rows(sweep_dir)] == ["completed", "completed"]
