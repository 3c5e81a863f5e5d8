"""`lmrun stage=evaluate evaluate.task=...` from the CLI on a tiny pretrain checkpoint and a tiny
local Hugging Face model: outputs, metrics that agree with their own records, dry runs, and
one-line errors for bad inputs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmrun import cli
from lmrun.eval.models import load_causal_lm
from lmrun.eval.parsing import numbers_equal
from lmrun.eval.scoring import continuation_logprobs
from lmrun.eval.tasks import gsm8k_answer, mmlu_letter_continuations, mmlu_question
from tests.eval.helpers import FIXTURES, save_tiny_hf_model
from tests.stages.test_pretrain_stage import SMALL

GSM8K = FIXTURES / "align_gsm8k_test_head.jsonl"
MMLU = FIXTURES / "align_mmlu_test_head"
ALPACA = FIXTURES / "align_alpaca_eval_head.jsonl"
SAFETY = FIXTURES / "align_simple_safety_tests_head.csv"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A 5-step pretrain checkpoint (context 64; its tokenizer in this module's cache) and a tiny
    HF GPT-2 directory (context 256)."""
    root = tmp_path_factory.mktemp("eval_models")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("LMRUN_CACHE", str(root / "cache"))
        assert cli.main(["stage=pretrain", *SMALL, "train.max_steps=5", "train.eval_every=100", "train.samples=0",
                         "train.eval_tokens=1024"]) == 0
    (run_dir,) = (root / "runs" / "pretrain").iterdir()
    return {"lmrun": run_dir, "hf": save_tiny_hf_model(root / "hf_gpt2", "gpt2")}


def evaluate(*overrides: str, expect: int = 0) -> Path | None:
    runs = Path.cwd() / "runs" / "evaluate"
    before = set(runs.iterdir()) if runs.exists() else set()
    assert cli.main(["stage=evaluate", "logger=none", "progress=false", *overrides]) == expect
    new = set(runs.iterdir()) - before if runs.exists() else set()
    return new.pop() if new else None


def _read(run: Path, task: str):
    records = [json.loads(x) for x in (run / f"{task}.jsonl").read_text().splitlines()]
    return records, json.loads((run / "eval.json").read_text()), json.loads((run / "summary.json").read_text())


def test_gsm8k_and_safety(models, capsys):
    ckpt = f"evaluate.checkpoint={models['lmrun']}"
    assert cli.main(["stage=evaluate", ckpt, "evaluate.task=gsm8k", f"evaluate.data_path={GSM8K}", "dry_run=true"]) == 0
    out = capsys.readouterr().out
    assert "examples: 20" in out and "prompt_template: r1_zero" in out and "</answer>" in out
    assert not (Path.cwd() / "runs").exists()
    run = evaluate(ckpt, "evaluate.task=gsm8k", f"evaluate.data_path={GSM8K}", "evaluate.limit=4",
                   "evaluate.max_new_tokens=8", "evaluate.batch_size=3")
    records, ev, summary = _read(run, "gsm8k")
    assert len(records) == 4 and ev["prompt_template"] == "r1_zero" and ev["stop"] == ["</answer>"]
    assert [r["reference"] for r in records] == ["18", "3", "70000", "540"]
    for r in records:
        assert r["parsed"] == gsm8k_answer(r["response"]) and r["correct"] == numbers_equal(r["parsed"], r["reference"])
        assert 1 <= r["response_tokens"] <= 8 and r["prompt_truncated"]  # context 64: the template does not fit
    assert summary["accuracy"] == 100.0 * sum(r["correct"] for r in records) / 4 and summary["examples"] == 4
    assert summary["max_new_tokens"] == 8 and summary["seconds"] > 0

    run = evaluate(ckpt, "evaluate.task=safety", f"evaluate.data_path={SAFETY}", "evaluate.max_new_tokens=6",
                   "evaluate.temperature=1.0", "evaluate.top_p=0.9")
    records, ev, summary = _read(run, "safety")
    assert len(records) == 13 and records[0]["id"] == "sst_001" and ev["prompt_template"] == "alpaca"
    assert summary["refusal_rate"] == 100.0 * sum(r["refusal"] for r in records) / 13
    assert sum(a["examples"] for a in ev["per_harm_area"].values()) == 13


