"""Issue 25, "nothing lost, ever", for pretrain checkpoints: a corrupt latest checkpoint falls back
to the newest good one (F4), flipped bytes are a one-line error for evaluate/generate (F5), Ctrl-C
saves a checkpoint (F11), a resumed run logs every step once (F12), and a pretrain process killed
with SIGKILL at random times, again and again, ends exactly where an uninterrupted run does
(F10, the slow fault-injection test)."""
from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import lmrun.train.trainer as trainer_module
from lmrun import cli
from lmrun.launch import preemption
from lmrun.train.checkpoint import CheckpointManager, read_checkpoint
from tests.train.test_checkpoint import flip_tensor_bytes

TINY = ["logger=none", "progress=false", "tokenizer.vocab_size=300", "model/size=tiny", "model.d_model=16",
        "model.num_layers=1", "model.num_heads=2", "model.context_length=32", "train.batch_size=4",
        "train.eval_tokens=1024", "train.samples=0", "train.log_every=1"]


def pretrain(small_text: Path, run_dir: Path, *overrides: str) -> int:
    return cli.main(["stage=pretrain", *TINY, "data=text_files", f"data.train={small_text}", *overrides,
                     f"hydra.run.dir={run_dir}"])


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def steps_of(run_dir: Path, key: str) -> list[int]:
    """The steps of the metrics.jsonl rows that carry ``key`` ("loss": training, "val_loss")."""
    return [r["step"] for r in rows(run_dir) if key in r]


def log_messages(run_dir: Path) -> list[str]:
    return [m.group(1) for line in (run_dir / "pretrain.log").read_text().splitlines()
            if (m := re.match(r"\[[^]]+\]\[[\w.]+\]\[\w+\] (.*)", line))]


def error_lines(stderr: str) -> list[str]:
    """The lines of the CLI's stderr that report an error (the log's own lines are there too);
    asserts there is no traceback."""
    assert "Traceback" not in stderr, stderr
    return [line for line in stderr.splitlines() if "[ERROR]" in line or line.startswith("lmrun:")]


