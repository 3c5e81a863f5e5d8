"""Each alignment stage runs a few steps from the CLI on a tiny pretrained model and leaves a
checkpoint the next stage reads; bad inputs give one-line errors."""
from __future__ import annotations

import json

import pytest
import torch

from lmrun import cli
from tests.stages.test_pretrain_stage import run_pretrain

COMMON = ["logger=none", "progress=false", "align.eval_examples=8", "align.max_new_tokens=4", "align.log_every=1",
          "align.batch_size=8", "align.microbatch_size=4", "align.train_examples=200"]


def _latest(workspace, stage):
    run = sorted((workspace / "runs" / stage).iterdir())[-1]
    return run, json.loads((run / "summary.json").read_text())


def _metrics(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A pretrain checkpoint shared by this module's tests (built once, in its own workspace)."""
    import os

    work = tmp_path_factory.mktemp("align_base")
    old, cache = os.getcwd(), os.environ.get("LMRUN_CACHE")
    os.chdir(work)
    os.environ["LMRUN_CACHE"] = str(work / "cache")
    try:
        run_dir = run_pretrain("train.max_steps=20", "train.eval_every=100", "train.samples=0",
                               "train.eval_tokens=null", "model.dropout=0.1")  # a checkpoint with dropout
    finally:
        os.chdir(old)
        if cache is None:
            os.environ.pop("LMRUN_CACHE", None)
        else:
            os.environ["LMRUN_CACHE"] = cache
    return run_dir


@pytest.mark.slow
def test_sft_then_grpo_dpo_expert_iteration_chain(base, isolated_workspace, tmp_path, capsys):
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{a}+{a}=", "response": str(2 * a)}) + "\n" for a in range(30)))
    assert cli.main(["stage=sft", *COMMON, f"align.model={base}", f"align.train_data={data}", f"align.val_data={data}",
                     "align.steps=6", "align.eval_every=3", "sft.packing=true"]) == 0
    run, summary = _latest(isolated_workspace, "sft")
    assert summary["val_loss"] < summary["initial_val_loss"]  # 6 steps on the validation data itself
    assert (run / "checkpoints" / "ckpt_00000006.pt").is_file() and (run / "curves.png").is_file()
    assert [m["step"] for m in _metrics(run) if "val_loss" in m] == [0, 3, 6]

    assert cli.main(["stage=sft", *COMMON, f"align.model={base}", "align.task.name=arithmetic", "align.steps=4",
                     "align.eval_every=0"]) == 0
    sft_run, summary = _latest(isolated_workspace, "sft")
    assert {"accuracy", "initial_accuracy", "format_rate"} <= set(summary)
    samples = [json.loads(x) for x in (sft_run / "eval_samples.jsonl").read_text().splitlines()]
    assert len(samples) == 8 and {"question", "response", "answer", "reward"} <= set(samples[0])

    assert cli.main(["stage=grpo", *COMMON, f"align.model={sft_run}", "align.task.name=arithmetic", "align.steps=2",
                     "grpo.rollout_batch_size=16", "grpo.group_size=4", "grpo.loss_type=grpo_clip",
                     "grpo.epochs_per_rollout_batch=2", "grpo.temperature=1.5"]) == 0
    run, summary = _latest(isolated_workspace, "grpo")
    assert summary["optimizer_steps"] == 2 * 2 * 16 // 8
    step_metrics = [m for m in _metrics(run) if "reward" in m]
    assert len(step_metrics) == 2
    log = (run / "grpo.log").read_text()
    assert "grpo: 1/2 steps (50%), elapsed " in log and "grpo: 2/2 steps (100%), elapsed " in log
    assert "reward " in log and "zero_std_group_fraction " in log and "rollout tokens/s" in log
    for key in ("reward", "zero_std_group_fraction", "token_entropy", "clip_fraction", "response_length", "grad_norm"):
        assert step_metrics[0][key] is not None, key
    assert 0 <= step_metrics[0]["clip_fraction"] <= 1 and 1 <= step_metrics[0]["response_length"] <= 4

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"{a}+1=", "chosen": str(a + 1), "rejected": str(a + 2)}) + "\n"
                             for a in range(12)))
    assert cli.main(["stage=dpo", *COMMON, f"align.model={sft_run}", f"align.train_data={pairs}",
                     f"align.val_data={pairs}", "align.steps=5", "align.eval_every=5", "optimizer.lr=1e-3"]) == 0
    run, summary = _latest(isolated_workspace, "dpo")
    assert summary["train_pairs"] == 12 and summary["initial_val_preference_accuracy"] == 0.0  # policy == reference
    assert summary["val_reward_margin"] > 0  # trained on the same pairs

    assert cli.main(["stage=expert_iteration", *COMMON, f"align.model={sft_run}", "align.task.name=arithmetic",
                     "expert_iteration.iterations=1", "expert_iteration.questions=8",
                     "expert_iteration.samples_per_question=2"]) == 0
    run, summary = _latest(isolated_workspace, "expert_iteration")
    assert summary["iterations"] == 1 and (run / "curves.png").is_file()
    rounds = [m for m in _metrics(run) if "kept" in m]
    assert len(rounds) == 1 and 0 <= rounds[0]["kept"] <= 16
    log = (run / "expert_iteration.log").read_text()
    assert "round 1 sampling: 0/16 prompts (0%)" in log and "round 1 sampling: 16/16 prompts (100%)" in log
    assert "expert iteration: 1/1 rounds (100%), elapsed " in log

    # the aligned checkpoint is an ordinary lmrun checkpoint: stage=generate reads it
    assert cli.main(["stage=generate", "logger=none", "progress=false", f"generate.checkpoint={sft_run}",
                     "generate.prompt='12+30='", "generate.max_new_tokens=3"]) == 0


