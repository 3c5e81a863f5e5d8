"""The main job's defaults (commit 5be9524): a 240 s time budget unless another budget is set
(``${lmrun.time_budget:...}``), the native encoder by default (tiktoken optional, a one-line error
without it), and the trainer's progress line."""
from __future__ import annotations

import importlib.util
import time
from types import SimpleNamespace

import pytest

from lmrun import cli
from lmrun.configs import time_budget_resolver
from lmrun.train.config import DEFAULT_MAX_TIME
from lmrun.train.trainer import Trainer

BUDGETS = ("max_steps", "max_tokens", "max_flops", "max_time")


def budgets(*overrides: str) -> dict:
    cfg = cli.compose(["stage=pretrain", *overrides])
    return {k: cfg.train[k] for k in BUDGETS}


@pytest.mark.parametrize("overrides, expected", [
    ((), dict(max_steps=None, max_tokens=None, max_flops=None, max_time=240.0)),
    (("train.max_steps=5",), dict(max_steps=5, max_tokens=None, max_flops=None, max_time=None)),
    (("train.max_time=30",), dict(max_steps=None, max_tokens=None, max_flops=None, max_time=30.0)),
    (("train.max_steps=null", "train.max_tokens=1000"), dict(max_steps=None, max_tokens=1000, max_flops=None,
                                                              max_time=None)),
    (("train.max_flops=1e12",), dict(max_steps=None, max_tokens=None, max_flops=1e12, max_time=None)),
    (("train.max_time=null",), dict(max_steps=None, max_tokens=None, max_flops=None, max_time=None)),
    # an explicit max_time wins over the interpolation, also next to another budget (validation rejects it)
    (("train.max_steps=5", "train.max_time=30"), dict(max_steps=5, max_tokens=None, max_flops=None, max_time=30.0)),
])
def test_default_time_budget_composition(overrides, expected):
    got = budgets(*overrides)
    assert got == expected
    assert got["max_time"] is None or type(got["max_time"]) is float


def test_default_is_240_seconds_of_training():
    assert DEFAULT_MAX_TIME == 240
    assert time_budget_resolver(None, None, None, 240) == 240.0
    assert time_budget_resolver(5, None, None, 240) is None
    assert time_budget_resolver(None, 1000, None, 240) is None
    assert time_budget_resolver(None, None, 1e12, 240) is None
    assert time_budget_resolver(0, None, None, 240) is None  # set (even if invalid): not the default


@pytest.mark.parametrize("experiment, expected", [
    ("alignment_cpu", dict(max_steps=400, max_tokens=None, max_flops=None, max_time=None)),
    ("tinystories_a1", dict(max_steps=None, max_tokens=327680000, max_flops=None, max_time=None)),
    ("owt_leaderboard", dict(max_steps=None, max_tokens=None, max_flops=None, max_time=5400.0)),
])
def test_experiment_presets_replace_the_default_budget(experiment, expected):
    assert budgets(f"experiment={experiment}") == expected


def test_the_default_validates_and_plans_a_time_budget(small_text):
    data = ["data=text_files", f"data.train={small_text}"]
    _, plan = cli.preflight(["stage=pretrain", *data])
    assert plan["budget"]["seconds"] == 240.0 and "steps" not in plan["budget"]
    _, plan = cli.preflight(["stage=pretrain", *data, "train.max_steps=5"])
    assert plan["budget"]["steps"] == 5 and "seconds" not in plan["budget"]


def test_two_budgets_are_one_line_error(capsys):
    assert cli.main(["stage=pretrain", "train.max_steps=5", "train.max_time=30", "dry_run=true"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "exactly one budget" in err


# --- tokenizer.backend -------------------------------------------------------------------------

def test_native_backend_is_the_default():
    for overrides in ([], ["tokenizer=bpe"], ["tokenizer=bytes"]):
        assert cli.compose(["stage=pretrain", *overrides]).tokenizer.backend == "native"
    from lmrun.tokenizer.config import TokenizerConfig

    assert TokenizerConfig().backend == "native"


@pytest.fixture
def no_tiktoken(monkeypatch):
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name == "tiktoken" or name.startswith("tiktoken.") else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def test_tiktoken_backend_without_tiktoken_is_a_one_line_error(no_tiktoken, small_text, isolated_workspace, capsys):
    rc = cli.main(["stage=pretrain", "tokenizer.backend=tiktoken", "data=text_files", f"data.train={small_text}",
                   "dry_run=true"])
    out = capsys.readouterr()
    assert rc == 2
    err = out.err.strip()
    assert len(err.splitlines()) == 1, err
    assert "tokenizer.backend='tiktoken'" in err and "pip install tiktoken" in err and "Traceback" not in err
    assert not (isolated_workspace / "runs").exists()  # nothing ran


def test_native_default_needs_no_tiktoken(no_tiktoken, small_text, capsys):
    assert cli.main(["stage=pretrain", "data=text_files", f"data.train={small_text}", "dry_run=true"]) == 0
    assert "tiktoken" not in capsys.readouterr().err


def test_unknown_backend_names_both_choices(capsys):
    assert cli.main(["stage=pretrain", "tokenizer.backend=fast", "dry_run=true"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "expected one of native, tiktoken" in err


# --- Trainer.progress_line ---------------------------------------------------------------------

def _fake_trainer(step, train_seconds, *, max_time=None, total_steps=None, step0=0, train_s_here=None,
                  wall=20.0):
    return SimpleNamespace(state=SimpleNamespace(step=step, train_seconds=train_seconds),
                           t=SimpleNamespace(max_time=max_time), total_steps=total_steps,
                           _fit_t0=time.perf_counter() - wall, _fit_step0=step0,
                           _train_s_here=train_seconds if train_s_here is None else train_s_here)


def test_progress_line_for_a_step_budget():
    line = Trainer.progress_line(_fake_trainer(40, 62.0, total_steps=1000, wall=62.0))
    # pace 62 s / 40 steps -> 960 steps left take 1488 s
    assert line.startswith("step 40/1000 (4%), elapsed 1m02s, ETA 24m48s")
    # resumed at step 20: the pace counts only the steps of this process
    line = Trainer.progress_line(_fake_trainer(40, 100.0, total_steps=100, step0=20, train_s_here=10.0, wall=10.0))
    assert line.startswith("step 40/100 (40%), elapsed 10s, ETA 30s")
    # before any step of this process: no ETA
    assert Trainer.progress_line(_fake_trainer(20, 5.0, total_steps=100, step0=20, train_s_here=0.0)).endswith("ETA ?")
    assert Trainer.progress_line(_fake_trainer(100, 9.0, total_steps=100)).startswith("step 100/100 (100%), ")
    assert Trainer.progress_line(_fake_trainer(100, 9.0, total_steps=100)).endswith("ETA 0.0s")


def test_progress_line_for_a_time_budget():
    line = Trainer.progress_line(_fake_trainer(40, 12.0, max_time=240.0, wall=13.1))
    assert line.startswith("step 40, 12s/4m00s of training (5%), elapsed 13s, ETA 3m48s")
    # over the budget: capped at 100 %, ETA 0
    line = Trainer.progress_line(_fake_trainer(50, 2.4, max_time=2.0, wall=3.0))
    assert line.startswith("step 50, 2.4s/2.0s of training (100%), elapsed 3.0s, ETA 0.0s")