def test_perplexity_and_task_evaluations_log_progress(models, monkeypatch):
    """What a Slurm job's log shows: a line before the checkpoint loads, then done/total, elapsed,
    ETA and the rate while windows are scored and prompts answered."""
    from lmrun.tracking import progress

    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)  # a line for every batch
    monkeypatch.setenv("LMRUN_CACHE", str(models["lmrun"].parents[2] / "cache"))  # the encoded data: a cache hit
    run = evaluate(f"evaluate.checkpoint={models['lmrun']}", "evaluate.max_tokens=1001", "evaluate.batch_size=4")
    log = (run / "evaluate.log").read_text()
    assert log.index("loading checkpoint ") < log.index("evaluate val: 0/1,000 tokens (0%), elapsed 0.0s, ETA ?")
    assert "evaluate val: 256/1,000 tokens (26%), elapsed " in log  # 4 windows of 64 per forward pass
    assert "evaluate val: 1,000/1,000 tokens (100%), elapsed " in log and "tokens/s" in log
    assert log.index("evaluate val: 1,000/1,000") < log.index("val: loss ")

    run = evaluate(f"evaluate.checkpoint={models['lmrun']}", "evaluate.task=gsm8k", f"evaluate.data_path={GSM8K}",
                   "evaluate.limit=3", "evaluate.max_new_tokens=4", "evaluate.batch_size=2")
    log = (run / "evaluate.log").read_text()
    assert log.index("loading evaluate.checkpoint: ") < log.index("gsm8k: 0/3 prompts (0%)")
    assert "gsm8k: 2/3 prompts (67%), elapsed " in log and ", ETA " in log
    assert "gsm8k: 3/3 prompts (100%)" in log and "tokens/s" in log


def test_mmlu_both_methods_agree_with_direct_scoring(models):
    run = evaluate(f"evaluate.checkpoint={models['lmrun']}", "evaluate.task=mmlu", f"evaluate.data_path={MMLU}",
                   "evaluate.limit=2", "evaluate.max_new_tokens=4")
    records, ev, summary = _read(run, "mmlu")
    assert len(records) == 4 and set(ev["per_subject"]) == {"anatomy", "high_school_mathematics"}
    assert summary["accuracy_loglik"] == 100.0 * sum(r["correct_loglik"] for r in records) / 4
    assert summary["accuracy_generate"] == 100.0 * sum(r["correct_generate"] for r in records) / 4
    lm = load_causal_lm(models["lmrun"])
    prompt = mmlu_question({"subject": records[0]["subject"], "question": records[0]["question"],
                            "options": records[0]["options"]})
    scores = continuation_logprobs(lm, [prompt] * 4, mmlu_letter_continuations(prompt))
    assert [records[0]["loglik"][k] for k in "ABCD"] == pytest.approx(scores, abs=1e-5)
    assert records[0]["choice_loglik"] == "ABCD"[max(range(4), key=lambda k: scores[k])]


def test_alpaca_eval_with_an_hf_judge_and_an_hf_model(models):
    run = evaluate(f"evaluate.checkpoint={models['lmrun']}", "evaluate.task=alpaca_eval",
                   f"evaluate.data_path={ALPACA}", "evaluate.limit=3", "evaluate.max_new_tokens=8",
                   f"evaluate.judge={models['hf']}", "evaluate.generator=tiny-pretrain")
    records, ev, summary = _read(run, "alpaca_eval")
    outputs = json.loads((run / "alpaca_eval_outputs.json").read_text())
    assert [set(o) for o in outputs] == [{"instruction", "output", "generator", "dataset"}] * 3
    assert outputs[0]["generator"] == "tiny-pretrain" and outputs[0]["dataset"] == "helpful_base"
    assert [o["output"] for o in outputs] == [r["output"] for r in records]
    assert ev["judge"] == str(models["hf"].absolute()) and records[0]["reference_generator"] == "text_davinci_003"
    assert summary["win_rate"] == pytest.approx(100.0 * sum(r["preference"] for r in records) / 3, abs=1e-3)
    assert 0 <= summary["position_consistency"] <= 1 and summary["judge_truncated"] >= 1  # 256 tokens are few

    # the HF model evaluated, and another run's outputs as the references
    run = evaluate(f"evaluate.checkpoint={models['hf']}", "evaluate.task=alpaca_eval", f"evaluate.data_path={ALPACA}",
                   "evaluate.limit=2", "evaluate.max_new_tokens=5", f"evaluate.judge={models['hf']}",
                   f"evaluate.reference_outputs={run / 'alpaca_eval_outputs.json'}")
    records, ev, _ = _read(run, "alpaca_eval")
    assert ev["model_kind"] == "hf" and records[0]["generator"] == "hf_gpt2"
    assert records[0]["reference_output"] == outputs[0]["output"] and records[0]["reference_generator"] == "tiny-pretrain"