def test_sft_and_dpo_log_progress(base, isolated_workspace, tmp_path):
    """The per-step line carries step/total, elapsed, ETA, the rate and the metrics; loading the
    model and the reference's log-probs say so before they start."""
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{a}+{a}=", "response": str(2 * a)}) + "\n" for a in range(16)))
    assert cli.main(["stage=sft", *COMMON, f"align.model={base}", f"align.train_data={data}", "align.steps=3",
                     "align.eval_every=0"]) == 0
    run, _ = _latest(isolated_workspace, "sft")
    log = (run / "sft.log").read_text()
    assert log.index("loading align.model: ") < log.index("SFT: tokenizing 16 training examples")
    assert "sft: 0/3 steps (0%), elapsed 0.0s, ETA ?" in log
    for step, pct in ((1, 33), (2, 67), (3, 100)):
        line = next(x for x in log.splitlines() if f"sft: {step}/3 steps ({pct}%), elapsed " in x)
        assert ", ETA " in line and "steps/s, loss " in line and ", lr " in line and ", grad_norm " in line
        assert "response tokens/s" in line

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"{a}+1=", "chosen": str(a + 1), "rejected": str(a + 2)}) + "\n"
                             for a in range(8)))
    assert cli.main(["stage=dpo", *COMMON, f"align.model={run}", f"align.train_data={pairs}", "align.steps=2",
                     "align.eval_every=0"]) == 0
    run, _ = _latest(isolated_workspace, "dpo")
    log = (run / "dpo.log").read_text()
    assert log.index("loading align.reference: ") < log.index("reference log-probs (train): 0/8 pairs (0%)")
    assert "reference log-probs (train): 8/8 pairs (100%), elapsed " in log
    line = next(x for x in log.splitlines() if "dpo: 2/2 steps (100%), elapsed " in x)
    assert "ETA 0.0s" in line and "loss " in line and "preference_accuracy " in line and "pairs/s" in line


