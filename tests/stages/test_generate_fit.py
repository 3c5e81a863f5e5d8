"""`lmrun stage=generate` with the default ``max_new_tokens`` on a short-context checkpoint: the
budget is capped to what the context leaves (with a warning), errors never end up glued to the
streamed text, and the start-up says what it is doing (issue 24)."""
from __future__ import annotations

import json

from lmrun import cli
from lmrun.inference.engine import InferenceEngine
from lmrun.inference.config import fit_new_tokens
from tests.stages.test_pretrain_stage import run_pretrain


def test_fit_new_tokens():
    assert fit_new_tokens([6], 128, 64) == 58
    assert fit_new_tokens([3, 10], 20, 64) == 20
    try:
        fit_new_tokens([64], 8, 64, "generate.prompts_file")
    except Exception as e:  # noqa: BLE001
        assert "generate.prompts_file" in str(e) and "64 tokens" in str(e)
    else:
        raise AssertionError("a prompt filling the context must be refused")


def test_generate_caps_max_new_tokens_and_reports(isolated_workspace, capsys, monkeypatch):
    run_dir = run_pretrain("train.max_steps=2", "train.eval_every=100", "train.samples=0")
    base = ["stage=generate", "logger=none", "progress=false", f"generate.checkpoint={run_dir}"]
    capsys.readouterr()
    # the default max_new_tokens (128) exceeds the context (64): capped, not an error
    assert cli.main([*base, "generate.prompt=ROMEO:", "generate.temperature=0", "generate.stop_at_special=false"]) == 0
    out, err = capsys.readouterr()
    run = sorted((isolated_workspace / "runs" / "generate").iterdir())[-1]
    (rec,) = [json.loads(x) for x in (run / "generations.jsonl").read_text().splitlines()]
    summary = json.loads((run / "summary.json").read_text())
    prompt_len = summary["prompt_tokens"]
    assert len(rec["token_ids"]) == 64 - prompt_len == summary["max_new_tokens"]
    assert summary["max_new_tokens_requested"] == 128
    assert "max_new_tokens=128 does not fit" in err and f"at most {64 - prompt_len} new tokens" in err
    # the start-up is narrated: checkpoint, model, tokenizer
    assert "reading checkpoint" in err and "loading the model" in err and "loading the tokenizer" in err
    assert out.startswith("ROMEO:") and out.endswith("\n")

    # a prompt that fills the context: one line, no traceback, stdout not left mid-line
    long_prompt = "ROMEO and Juliet " * 40
    assert cli.main([*base, f"generate.prompt={long_prompt}"]) != 0
    out, err = capsys.readouterr()
    assert "leaves no room for new tokens" in err and "context_length=64" in err and "Traceback" not in err
    assert out == "" or out.endswith("\n")

    # an error in the middle of streaming: the streamed line is ended before the error is reported
    def failing(self, prompts, params=None, on_token=None):
        on_token(0, 100)
        raise ValueError("boom")

    monkeypatch.setattr(InferenceEngine, "generate", failing)
    assert cli.main([*base, "generate.prompt=ROMEO:", "generate.max_new_tokens=4"]) != 0
    out, err = capsys.readouterr()
    assert out.startswith("ROMEO:") and out.endswith("\n") and "boom" in err
