"""Evaluations report progress while they run: generation over prompts (per batch, and inside a
batch as tokens are accepted), continuation scoring, and the alignment stages' sampling, each
with done/total, elapsed, ETA and the rate (``lmrun.tracking.progress``)."""
from __future__ import annotations

import logging

import pytest
import torch

from lmrun.eval.scoring import GenerationOptions, continuation_logprobs, generate_responses
from lmrun.tracking import progress
from tests.eval.helpers import EOS, ScriptedLM, bigram_lm


@pytest.fixture
def every_update(monkeypatch, caplog):
    """A progress line for every update, captured."""
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    caplog.set_level(logging.INFO)
    return lambda: [r.getMessage() for r in caplog.records]


def _no_eos_lm():
    table = torch.randn(257, 257, generator=torch.Generator().manual_seed(0))
    table[:, EOS] = -1e9  # never stops early: every prompt gets its max_new_tokens
    return bigram_lm(table)


def test_generation_reports_prompts_and_tokens_also_inside_a_batch(every_update):
    opts = GenerationOptions(max_new_tokens=16, batch_size=2, temperature=0.0)
    res = generate_responses(_no_eos_lm(), [f"prompt {i}" for i in range(5)], opts, desc="gsm8k")
    assert res.new_tokens == 5 * 16
    lines = [x for x in every_update() if x.startswith("gsm8k: ")]
    assert lines[0] == "gsm8k: 0/5 prompts (0%), elapsed 0.0s, ETA ?, 0 prompts/s"  # before the first batch
    # inside the first batch (2 prompts x 16 tokens), every 8 accepted tokens
    inside = [x for x in lines if x.startswith("gsm8k: 0/5 prompts") and "new_tokens" in x]
    assert [x.split("new_tokens ")[1].split(",")[0] for x in inside] == ["8", "16", "24", "32"]
    assert any(x.startswith("gsm8k: 2/5 prompts (40%), elapsed ") and ", ETA " in x and "prompts/s" in x
               and "new_tokens 32, tokens/s " in x for x in lines)
    assert lines[-1].startswith("gsm8k: 5/5 prompts (100%), elapsed ") and "new_tokens 80, tokens/s" in lines[-1]


def test_models_without_streaming_report_per_batch(every_update):
    lm = ScriptedLM(lambda prompt: "42")  # generate(prompts, params): no on_token
    generate_responses(lm, ["a", "b", "c"], GenerationOptions(batch_size=2), desc="safety")
    lines = [x.split(", elapsed")[0] for x in every_update() if x.startswith("safety: ")]
    assert lines == ["safety: 0/3 prompts (0%)", "safety: 2/3 prompts (67%)", "safety: 3/3 prompts (100%)",
                     "safety: 3/3 prompts (100%)"]  # the last: the closing line


def test_continuation_scoring_reports_sequences(every_update):
    continuation_logprobs(bigram_lm(seed=1), ["Answer:"] * 4, [" A", " B", " C", " D"], batch_size=3,
                          desc="mmlu loglik")
    lines = [x for x in every_update() if x.startswith("mmlu loglik: ")]
    assert lines[0].startswith("mmlu loglik: 0/4 sequences (0%)")
    assert lines[1].startswith("mmlu loglik: 3/4 sequences (75%), elapsed ") and ", ETA " in lines[1]
    assert "tokens/s" in lines[-1] and lines[-1].startswith("mmlu loglik: 4/4 sequences (100%)")


def test_training_time_sampling_is_quiet_unless_slow(monkeypatch, caplog):
    from lmrun.align.loop import sample

    caplog.set_level(logging.INFO)
    sample(_no_eos_lm(), ["1+1=", "2+2="], max_new_tokens=4, temperature=0.0, desc="rollouts")
    assert not [r for r in caplog.records if r.getMessage().startswith("rollouts")]  # fast: no lines
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    sample(_no_eos_lm(), ["1+1=", "2+2="], max_new_tokens=8, temperature=0.0, desc="rollouts")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("rollouts")]
    assert lines[0].startswith("rollouts: 0/2 prompts (0%), elapsed") and "new_tokens 8" in lines[0]
    assert lines[-1].startswith("rollouts: 2/2 prompts (100%)")
