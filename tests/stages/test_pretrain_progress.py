"""`lmrun stage=pretrain` of commit 5be9524, end to end on a tiny model: progress lines (step/total or
seconds/budget, elapsed, ETA) and the heartbeat, evaluation progress, samples through the KV-cached
engine, ``train.overfit_batches`` and ``train.profile``."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import lmrun.train.trainer as trainer_module
from lmrun import cli
from lmrun.inference.engine import InferenceEngine

TINY = ["logger=none", "progress=false", "tokenizer.vocab_size=512", "model/size=tiny", "model.context_length=64",
        "train.batch_size=8", "train.eval_tokens=4096", "train.samples=0", "train.sample_tokens=16",
        "train.eval_every=1000"]


def run_pretrain(small_text: Path, *overrides: str) -> Path:
    runs = Path.cwd() / "runs" / "pretrain"
    before = set(runs.iterdir()) if runs.exists() else set()
    assert cli.main(["stage=pretrain", *TINY, "data=text_files", f"data.train={small_text}", *overrides]) == 0
    (new,) = set(runs.iterdir()) - before
    return new


def log_lines(run_dir: Path, logger: str = "lmrun.train.trainer") -> list[str]:
    """The messages of ``logger`` in the run's pretrain.log (first lines of each)."""
    out = []
    for line in (run_dir / "pretrain.log").read_text().splitlines():
        m = re.match(r"\[[^]]+\]\[([\w.]+)\]\[\w+\] (.*)", line)
        if m and m.group(1) == logger:
            out.append(m.group(2))
    return out


def train_rows(run_dir: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "loss" in r}


STEP_LINE = re.compile(r"step (\d+)/(\d+) \((\d+)%\), elapsed ([\d.hms]+), ETA ([\d.hms]+|\?): loss [\d.]+(, lr [\d.e-]+)?")


def test_step_budget_progress_heartbeat_and_evaluation_progress(small_text, monkeypatch):
    monkeypatch.setattr(trainer_module, "LOG_EVERY_S", 0)  # a heartbeat after every step between log steps
    run_dir = run_pretrain(small_text, "train.max_steps=6", "train.log_every=3", "train.eval_every=4")
    lines = [line for line in log_lines(run_dir) if STEP_LINE.match(line)]
    seen = {}
    for line in lines:
        m = STEP_LINE.match(line)
        step, total, pct = int(m.group(1)), int(m.group(2)), int(m.group(3))
        assert total == 6 and pct == round(100 * step / 6), line
        assert m.group(5) != "?", line  # the pace is known after the first step
        seen[step] = bool(m.group(6))  # True: a log_every line (with lr), False: a heartbeat
    assert seen == {1: False, 2: False, 3: True, 4: False, 5: False, 6: True}
    assert STEP_LINE.match(lines[-1]).group(5) == "0.0s"
    assert sorted(train_rows(run_dir)) == [3, 6]  # heartbeats are log lines only, not metrics
    # evaluation reports through Progress: at step 4 on eval_tokens, at the end on the whole split
    summary = json.loads((run_dir / "summary.json").read_text())
    evals = [line for line in log_lines(run_dir, "lmrun") if ": evaluating: " in line]
    n4 = min(4096, summary["val_tokens"] + 1) - 1
    assert any(line.startswith(f"step 4: evaluating: {n4:,}/{n4:,} tokens (100%)") for line in evals), evals
    n = summary["val_tokens"]
    assert any(line.startswith(f"step 6: evaluating: {n:,}/{n:,} tokens (100%)") for line in evals), evals


def test_no_heartbeat_before_the_interval(small_text, monkeypatch):
    from lmrun.tracking import progress

    assert trainer_module.LOG_EVERY_S == progress.LOG_EVERY_S == 10.0  # "at least every 10 s"
    monkeypatch.setattr(trainer_module, "LOG_EVERY_S", 1e9)
    run_dir = run_pretrain(small_text, "train.max_steps=3", "train.log_every=3")
    lines = [line for line in log_lines(run_dir) if STEP_LINE.match(line)]
    assert len(lines) == 1 and lines[0].startswith("step 3/3 (100%)") and ", lr " in lines[0]


TIME_LINE = re.compile(r"step (\d+), ([\d.hms]+)/2\.0s of training \((\d+)%\), elapsed ([\d.hms]+), ETA ([\d.hms]+): ")


def test_time_budget_progress_line(small_text, monkeypatch):
    monkeypatch.setattr(trainer_module, "LOG_EVERY_S", 0)
    run_dir = run_pretrain(small_text, "train.max_time=2", "train.log_every=100000")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["train_seconds"] >= 2.0
    lines = [line for line in log_lines(run_dir) if line.startswith("step ") and "of training" in line]
    assert len(lines) == summary["steps"]  # one per step: heartbeats, then the last step's line
    matches = [TIME_LINE.match(line) for line in lines]
    assert all(matches), lines
    assert [int(m.group(1)) for m in matches] == list(range(1, summary["steps"] + 1))
    pcts = [int(m.group(3)) for m in matches]
    assert pcts == sorted(pcts) and pcts[-1] == 100
    assert matches[-1].group(5) == "0.0s" and ", lr " in lines[-1]
    assert not any("/" in line.split(",")[0] for line in lines)  # no step total: the budget is time


