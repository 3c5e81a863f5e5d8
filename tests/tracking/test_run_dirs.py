"""Run directories are never shared or rewritten: concurrent identical commands (real processes),
``hydra.run.dir=`` into a used directory, a failed restart of a completed run, and Ctrl-C."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmrun import cli
from lmrun.errors import LmrunError
from lmrun.tracking.run import Run, config_hash

FAST = ["logger=none", "progress=false", "tokenizer.vocab_size=300"]
TINY = ["stage=pretrain", *FAST, "model/size=tiny", "model.context_length=32", "train.batch_size=4",
        "train.eval_tokens=2048", "train.samples=0", "train.log_every=1", "train.eval_every=100000",
        "train.checkpoint_every=100000"]

def _frozen_code() -> str:
    """`lmrun` with the clock stopped at one second: every process names its run directory alike."""
    return ("import sys, time\n"
            "_real = time.strftime\n"
            "time.strftime = lambda fmt, *a: '2026-01-01_00-00-00' if fmt == '%Y-%m-%d_%H-%M-%S' else _real(fmt, *a)\n"
            "from lmrun.cli import main\n"
            "sys.exit(main())\n")


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", HYDRA_FULL_ERROR="0")
    env["PYTHONPATH"] = str(Path(cli.__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.fixture
def small_train(tmp_path) -> Path:
    src = Path(cli.__file__).resolve().parent / "data" / "corpora" / "tinyshakespeare.txt"
    path = tmp_path / "small.txt"
    path.write_bytes(src.read_bytes()[:20_000])
    return path


@pytest.mark.slow
def test_identical_commands_in_the_same_second_get_their_own_run_directories(small_train, isolated_workspace):
    """Before: each process saw the directory free, then all of them wrote into it (or crashed on
    the other's run.json). Three real `lmrun stage=encode` processes, the clock stopped so that
    their directory names collide."""
    args = ["stage=encode", "data=text_files", f"data.train={small_train}", *FAST]
    assert cli.main(args) == 0  # build the cached tokenizer and arrays once: the three race only for the directory
    procs = [subprocess.Popen([sys.executable, "-c", _frozen_code(), *args], env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err[-2000:] for _, err in results]
    runs = isolated_workspace / "runs" / "encode"
    frozen = sorted(d.name for d in runs.iterdir() if d.name.startswith("2026-01-01_00-00-00"))
    base = frozen[0]
    assert frozen == [base, f"{base}-1", f"{base}-2"]
    for name in frozen:
        info = json.loads((runs / name / "run.json").read_text())
        assert info["status"] == "completed" and "restarts" not in info and info["run_dir"].endswith(name)
        assert json.loads((runs / name / "summary.json").read_text())["cached"] is True
        assert (runs / name / ".hydra" / "config.yaml").is_file()


@pytest.mark.slow
def test_run_directories_are_claimed_atomically_by_concurrent_processes(isolated_workspace):
    """Eight processes claim a directory for the same config in the same second at once."""
    code = ("import sys, time\n"
            "_real = time.strftime\n"
            "time.strftime = lambda fmt, *a: '2026-01-01_00-00-00' if fmt == '%Y-%m-%d_%H-%M-%S' else _real(fmt, *a)\n"
            "from lmrun import cli\n"
            "cfg = cli.compose(['stage=tokenizer', 'logger=none'])\n"
            "while time.time() < float(sys.argv[1]): time.sleep(0.001)\n"
            "print(cli._create_run_dir(cfg))\n")
    start = f"{time.time() + 8:.3f}"
    procs = [subprocess.Popen([sys.executable, "-c", code, start], env=_env(), stdout=subprocess.PIPE, text=True)
             for _ in range(8)]
    dirs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert len(set(dirs)) == 8 and all(Path(d).is_dir() and not any(Path(d).iterdir()) for d in dirs)


def _fake_run(run_dir: Path, stage: str, status: str, config_hash_: str, overrides: list[str]) -> None:
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text("original: true\n")
    (run_dir / "run.json").write_text(json.dumps({"stage": stage, "status": status, "config_hash": config_hash_,
                                                  "overrides": overrides}))
    (run_dir / "summary.json").write_text(json.dumps({"val_loss": 3.25}))


def _snapshot(run_dir: Path) -> dict:
    return {p.relative_to(run_dir).as_posix(): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("lmrun: checking")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_a_used_run_directory_is_refused_in_one_line_before_hydra_writes(isolated_workspace, capsys):
    used = isolated_workspace / "used"
    _fake_run(used, "tokenizer", "completed", "0123abcd", ["tokenizer.vocab_size=300"])
    before = _snapshot(used)
    assert cli.main(["stage=tokenizer", *FAST, "seed=3", f"hydra.run.dir={used}"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith(f"lmrun: error: hydra.run.dir={used}: run directory already used (a tokenizer run")
    assert _snapshot(used) == before  # .hydra/config.yaml was rewritten before the refusal


def test_resuming_a_completed_run_with_another_config_is_refused(isolated_workspace, capsys):
    done = isolated_workspace / "done"
    _fake_run(done, "pretrain", "completed", "0123abcd", ["stage=pretrain", "train.max_steps=10"])
    before = _snapshot(done)
    assert cli.main([*TINY, "train.max_steps=20", f"hydra.run.dir={done}"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "holds a completed run with another config (hash 0123abcd" in line and "train.max_steps=20" in line
    assert "(was train.max_steps=10)" in line
    assert _snapshot(done) == before
    _fake_run(other := isolated_workspace / "other", "tokenizer", "failed", "0123abcd", [])
    assert cli.main([*TINY, f"hydra.run.dir={other}"]) == 2
    assert "holds a tokenizer run, not a pretrain run" in _one_error_line(capsys.readouterr().err)
    (bad := isolated_workspace / "bad").mkdir()
    (bad / "run.json").write_text("{not json")
    assert cli.main([*TINY, f"hydra.run.dir={bad}"]) == 2
    assert f"unreadable {bad / 'run.json'}" in _one_error_line(capsys.readouterr().err)


def test_a_failed_restart_keeps_the_completed_runs_records(isolated_workspace, monkeypatch, capsys):
    """Resuming a completed pretrain run with its own config is allowed (it finishes at once);
    if that restart fails (here: the stage raises as a shape mismatch would), summary.json and the
    completed run.json stay, and the attempt is recorded."""
    import lmrun.stages.pretrain as pretrain

    args = [*TINY, "train.max_steps=10"]
    done = isolated_workspace / "done"
    _fake_run(done, "pretrain", "completed", config_hash(cli.compose(args)), args)
    summary_before = (done / "summary.json").read_bytes()

    def mismatch(cfg):
        raise LmrunError("checkpoint ckpt_00000010.pt: shape mismatch for token_embeddings.weight")

    monkeypatch.setattr(pretrain, "run", mismatch)
    assert cli.main([*args, f"hydra.run.dir={done}"]) == 1
    assert (done / "summary.json").read_bytes() == summary_before
    info = json.loads((done / "run.json").read_text())
    assert info["status"] == "completed" and "restarting" not in info
    (attempt,) = info["failed_restarts"]
    assert attempt["status"] == "failed" and "shape mismatch" in attempt["error"]
    assert attempt["config_hash"] == info["config_hash"]


def test_run_records_of_a_completed_run_survive_restarts(tmp_path):
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"seed": 0, "stage": {"name": "pretrain"}, "logger": {"name": "none"}})
    first = Run(cfg, tmp_path / "r", resumable=True).start()
    first.finish({"val_loss": 3.0, "tokens_per_s": 100.0})
    completed = json.loads((tmp_path / "r" / "run.json").read_text())
    again = Run(cfg, tmp_path / "r", resumable=True).start()
    during = json.loads((tmp_path / "r" / "run.json").read_text())  # a kill now loses nothing
    assert during["status"] == "completed" and during["restarting"]["pid"] == os.getpid()
    again.finish({}, status="interrupted", error="interrupted (Ctrl-C)")
    after = json.loads((tmp_path / "r" / "run.json").read_text())
    assert {k: v for k, v in after.items() if k not in ("failed_restarts", "restarts")} == completed
    assert after["restarts"] == 1
    assert [a["status"] for a in after["failed_restarts"]] == ["interrupted"]
    assert json.loads((tmp_path / "r" / "summary.json").read_text()) == {"val_loss": 3.0, "tokens_per_s": 100.0}
    killed = subprocess.Popen([sys.executable, "-c", (  # a restart killed -9 before its record
        "import sys, time\nfrom omegaconf import OmegaConf\nfrom lmrun.tracking.run import Run\n"
        "cfg = OmegaConf.create({'seed': 0, 'stage': {'name': 'pretrain'}, 'logger': {'name': 'none'}})\n"
        "Run(cfg, sys.argv[1], resumable=True).start()\nprint('started', flush=True)\ntime.sleep(600)\n"),
        str(tmp_path / "r")], env=_env(), stdout=subprocess.PIPE, text=True)
    assert killed.stdout.readline().strip() == "started"
    killed.kill()
    killed.wait()
    killed.stdout.close()
    third = Run(cfg, tmp_path / "r", resumable=True).start()
    third.finish({"val_loss": 2.5, "resumed": True})  # a restart that completes records its own result
    final = json.loads((tmp_path / "r" / "run.json").read_text())
    assert final["status"] == "completed" and final["restarts"] == 3 and "restarting" not in final
    assert [a["status"] for a in final["failed_restarts"]] == ["interrupted", "lost"]
    assert json.loads((tmp_path / "r" / "summary.json").read_text()) == {  # what it did not report is kept
        "val_loss": 2.5, "tokens_per_s": 100.0, "resumed": True}
    # a failed run restarted and failing again keeps the first attempt's summary
    failed = Run(cfg, tmp_path / "f", resumable=True).start()
    failed.finish({"steps": 7}, status="failed", error="x")
    Run(cfg, tmp_path / "f", resumable=True).start().finish({}, status="failed", error="y")
    assert json.loads((tmp_path / "f" / "summary.json").read_text()) == {"steps": 7}


@pytest.mark.slow
def test_ctrl_c_is_one_line_exit_130_and_recorded(small_train, isolated_workspace):
    run_dir = isolated_workspace / "runs" / "ctrl-c"
    cmd = [sys.executable, "-m", "lmrun.cli", *TINY, "data=text_files", f"data.train={small_train}",
           "train.max_steps=100000", f"hydra.run.dir={run_dir}"]
    # SIGINT at its default in the child: a background job (``cmd &`` in a script) inherits it ignored
    p = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 240
        while not ((run_dir / "metrics.jsonl").exists() and (run_dir / "metrics.jsonl").read_text().count("loss") >= 2):
            assert p.poll() is None and time.time() < deadline, p.stderr.read()[-3000:]
            time.sleep(0.2)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "Traceback" not in out
    lmrun_lines = [line for line in err.splitlines() if line.startswith("lmrun: interrupted")]
    assert len(lmrun_lines) == 1 and err.rstrip().splitlines()[-1] == lmrun_lines[0]
    assert lmrun_lines[0].startswith("lmrun: interrupted (Ctrl-C)") and str(run_dir) in lmrun_lines[0]
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "interrupted" and info["error"].startswith("interrupted (Ctrl-C)")


def test_a_run_directory_being_written_by_another_process_is_refused(isolated_workspace, capsys):
    """A second resume of a run while the first still runs (a real process holds the run's lock)."""
    run_dir = isolated_workspace / "busy"
    _fake_run(run_dir, "pretrain", "interrupted", "0123abcd", [])
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom lmrun.tracking.run import lock_run_dir\n"
                               "lock = lock_run_dir(sys.argv[1])\nprint('locked', flush=True)\ntime.sleep(600)\n",
                               str(run_dir)], env=_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = _snapshot(run_dir)
        assert cli.main([*TINY, f"hydra.run.dir={run_dir}"]) == 2
        line = _one_error_line(capsys.readouterr().err)
        assert line.startswith(f"lmrun: error: hydra.run.dir={run_dir}: run directory {run_dir} is in use by "
                               f"pid {holder.pid} on host")
        assert _snapshot(run_dir) == before
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
