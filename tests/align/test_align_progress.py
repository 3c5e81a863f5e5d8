"""StepProgress: the alignment stages' per-step log line carries step/total, elapsed, ETA, the
rate and the metrics, every ``align.log_every`` steps and at least every ``LOG_EVERY_S`` seconds."""
from __future__ import annotations

import logging

from lmrun.align.loop import StepProgress
from lmrun.tracking import progress


def _lines(caplog, prefix: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(prefix)]


def test_a_line_every_log_every_steps_and_at_the_last(monkeypatch, caplog):
    monkeypatch.setattr(progress, "LOG_EVERY_S", 1e9)  # no time-driven lines
    caplog.set_level(logging.INFO)
    p = StepProgress(5, "sft", log_every=2, keys=("loss", "grad_norm", "missing"), rate_unit="response tokens/s")
    for step in range(1, 6):
        p.tick()
        p.step(step, {"loss": 2.0 / step, "grad_norm": 1.5, "lr": 1e-3, "clip_fraction": None}, count=100)
    p.close()
    lines = _lines(caplog, "sft: ")
    assert [x.split(" steps")[0] for x in lines] == ["sft: 0/5", "sft: 2/5", "sft: 4/5", "sft: 5/5"]
    assert lines[1].startswith("sft: 2/5 steps (40%), elapsed ") and ", ETA " in lines[1] and "steps/s" in lines[1]
    assert ", loss 1, grad_norm 1.5, response tokens/s " in lines[1]  # keys in order; lr not asked for
    assert ", loss 0.4, grad_norm 1.5, response tokens/s " in lines[-1] and "(100%)" in lines[-1]


def test_time_driven_lines_also_inside_a_step(monkeypatch, caplog):
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    caplog.set_level(logging.INFO)
    p = StepProgress(2, "grpo", log_every=100, keys=("reward",))
    p.tick()  # e.g. after a microbatch of the first step: the heartbeat
    p.step(1, {"reward": 0.25})
    p.step(2, {"reward": 0.5})
    p.close()
    lines = _lines(caplog, "grpo: ")
    assert [x.split(" steps")[0] for x in lines] == ["grpo: 0/2", "grpo: 0/2", "grpo: 1/2", "grpo: 2/2"]
    assert lines[-1].endswith("reward 0.5") and ", ETA 0.0s" in lines[-1]