def test_samples_through_the_kv_cached_engine(small_text, monkeypatch):
    calls = []
    real = InferenceEngine.generate

    def spy(self, prompts, params=None, on_token=None):
        completions = real(self, prompts, params, on_token)
        calls.append((list(prompts), params, [list(c.token_ids) for c in completions]))
        return completions

    monkeypatch.setattr(InferenceEngine, "generate", spy)
    # more new tokens than the context holds: capped, not an error
    run_dir = run_pretrain(small_text, "train.max_steps=2", "train.samples=3", "train.sample_tokens=100",
                           "seed=7")
    (prompts, params, outs), = calls  # one batched call
    assert len(prompts) == 3 and all(p == prompts[0] for p in prompts)
    cap = 64 - len(prompts[0])
    assert params.max_new_tokens == cap and params.seed == 7
    assert len(outs) == 3 and all(1 <= len(o) <= cap for o in outs)
    text = (run_dir / "samples.txt").read_text()
    assert [int(i) for i in re.findall(r"^--- sample (\d+) ", text, flags=re.M)] == [0, 1, 2]
    assert any(f"train.sample_tokens=100 capped to {cap} (context 64)" in line for line in log_lines(run_dir, "lmrun.stages.pretrain"))


def _bytes_tokenizer():
    from lmrun.tokenizer import Tokenizer

    return Tokenizer({i: bytes([i]) for i in range(256)}, [], ["<|endoftext|>"])


def test__samples_is_batched_seeded_and_capped(monkeypatch):
    from lmrun.model import build_model
    from lmrun.stages.pretrain import _samples

    def cfg(*overrides):
        return cli.compose(["stage=pretrain", "model/size=tiny", "model.context_length=32", "model.vocab_size=257",
                            "tokenizer=bytes", "train.samples=4", "train.sample_tokens=1000", *overrides])

    lengths = []
    real = InferenceEngine.generate

    def spy(self, prompts, params=None, on_token=None):
        completions = real(self, prompts, params, on_token)
        lengths.append((len(prompts), params.max_new_tokens, [len(x.token_ids) for x in completions]))
        return completions

    monkeypatch.setattr(InferenceEngine, "generate", spy)
    torch.manual_seed(0)
    c = cfg()
    model = build_model(c.model)
    model.train()
    tok = _bytes_tokenizer()
    texts = _samples(c, model, tok)
    assert model.training  # the mode is restored
    assert len(texts) == 4 and all(t.startswith("\n") for t in texts)
    (n, cap, got), = lengths  # one batched call; at most the context's worth of new tokens
    assert n == 4 and cap == 31 and all(1 <= k <= 31 for k in got)
    assert len(set(texts)) > 1  # one generator for the batch: the samples differ
    assert _samples(c, model, tok) == texts  # seeded
    assert _samples(cfg("seed=1"), model, tok) != texts
    calls = []
    monkeypatch.setattr(InferenceEngine, "generate", lambda *a, **k: calls.append(a) or [])
    assert _samples(cfg("train.samples=0"), model, tok) == [] and not calls


def test_overfit_batches_drives_one_batch_loss_down(small_text):
    common = ("train.max_steps=20", "train.log_every=1", "optimizer.lr=1e-2")
    normal = train_rows(run_pretrain(small_text, *common))
    overfit = train_rows(run_pretrain(small_text, *common, "train.overfit_batches=1"))
    assert sorted(normal) == sorted(overfit) == list(range(1, 21))
    assert overfit[1]["loss"] == pytest.approx(normal[1]["loss"], rel=1e-6)  # the same first batch
    last_normal = sum(normal[s]["loss"] for s in range(18, 21)) / 3
    last_overfit = sum(overfit[s]["loss"] for s in range(18, 21)) / 3
    assert last_overfit < 0.6 * last_normal, (last_overfit, last_normal)


def test_overfit_batches_cycles_the_first_micro_batches(small_text, monkeypatch):
    """With train.overfit_batches=2 and 2 micro-batches per step, every step sees the same 2 batches."""
    seen = []
    real = trainer_module.Trainer._next_batch

    def spy(self):
        x, y = real(self)
        seen.append(x.clone())
        return x, y

    monkeypatch.setattr(trainer_module.Trainer, "_next_batch", spy)
    run_pretrain(small_text, "train.max_steps=3", "train.grad_accum_steps=2", "train.overfit_batches=2")
    assert len(seen) == 6
    assert not torch.equal(seen[0], seen[1])
    for i in range(2, 6):
        assert torch.equal(seen[i], seen[i % 2])


def test_profile_writes_a_trace_and_an_operator_table(small_text):
    run_dir = run_pretrain(small_text, "train.max_steps=7", "train.profile=true", "train.log_every=7")
    trace = json.loads((run_dir / "profile" / "trace.json").read_text())
    assert trace["traceEvents"]
    names = {e.get("name") for e in trace["traceEvents"]}
    assert {f"ProfilerStep#{i}" for i in range(2, 7)} <= names  # steps 3-7 (the profiler counts from 0)
    ops = (run_dir / "profile" / "ops.txt").read_text()
    assert "Self CPU" in ops and "aten::" in ops
    assert any(line.startswith("profile of steps 3-7: ") for line in log_lines(run_dir))


def test_profile_of_a_shorter_run_warns_and_writes_nothing(small_text):
    run_dir = run_pretrain(small_text, "train.max_steps=5", "train.profile=true", "train.log_every=5")
    assert not (run_dir / "profile").exists()
    warnings = [line for line in log_lines(run_dir) if line.startswith("train.profile: no profile recorded")]
    assert len(warnings) == 1 and "the run had 5 steps, the profile needs 7" in warnings[0]
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 5  # the run itself completes
