"""Config schema of alignment: the shared ``align`` node and the per-method ``sft``, ``dpo``,
``grpo`` and ``expert_iteration`` nodes (``stage=sft|dpo|grpo|expert_iteration``). The optimizer
and learning-rate schedule come from the ``optimizer`` and ``schedule`` groups, as in pretrain."""
from __future__ import annotations

from dataclasses import dataclass, field

from lmrun.errors import check, check_choice

ALIGN_STAGES = ("sft", "dpo", "grpo", "expert_iteration")


@dataclass
class TaskConfig:
    """A verifiable task (lmrun/align/tasks.py). name: null | arithmetic | countdown | gsm8k.
    arithmetic: digits (per operand, at most), operands, operations (from '+-*'),
    carry_error_rate (noisy train solutions: a careless teacher drops carries this often).
    countdown: count (numbers per puzzle), max_number. gsm8k: train_path, test_path (JSONL)."""

    name: str | None = None
    digits: int = 2
    operands: int = 2
    operations: str = "+"
    carry_error_rate: float = 0.0
    count: int = 3
    max_number: int = 20
    train_path: str | None = None
    test_path: str | None = None


@dataclass
class AlignConfig:
    """Shared by the alignment stages.

    model: the policy to start from: an lmrun checkpoint file or run directory (pretrain, sft,
    …), or a Hugging Face model directory (``pip install lmrun[hf]``). reference: DPO's frozen
    reference model (null: ``model``). prompt_template: alpaca | r1_zero | question_only or a
    template file. task: the verifiable task (rewards, held-out accuracy, SFT/DPO data when no
    file is given). train_data / val_data: JSONL files (sft: prompt/response; dpo:
    prompt/chosen/rejected). steps: optimizer steps. batch_size: sequences per optimizer step
    (GRPO: rollouts per optimizer step). microbatch_size: sequences per forward/backward
    (gradient accumulation = batch_size / microbatch_size). max_grad_norm: clip (0: off).
    eval_every: evaluate every N steps (0: only at the start and end). eval_examples: held-out
    task questions (or validation records) scored. max_new_tokens: response length limit for
    sampling. train_examples: task examples drawn for training. device: auto | cpu | cuda.
    log_every: steps between metric lines."""

    model: str | None = None
    reference: str | None = None
    prompt_template: str = "question_only"
    task: TaskConfig = field(default_factory=TaskConfig)
    train_data: str | None = None
    val_data: str | None = None
    steps: int = 100
    batch_size: int = 32
    microbatch_size: int = 32
    max_grad_norm: float = 1.0
    eval_every: int = 50
    eval_examples: int = 200
    max_new_tokens: int = 16
    train_examples: int = 5000
    device: str = "auto"
    log_every: int = 10


@dataclass
class SFTConfig:
    """packing: join the examples (each ending with EOS) into one stream cut into windows of
    ``context_length`` input ids whose labels are the next ``context_length`` ids (consecutive
    windows overlap by one token; CS336 assignment 5's packed SFT dataset). shuffle: with
    packing, shuffle the examples before joining them (seeded by ``seed``; ignored without
    packing, whose batches are drawn in random order anyway). normalize_constant: the SFT loss
    divides each sequence's summed NLL by this (null: by its number of response tokens, i.e.
    the mean NLL per token)."""

    packing: bool = False
    shuffle: bool = False
    normalize_constant: float | None = None


@dataclass
class DPOConfig:
    """beta: DPO's KL strength. With a task and no train_data, preference pairs are built by
    sampling ``samples_per_prompt`` responses from the reference at ``temperature`` for
    ``pair_prompts`` train questions and pairing a verified-correct with an incorrect one
    (held-out pairs likewise from test questions)."""

    beta: float = 0.1
    samples_per_prompt: int = 8
    pair_prompts: int = 512
    temperature: float = 1.0


@dataclass
class GRPOConfig:
    """group_size: responses per question. rollout_batch_size: responses per rollout batch
    (rollout_batch_size / group_size questions). epochs_per_rollout_batch: passes over each
    rollout batch (1: on-policy; > 1: off-policy, where grpo_clip's clipping matters).
    loss_type: no_baseline | reinforce_with_baseline | grpo_clip. cliprange: epsilon.
    normalize_by_std: divide advantages by the group's std (false: Dr. GRPO). advantage_eps:
    added to the std. length_normalization: masked_mean (per response length) |
    masked_normalize (by max_new_tokens, Dr. GRPO). temperature / top_p: rollout sampling."""

    group_size: int = 8
    rollout_batch_size: int = 64
    epochs_per_rollout_batch: int = 1
    loss_type: str = "reinforce_with_baseline"
    cliprange: float = 0.2
    normalize_by_std: bool = True
    advantage_eps: float = 1.0e-6
    length_normalization: str = "masked_mean"
    temperature: float = 1.0
    top_p: float = 1.0