@pytest.mark.slow
def test_align_errors_are_one_line(base, isolated_workspace, tmp_path, capsys):
    assert cli.main(["stage=grpo", *COMMON, f"align.model={base}"]) == 2
    assert "align.task.name" in capsys.readouterr().err
    assert cli.main(["stage=sft", *COMMON, f"align.model={base}"]) == 2
    assert "align.train_data" in capsys.readouterr().err
    assert cli.main(["stage=sft", *COMMON, "align.model=nowhere.pt", "align.task.name=arithmetic"]) != 0
    err = capsys.readouterr().err
    assert "align.model=nowhere.pt" in err and "Traceback" not in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\nnot json\n')
    assert cli.main(["stage=sft", *COMMON, f"align.model={base}", f"align.train_data={bad}"]) != 0
    err = capsys.readouterr().err
    assert "line 2 is not JSON" in err and "Traceback" not in err
    assert cli.main(["stage=grpo", *COMMON, f"align.model={base}", "align.task.name=arithmetic",
                     "grpo.rollout_batch_size=12", "grpo.group_size=8"]) == 2
    assert "grpo.rollout_batch_size" in capsys.readouterr().err
    assert cli.main(["stage=dpo", *COMMON, f"align.model={base}", "align.task.name=arithmetic", "dpo.beta=0"]) == 2
    assert "dpo.beta" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_hf_policy_sft_then_grpo_and_dpo(arch, isolated_workspace, tmp_path):
    pytest.importorskip("transformers")
    from lmrun.eval.models import load_causal_lm
    from tests.eval.helpers import save_tiny_hf_model

    hf = save_tiny_hf_model(tmp_path / "hf", arch=arch)
    assert cli.main(["stage=sft", *COMMON, f"align.model={hf}", "align.task.name=arithmetic", "align.steps=3",
                     "align.eval_every=0"]) == 0
    sft_run, summary = _latest(isolated_workspace, "sft")
    assert (sft_run / "hf_model" / "config.json").is_file()  # an HF policy stays an HF directory
    lm = load_causal_lm(sft_run)
    assert lm.kind == "hf" and (lm.prefix_ids != []) == (arch == "llama")
    assert cli.main(["stage=grpo", *COMMON, f"align.model={sft_run}", "align.task.name=arithmetic", "align.steps=1",
                     "grpo.rollout_batch_size=8", "grpo.group_size=4"]) == 0
    _, summary = _latest(isolated_workspace, "grpo")
    assert summary["optimizer_steps"] == 1
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"{a}+1=", "chosen": str(a + 1), "rejected": "x"}) + "\n"
                             for a in range(8)))
    assert cli.main(["stage=dpo", *COMMON, f"align.model={sft_run}", f"align.train_data={pairs}", "align.steps=2"]) == 0


def test_verifier_pairs_pair_a_correct_with_an_incorrect_sample():
    from types import SimpleNamespace

    from lmrun.align.loop import Prompter
    from lmrun.align.tasks import TaskExample, arithmetic_task
    from lmrun.inference.engine import Completion
    from lmrun.stages.dpo import verifier_pairs

    scripted = {"1+1=": ["3", "2", "2", "4"], "2+2=": ["4", "4", "4", "4"], "3+3=": ["5", "7", "6", "8"]}

    class ScriptedLM:
        def generate(self, prompts, params):
            seen: dict[str, int] = {}
            out = []
            for p in prompts:
                i = seen.get(p, 0)
                seen[p] = i + 1
                out.append(Completion(prompt_ids=[1], token_ids=[2], text=scripted[p][i]))
            return out

    examples = [TaskExample(q, str(2 * (k + 1)), "") for k, q in enumerate(scripted)]
    d = SimpleNamespace(samples_per_prompt=4, temperature=1.0)
    a = SimpleNamespace(max_new_tokens=3)
    pairs = verifier_pairs(ScriptedLM(), arithmetic_task(), examples, Prompter("{question}", "q"), d, a, seed=0)
    # 2+2 has no incorrect sample: no pair; the others pair their first correct with their first incorrect
    assert pairs == [{"prompt": "1+1=", "chosen": "2", "rejected": "3"},
                     {"prompt": "3+3=", "chosen": "6", "rejected": "5"}]


def test_policies_train_without_dropout(base):
    """A checkpoint pretrained with model.dropout > 0 (experiment=shakespeare_best's) is loaded as a policy
    with every dropout disabled: train-mode log-probs are deterministic."""
    from omegaconf import OmegaConf

    from lmrun.align.loop import load_policy

    policy = load_policy(OmegaConf.create({"align": {"model": str(base), "device": "cpu"}}))
    drops = [m for m in policy.model.modules() if isinstance(m, torch.nn.Dropout)]
    assert drops and all(m.p == 0.0 for m in drops) and policy.model.training
    ids = torch.randint(0, 100, (2, 16))
    assert torch.equal(policy.model(ids), policy.model(ids))