def ckpt_names(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


@pytest.mark.slow
def test_corrupt_latest_checkpoint_falls_back_and_every_step_is_logged_once(small_text, isolated_workspace, capsys):
    run_dir = isolated_workspace / "run"
    common = ["train.max_steps=8", "train.eval_every=4", "train.checkpoint_every=2", "train.keep_last=3"]
    assert pretrain(small_text, run_dir, *common) == 0
    first = json.loads((run_dir / "summary.json").read_text())
    first_losses = {r["step"]: r["loss"] for r in rows(run_dir) if "loss" in r}
    assert ckpt_names(run_dir) == ["ckpt_00000004.pt", "ckpt_00000006.pt", "ckpt_00000008.pt"]

    # F5: flipped bytes in the tensor data (torch.load reads them without complaint)
    flip_tensor_bytes(run_dir / "checkpoints" / "ckpt_00000008.pt")
    capsys.readouterr()
    for stage, args in (("evaluate", [f"evaluate.checkpoint={run_dir}"]),
                        ("generate", [f"generate.checkpoint={run_dir}", "generate.prompt=Hello"])):
        assert cli.main([f"stage={stage}", "logger=none", "progress=false", *args]) != 0
        err = error_lines(capsys.readouterr().err)
        assert len(err) == 1 and "ckpt_00000008.pt: corrupt checkpoint" in err[0] and "checksum" in err[0], err
    assert not list((isolated_workspace / "runs").rglob("eval.json"))

    # F4: restarting the finished run warns about the corrupt latest and resumes from the newest good one
    assert pretrain(small_text, run_dir, *common) == 0
    messages = log_messages(run_dir)
    assert any("ckpt_00000008.pt: corrupt checkpoint" in m and "checksum" in m and "moved to ckpt_00000008.pt.corrupt"
               in m for m in messages)
    assert any(m.startswith("resumed from") and "ckpt_00000006.pt (step 6" in m for m in messages)
    assert ckpt_names(run_dir) == ["ckpt_00000004.pt", "ckpt_00000006.pt", "ckpt_00000008.pt", "ckpt_00000008.pt.corrupt"]
    assert read_checkpoint(run_dir / "checkpoints" / "ckpt_00000008.pt")["iteration"] == 8  # written again, intact
    again = json.loads((run_dir / "summary.json").read_text())
    assert again["resumed"] is True
    for key in ("steps", "tokens", "val_loss", "val_bpb", "final_train_loss"):
        assert again[key] == first[key], key  # exact resume: the same numbers
    # F12: the steps after the checkpoint (7, 8 and the final evaluation) are in metrics.jsonl once
    assert steps_of(run_dir, "loss") == list(range(1, 9))
    assert steps_of(run_dir, "val_loss") == [4, 8]
    assert {r["step"]: r["loss"] for r in rows(run_dir) if "loss" in r} == first_losses

    # restarting the finished (intact) run evaluates nothing again and logs nothing twice
    assert pretrain(small_text, run_dir, *common) == 0
    assert steps_of(run_dir, "loss") == list(range(1, 9)) and steps_of(run_dir, "val_loss") == [4, 8]
    assert json.loads((run_dir / "summary.json").read_text())["val_loss"] == first["val_loss"]

    # another model shape: a one-line error; no checkpoint and no record of the finished run is touched
    before, summary = ckpt_names(run_dir), (run_dir / "summary.json").read_bytes()
    capsys.readouterr()
    assert pretrain(small_text, run_dir, *common, "model.d_model=32") != 0
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and "d_model" in err[0], err
    assert ckpt_names(run_dir) == before and (run_dir / "summary.json").read_bytes() == summary


@pytest.fixture
def default_sigint():
    """Python's own SIGINT handler for the test: a process started in the background by a
    non-interactive shell (``cmd &``) inherits SIGINT ignored, and then interruptible() rightly
    leaves it alone."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def test_interruptible_defers_the_first_ctrl_c_and_honours_the_second(default_sigint):
    handler = signal.getsignal(signal.SIGINT)
    with preemption.interruptible():
        assert not preemption.interrupted()
        # raise_signal delivers to this (the main) thread; os.kill may pick another thread of the
        # process, whose handler can run late on a loaded machine (a flaky check)
        signal.raise_signal(signal.SIGINT)
        time.sleep(0.01)  # the handler runs between bytecodes
        assert preemption.interrupted()
        with pytest.raises(KeyboardInterrupt, match="second Ctrl-C"):
            signal.raise_signal(signal.SIGINT)
            time.sleep(0.5)
    assert signal.getsignal(signal.SIGINT) is handler and not preemption.interrupted()


@pytest.mark.slow
def test_ctrl_c_saves_the_step_in_progress_and_the_run_resumes(small_text, isolated_workspace, monkeypatch, capsys,
                                                              default_sigint):
    run_dir = isolated_workspace / "run"
    common = ["train.max_steps=8", "train.eval_every=100", "train.checkpoint_every=4"]
    real = trainer_module.Trainer.train_step
    calls = {"n": 0}

    def train_step(self):
        calls["n"] += 1
        out = real(self)
        if calls["n"] == 5:  # Ctrl-C in the middle of step 5: the step finishes, then the checkpoint
            signal.raise_signal(signal.SIGINT)
        return out

    monkeypatch.setattr(trainer_module.Trainer, "train_step", train_step)
    assert pretrain(small_text, run_dir, *common) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"at step 5: saved {run_dir / 'checkpoints' / 'ckpt_00000005.pt'}" in err
    assert ckpt_names(run_dir) == ["ckpt_00000004.pt", "ckpt_00000005.pt"]
    assert read_checkpoint(run_dir / "checkpoints" / "ckpt_00000005.pt")["iteration"] == 5
    assert json.loads((run_dir / "run.json").read_text())["status"] == "interrupted"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

    monkeypatch.setattr(trainer_module.Trainer, "train_step", real)
    # resuming with another model shape: one line naming the checkpoint; nothing is moved aside
    assert pretrain(small_text, run_dir, *common, "model.d_model=32") != 0
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and "ckpt_00000005.pt: does not fit this model" in err[0], err
    assert ckpt_names(run_dir) == ["ckpt_00000004.pt", "ckpt_00000005.pt"]

    assert pretrain(small_text, run_dir, *common) == 0
    assert any(m.startswith("resumed from") and "ckpt_00000005.pt (step 5" in m for m in log_messages(run_dir))
    assert steps_of(run_dir, "loss") == list(range(1, 9))


# ----------------------------------------------------------------------------- SIGKILL at random times

KILLS = 20
FAULT = ["train.max_steps=60", "train.eval_every=10", "train.checkpoint_every=1", "train.keep_last=3",
         "train.keep_heap_memory=false"]
RESUMED = re.compile(r"resumed from (\S+) \(step (\d+)")
RESUMED_OR_FRESH = re.compile(r"resumed from |\] model ")  # the trainer's line after resuming, or without


def _start(small_text: Path, run_dir: Path, log_file: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
    argv = [sys.executable, "-m", "lmrun.cli", "stage=pretrain", *TINY, "data=text_files", f"data.train={small_text}",
            *FAULT, f"hydra.run.dir={run_dir}"]
    with open(log_file, "wb") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)


def _newest_step(folder: Path) -> int:
    names = [p.name for p in folder.iterdir()] if folder.is_dir() else []
    return max((int(m.group(1)) for n in names if (m := re.fullmatch(r"ckpt_(\d+)\.pt", n))), default=0)


def _temp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp")) if folder.is_dir() else []


@pytest.mark.slow
def test_pretrain_survives_sigkill_at_random_times(small_text, isolated_workspace, tmp_path):
    """Kill a real ``lmrun stage=pretrain`` process (tiny model, a checkpoint every step) with
    SIGKILL twenty times, in turn: at a random time in start-up; a step or two into training;
    within 0.1 s of resuming (metrics dropped, model built, first step); in the middle of a
    checkpoint write. Three times its newest checkpoint is also corrupted first.
    Each attempt advances a step or two at most, so the 60 steps are not done before the 20th kill. After
    each restart: it resumed from the newest good checkpoint and no dead writer's temporary file
    is left. At the end: every step is in metrics.jsonl once, and the losses, validation figures
    and summary equal those of an uninterrupted run with the same seed."""
    rng = random.Random(25)
    logs = tmp_path / "logs"
    logs.mkdir()
    reference = isolated_workspace / "reference"  # in this process: torch is imported already
    assert cli.main(["stage=pretrain", *TINY, "data=text_files", f"data.train={small_text}", *FAULT,
                     f"hydra.run.dir={reference}"]) == 0

    run_dir = isolated_workspace / "killed"
    ckpts = run_dir / "checkpoints"
    kills = left_behind = removed = 0
    for attempt in range(KILLS + 10):
        if kills == KILLS:
            break
        good = CheckpointManager(ckpts).read_latest()  # the test's own view: the newest intact checkpoint
        corrupted = None
        if attempt % 6 == 5 and len(CheckpointManager(ckpts).checkpoints()) >= 2:
            corrupted = CheckpointManager(ckpts).latest()
            flip_tensor_bytes(corrupted, n=200, seed=attempt)
            good = CheckpointManager(ckpts).read_latest()
        log_file = logs / f"attempt{attempt}.txt"
        start_step = _newest_step(ckpts)
        proc = _start(small_text, run_dir, log_file)
        mode = ("start-up", "training", "resume", "write")[attempt % 4]
        deadline, target = time.monotonic() + 60, start_step + 1
        if mode == "start-up":  # a random time in start-up (imports, config, cache look-ups)
            deadline = time.monotonic() + rng.uniform(0.3, 3.0)
        elif mode == "resume":  # just after resuming: dropping metrics, building the model, the first step
            while not RESUMED_OR_FRESH.search(log_file.read_text()) and proc.poll() is None \
                    and time.monotonic() < deadline:
                time.sleep(0.002)
            deadline = time.monotonic() + rng.uniform(0, 0.1)
        elif mode == "training":
            target = start_step + rng.randint(1, 2)
        while _newest_step(ckpts) < target and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        if _newest_step(ckpts) >= target:  # training: at most a step or two more
            if mode == "write":  # the moment a checkpoint's temporary file exists
                while not _temp_files(ckpts) and proc.poll() is None and time.monotonic() < deadline:
                    time.sleep(0.001)
            else:
                time.sleep(rng.uniform(0, 0.03))
            # the dead writers' temporary files are gone; only this live process may be writing one
            assert all(f".{proc.pid}." in name for name in _temp_files(ckpts)), (_temp_files(ckpts), proc.pid)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        rc = proc.wait(timeout=60)
        left_behind += bool(_temp_files(ckpts))
        text = log_file.read_text()
        removed += "temporary file(s) left by an interrupted checkpoint write" in text
        assert rc in (0, -signal.SIGKILL), text[-3000:]
        resumed = RESUMED.search(text)
        if resumed:  # the attempt got as far as resuming: from the newest good checkpoint
            assert good is not None and Path(resumed.group(1)) == good[0], (resumed.group(0), good and good[0])
            if corrupted is not None:
                assert f"{corrupted.name}: corrupt checkpoint" in text
        elif re.search(r"step \d+/60 \(", text):  # it trained without resuming: there was nothing to resume
            assert good is None, text[-3000:]
        if rc == 0:  # it finished before the kill: nothing more to interrupt
            break
    assert kills >= KILLS
    assert left_behind and removed  # some kills did interrupt a checkpoint write, and a restart cleaned up

    proc = _start(small_text, run_dir, logs / "final.txt")
    assert proc.wait(timeout=120) == 0, (logs / "final.txt").read_text()[-3000:]
    assert _temp_files(ckpts) == []
    final_rows, ref_rows = rows(run_dir), rows(reference)
    assert steps_of(run_dir, "loss") == list(range(1, 61))
    assert steps_of(run_dir, "val_loss") == steps_of(reference, "val_loss") == [10, 20, 30, 40, 50, 60]
    for key in ("loss", "val_loss"):  # bit-exact: the same trajectory as the uninterrupted run
        assert [(r["step"], r[key]) for r in final_rows if key in r] == [(r["step"], r[key]) for r in ref_rows
                                                                         if key in r]
    summary = json.loads((run_dir / "summary.json").read_text())
    expected = json.loads((reference / "summary.json").read_text())
    for key in ("steps", "tokens", "val_loss", "val_perplexity", "val_bpb", "final_train_loss", "skipped_steps"):
        assert summary[key] == expected[key], key
    assert summary["resumed"] is True
