"""Run records: metrics.jsonl on resume, strict JSON lines, and what a restart may rewrite."""
from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from lmrun.tracking.run import Run


def _cfg(**extra):
    return OmegaConf.create({"seed": 0, "stage": {"name": "pretrain"}, "logger": {"name": "none"}, **extra})


def _lines(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_drop_metrics_after_keeps_steps_up_to_the_checkpoint_and_continues_appending(tmp_path):
    run = Run(_cfg(), tmp_path / "r").start()
    run.log({"note": "setup"})  # no step, before anything dropped: kept
    for step in range(1, 8):
        run.log({"loss": 1.0 / step}, step=step)
        if step == 4:
            run.log({"val_loss": 0.5}, step=4)
    run.log({"note": "after"})  # no step, after the first dropped line: dropped
    with open(run.dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 8, "lo')  # torn by the kill

    assert run.drop_metrics_after(4) == 3 + 1 + 1
    assert [(r["step"], sorted(k for k in r if k not in ("step", "time"))) for r in _lines(run.dir)] == [
        (None, ["note"]), (1, ["loss"]), (2, ["loss"]), (3, ["loss"]), (4, ["loss"]), (4, ["val_loss"])]
    run.log({"loss": 0.2}, step=5)  # the append handle was reopened
    assert [r["step"] for r in _lines(run.dir)][-2:] == [4, 5]
    assert run.drop_metrics_after(5) == 0  # nothing to drop: nothing rewritten
    assert run.drop_metrics_after(0) == 6  # 1..5 and the extra val line; the step-less first line stays
    assert [r["step"] for r in _lines(run.dir)] == [None]
    run.finish({"loss": 0.2})


def test_drop_metrics_after_without_a_file_or_writes(tmp_path):
    run = Run(_cfg(), tmp_path / "r").start()
    (run.dir / "metrics.jsonl").unlink()
    assert run.drop_metrics_after(3) == 0
    silent = Run(_cfg(), tmp_path / "s", writes=False).start()
    assert silent.drop_metrics_after(3) == 0 and not (tmp_path / "s").exists()


def test_log_writes_nested_non_finite_values_as_null(tmp_path):
    run = Run(_cfg(), tmp_path / "r").start()
    run.log({"loss": float("nan"), "per_layer": {"grad": [1.0, float("inf")]}, "hist": [float("-inf")]}, step=1)
    text = (run.dir / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text
    (record,) = _lines(run.dir)
    assert record["loss"] is None and record["per_layer"] == {"grad": [1.0, None]} and record["hist"] == [None]
    run.finish({"final": float("nan"), "nested": {"x": float("inf")}})
    summary = json.loads((run.dir / "summary.json").read_text())
    assert summary == {"final": None, "nested": {"x": None}}


def test_a_restart_after_a_torn_line_starts_a_new_line(tmp_path):
    run = Run(_cfg(), tmp_path / "r", resumable=True).start()
    run.log({"loss": 1.0}, step=1)
    run.finish({}, status="interrupted")
    with open(run.dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "lo')  # killed mid-line
    again = Run(_cfg(), tmp_path / "r", resumable=True).start()
    again.log({"loss": 0.5}, step=2)
    lines = (run.dir / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["step"] == 2 and lines[-2] == '{"step": 2, "lo'


def test_one_process_at_a_time_writes_a_run_directory(tmp_path):
    import os

    from lmrun.errors import LmrunError

    first = Run(_cfg(), tmp_path / "r", resumable=True).start()
    with pytest.raises(LmrunError, match=rf"run directory {tmp_path / 'r'} is in use by pid {os.getpid()} on host"):
        Run(_cfg(), tmp_path / "r", resumable=True).start()
    assert json.loads((tmp_path / "r" / "run.json").read_text())["status"] == "running"  # untouched
    first.finish({"loss": 1.0})
    again = Run(_cfg(), tmp_path / "r", resumable=True).start()  # released by finish
    again.finish({"loss": 0.5})
    assert json.loads((tmp_path / "r" / "run.json").read_text())["restarts"] == 1
