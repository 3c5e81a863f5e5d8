"""Config schema of the `evaluate` node (``stage=evaluate``) and its validation (no torch import)."""
from __future__ import annotations

from dataclasses import dataclass

from lmrun.errors import check, check_choice

TASKS = ["perplexity", "gsm8k", "mmlu", "alpaca_eval", "safety"]
# what evaluate.data_path holds for each task evaluation (named in the error when it is missing)
DATA_HINTS = {
    "gsm8k": "the GSM8K JSONL file (question/answer per line), e.g. ../shared/data/alignment/gsm8k/test.jsonl",
    "mmlu": "an MMLU CSV file or a folder of <subject>_test.csv files, e.g. ../shared/data/alignment/mmlu/test",
    "alpaca_eval": "the AlpacaEval JSONL/JSON file (instruction/output), "
                   "e.g. ../shared/data/alignment/alpaca_eval/alpaca_eval.jsonl",
    "safety": "the SimpleSafetyTests CSV file, e.g. ../shared/data/alignment/simple_safety_tests/simple_safety_tests.csv",
}


@dataclass
class EvaluateConfig:
    """checkpoint: a checkpoint file, or a run directory (its latest checkpoint); for the task
        evaluations also a local Hugging Face model directory (``config.json``; ``lmrun[hf]``).
    task: perplexity (default: loss, perplexity and bits per byte on the ``data`` preset),
        gsm8k, mmlu, alpaca_eval or safety (task evaluations, data from ``data_path``).
    split: which split of the data preset to score (perplexity: val, train or both).
    max_tokens: score only the first N tokens of each split (perplexity; null: all).
    stride: perplexity with overlapping windows, each scoring its last ``stride`` predictions
        (sliding-window evaluation; null: non-overlapping windows of the model's context).
    batch_size: sequences per forward pass / prompts decoded together. device: auto, cpu or cuda.
    int8: perplexity of the model with weight-only int8 linear layers (lmrun.inference.quantize),
        to measure what quantization costs.
    data_path: the task's data file or folder (required for the task evaluations).
    limit: evaluate only the first N examples (MMLU: of each subject; null: all).
    prompt_template: a template name of ``lmrun/align/prompts`` (alpaca, r1_zero, question_only)
        or a file path; null: the task's default (gsm8k r1_zero, mmlu question_only,
        alpaca_eval and safety alpaca).
    max_new_tokens, temperature (0 = greedy), top_p: sampling of the responses; stop: stop
        strings (null: ``</answer>`` with r1_zero, ``### Instruction:`` with alpaca, none else).
    mmlu_method: generate (parse the response's letter), loglik (the most likely of " A".." D"
        after the prompt) or both.
    judge: a judge model (checkpoint, run directory or HF directory) -> AlpacaEval win rate.
    reference_outputs: JSON/JSONL (instruction, output) the outputs are compared with (null: the
        ``output`` field of the AlpacaEval file). generator: the ``generator`` name written to
        the AlpacaEval outputs (null: the checkpoint's name)."""

    checkpoint: str | None = None
    task: str = "perplexity"
    split: str = "val"
    max_tokens: int | None = None
    stride: int | None = None
    batch_size: int = 16
    device: str = "auto"
    int8: bool = False
    data_path: str | None = None
    limit: int | None = None
    prompt_template: str | None = None
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] | None = None
    mmlu_method: str = "both"
    judge: str | None = None
    reference_outputs: str | None = None
    generator: str | None = None


def validate_evaluate(cfg: EvaluateConfig, stage: str) -> None:
    """Raise ConfigError naming the key for an impossible ``evaluate`` config."""
    check_choice("evaluate.task", cfg.task, TASKS)
    if stage == "evaluate":
        check("evaluate.checkpoint", cfg.checkpoint, bool(cfg.checkpoint),
              "a checkpoint file or a pretrain run directory (required with stage=evaluate)")
        if cfg.task != "perplexity":
            check("evaluate.data_path", cfg.data_path, bool(cfg.data_path),
                  f"{DATA_HINTS[cfg.task]} (required with evaluate.task={cfg.task})")
    check("evaluate.data_path", cfg.data_path, cfg.task != "perplexity" or not cfg.data_path,
          "null with evaluate.task=perplexity (it scores the data preset: data=text_files data.train=PATH)")
    check_choice("evaluate.split", cfg.split, ["val", "train", "both"])
    check("evaluate.batch_size", cfg.batch_size, cfg.batch_size >= 1, "an integer >= 1")
    check_choice("evaluate.device", cfg.device, ["auto", "cpu", "cuda"])
    if cfg.max_tokens is not None:
        check("evaluate.max_tokens", cfg.max_tokens, cfg.max_tokens >= 2, "null or an integer >= 2")
    if cfg.stride is not None:
        check("evaluate.stride", cfg.stride, cfg.stride >= 1, "null or an integer >= 1")
    if cfg.limit is not None:
        check("evaluate.limit", cfg.limit, cfg.limit >= 1, "null or an integer >= 1")
    check("evaluate.max_new_tokens", cfg.max_new_tokens, cfg.max_new_tokens >= 1, "an integer >= 1")
    check("evaluate.temperature", cfg.temperature, cfg.temperature >= 0, "a number >= 0 (0 = greedy)")
    check("evaluate.top_p", cfg.top_p, 0 < cfg.top_p <= 1, "a number in (0, 1]")
    check_choice("evaluate.mmlu_method", cfg.mmlu_method, ["generate", "loglik", "both"])
    for key in ("judge", "reference_outputs"):
        check(f"evaluate.{key}", getattr(cfg, key), not getattr(cfg, key) or cfg.task == "alpaca_eval",
              "null unless evaluate.task=alpaca_eval")