@dataclass
class ExpertIterationConfig:
    """iterations: expert-iteration rounds. questions: train questions sampled per round.
    samples_per_question: responses drawn per question (temperature). sft_epochs: SFT passes
    over each round's verified-correct responses (align.batch_size per step)."""

    iterations: int = 3
    questions: int = 256
    samples_per_question: int = 4
    temperature: float = 1.0
    sft_epochs: int = 1


def validate_align(cfg, stage: str) -> None:
    a = cfg.align
    check_choice("align.device", a.device, ["auto", "cpu", "cuda"])
    for key in ("steps", "batch_size", "microbatch_size", "eval_examples", "max_new_tokens", "train_examples",
                "log_every"):
        check(f"align.{key}", a[key], a[key] >= 1, "an integer >= 1")
    check("align.eval_every", a.eval_every, a.eval_every >= 0, "an integer >= 0 (0: start and end only)")
    check("align.max_grad_norm", a.max_grad_norm, a.max_grad_norm >= 0, ">= 0 (0: no clipping)")
    check("align.microbatch_size", a.microbatch_size, a.batch_size % a.microbatch_size == 0,
          f"a divisor of align.batch_size={a.batch_size}")
    t = a.task
    if t.name is not None:
        check_choice("align.task.name", t.name, ["arithmetic", "countdown", "gsm8k"])
        check("align.task.digits", t.digits, 1 <= t.digits <= 18, "an integer in 1..18")
        check("align.task.operands", t.operands, t.operands >= 2, "an integer >= 2")
        check("align.task.operations", t.operations, bool(t.operations) and not set(t.operations) - set("+-*"),
              "a non-empty string of + - *")
        check("align.task.carry_error_rate", t.carry_error_rate,
              0 <= t.carry_error_rate <= 1 and (t.carry_error_rate == 0 or t.operations == "+"),
              "in [0, 1], and only with align.task.operations='+'")
        check("align.task.count", t.count, t.count >= 2, "an integer >= 2")
        check("align.task.max_number", t.max_number, t.max_number >= 2, "an integer >= 2")
    if stage not in ALIGN_STAGES:
        return
    check("align.model", a.model, bool(a.model), f"a checkpoint or model directory (required with stage={stage})")
    if stage in ("grpo", "expert_iteration"):
        check("align.task.name", t.name, t.name is not None, f"a verifiable task (required with stage={stage})")
    if stage in ("sft", "dpo"):
        check("align.train_data", a.train_data, bool(a.train_data) or t.name is not None,
              f"a JSONL file, or set align.task.name to generate the data (stage={stage})")
    s = cfg.sft
    if s.normalize_constant is not None:
        check("sft.normalize_constant", s.normalize_constant, s.normalize_constant > 0, "null or > 0")
    d = cfg.dpo
    check("dpo.beta", d.beta, d.beta > 0, "> 0")
    check("dpo.samples_per_prompt", d.samples_per_prompt, d.samples_per_prompt >= 2, "an integer >= 2")
    check("dpo.pair_prompts", d.pair_prompts, d.pair_prompts >= 1, "an integer >= 1")
    check("dpo.temperature", d.temperature, d.temperature > 0, "> 0")
    g = cfg.grpo
    check("grpo.group_size", g.group_size, g.group_size >= 2, "an integer >= 2")
    check("grpo.rollout_batch_size", g.rollout_batch_size, g.rollout_batch_size % g.group_size == 0,
          f"a multiple of grpo.group_size={g.group_size}")
    check("grpo.rollout_batch_size", g.rollout_batch_size, g.rollout_batch_size % a.batch_size == 0 or stage != "grpo",
          f"a multiple of align.batch_size={a.batch_size} (rollouts are split into optimizer steps)")
    check("grpo.epochs_per_rollout_batch", g.epochs_per_rollout_batch, g.epochs_per_rollout_batch >= 1,
          "an integer >= 1")
    check_choice("grpo.loss_type", g.loss_type, ["no_baseline", "reinforce_with_baseline", "grpo_clip"])
    check("grpo.cliprange", g.cliprange, 0 < g.cliprange < 1, "in (0, 1)")
    check("grpo.advantage_eps", g.advantage_eps, g.advantage_eps >= 0, ">= 0")
    check_choice("grpo.length_normalization", g.length_normalization, ["masked_mean", "masked_normalize"])
    check("grpo.temperature", g.temperature, g.temperature > 0, "> 0 (rollouts must be sampled)")
    check("grpo.top_p", g.top_p, 0 < g.top_p <= 1, "in (0, 1]")
    e = cfg.expert_iteration
    for key in ("iterations", "questions", "samples_per_question", "sft_epochs"):
        check(f"expert_iteration.{key}", e[key], e[key] >= 1, "an integer >= 1")
    check("expert_iteration.temperature", e.temperature, e.temperature > 0, "> 0")