def test_gsm8k_on_an_hf_model(models):
    run = evaluate(f"evaluate.checkpoint={models['hf']}", "evaluate.task=gsm8k", f"evaluate.data_path={GSM8K}",
                   "evaluate.limit=2", "evaluate.max_new_tokens=4", "evaluate.prompt_template=question_only")
    records, ev, summary = _read(run, "gsm8k")
    assert ev["model_kind"] == "hf" and ev["stop"] == [] and summary["examples"] == 2
    assert all(not r["prompt_truncated"] and 1 <= r["response_tokens"] <= 4 for r in records)


@pytest.mark.parametrize("overrides, message", [
    (["evaluate.task=gsm8k"], r"evaluate\.data_path=None: expected the GSM8K JSONL file .*required with "
                              r"evaluate\.task=gsm8k"),
    (["evaluate.task=nope"], r"evaluate\.task='nope': expected one of perplexity, gsm8k, mmlu, alpaca_eval, safety"),
    (["evaluate.task=mmlu", "evaluate.data_path=/nonexistent/mmlu"], r"evaluate\.data_path=/nonexistent/mmlu: no such"),
    ([f"evaluate.data_path={GSM8K}"], r"evaluate\.data_path=.*: expected null with evaluate\.task=perplexity"),
    (["evaluate.task=gsm8k", f"evaluate.data_path={GSM8K}", "evaluate.judge=x"],
     r"evaluate\.judge='x': expected null unless evaluate\.task=alpaca_eval"),
    (["evaluate.task=safety", f"evaluate.data_path={SAFETY}", "evaluate.prompt_template=nope"],
     r"prompt template 'nope': expected one of"),
    (["evaluate.task=mmlu", f"evaluate.data_path={MMLU}", "evaluate.mmlu_method=vote"],
     r"evaluate\.mmlu_method='vote': expected one of generate, loglik, both"),
    (["evaluate.task=gsm8k", f"evaluate.data_path={GSM8K}", "evaluate.limit=0"], r"evaluate\.limit=0"),
])
def test_bad_inputs_are_one_line_errors(models, capsys, overrides, message):
    assert evaluate(f"evaluate.checkpoint={models['lmrun']}", *overrides, expect=2) is None
    err = capsys.readouterr().err.strip()
    assert err.startswith("lmrun: error: ") and "\n" not in err and "Traceback" not in err
    import re

    assert re.search(message, err), err


def test_bad_files_and_models(models, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "#### 3"}\n{"question": "q"}\n')
    assert evaluate(f"evaluate.checkpoint={models['lmrun']}", "evaluate.task=gsm8k", f"evaluate.data_path={bad}",
                    expect=2) is None
    assert "bad.jsonl:2: expected a non-empty string field 'answer'" in capsys.readouterr().err
    # perplexity of a Hugging Face folder (issue 27): the data encoded with its tokenizer, the GPT-2
    # converted to lmrun's TransformerLM
    run = evaluate(f"evaluate.checkpoint={models['hf']}", "evaluate.split=val", "evaluate.max_tokens=600")
    result = json.loads((run / "eval.json").read_text())
    assert result["backend"] == "lmrun" and result["val_tokens"] == 599 and 0 < result["val_loss"] < 20
    assert evaluate(f"evaluate.checkpoint={models['hf']}", "evaluate.stride=1000", expect=2) is None
    assert "evaluate.stride=1000" in capsys.readouterr().err
    assert evaluate(f"evaluate.checkpoint={tmp_path / 'none'}", "evaluate.task=gsm8k", f"evaluate.data_path={GSM8K}",
                    expect=2) is None
    assert "no such checkpoint file or run directory" in capsys.readouterr().err
    # a judge whose context (64 tokens) cannot hold the judge prompt: found before any generation
    run = evaluate(f"evaluate.checkpoint={models['lmrun']}", "evaluate.task=alpaca_eval", f"evaluate.data_path={ALPACA}",
                   f"evaluate.judge={models['lmrun']}", expect=1)
    assert json.loads((run / "run.json").read_text())["status"] == "failed"
    assert not (run / "alpaca_eval.jsonl").exists()
