"""Config schema of the `train` node (the pretraining loop's settings; see lmrun/train/trainer.py)."""
from __future__ import annotations

from dataclasses import dataclass

from lmrun.errors import check, check_choice


#: seconds of training in the main job's default budget (``train.max_time``): with start-up,
#: tokenizer, encoding, evaluation and samples the whole run takes under 5 minutes on a 2-core CPU
DEFAULT_MAX_TIME = 240


@dataclass
class TrainConfig:
    """Settings of ``stage=pretrain``'s training loop.

    batch_size: sequences per optimizer step (tokens per step = batch_size × model.context_length).
    grad_accum_steps: micro-batches per step (each of batch_size / grad_accum_steps sequences).
    max_steps / max_tokens / max_time / max_flops: the budget — exactly one is set; the
        learning-rate schedule is defined against it (max_time in seconds of training wall time;
        max_flops in training FLOPs, 3 x the exact forward FLOPs per token of lmrun.model.flops,
        which fixes the token count: an IsoFLOP run).
    device: auto (CUDA if available, else CPU), cpu or cuda. precision: auto (bf16 autocast on
        CUDA, fp32 on CPU), fp32 or bf16. compile: torch.compile the model.
    grad_clip: global L2 norm clip (0 disables). z_loss: weight of the logit z-loss.
    log_every / eval_every: steps between log lines / validation evaluations; eval_tokens:
        validation tokens per periodic evaluation (null = all; the final one is always full);
        eval_stride: tokens between the starts of overlapping validation windows, each scoring
        only its last eval_stride predictions (lmrun.train.evaluation.evaluate_loss; null:
        non-overlapping windows of model.context_length, the standard chunked loss).
    checkpoint_every: steps between checkpoints (0: only at the end); keep_last: how many to keep.
    resume: auto (continue from the run directory's latest checkpoint, if any) or never.
    on_nan: stop (keep the last good checkpoint, fail with the step) or skip_step.
    activation_checkpointing: recompute each block's activations in the backward pass.
    deterministic: torch deterministic algorithms (slower).
    samples / sample_tokens / temperature / top_p: text samples written at the end.
    peak_flops: the device's peak FLOP/s for MFU (null: known GPUs only; set it for CPU).
    noise_scale: log the gradient noise scale estimate (McCandlish et al. 2018).
    fused_loss: compute the LM head and the loss together, chunk by chunk, without the full logits
        (lmrun.train.loss.linear_cross_entropy); single-process runs without logit soft-capping.
    ema_decay: keep an exponential moving average of the weights (lmrun.train.ema.ParameterEMA,
        decay warmed up as min(d, (1+n)/(10+n))); validation, samples and the checkpoint's
        ``ema`` entry (which stage=evaluate / generate load) use it; null: off. Single process.
    keep_heap_memory: on CPU with glibc, keep freed memory for reuse instead of paying page faults
        for every step's activations (lmrun.train.trainer.keep_heap_memory).
    overfit_batches: 0 (off) or N: train on the stream's first N micro-batches over and over
        (``debug=overfit``: a model that cannot drive the loss of one batch towards zero has a bug;
        Karpathy's "overfit one batch", Lightning's ``overfit_batches``).
    profile: record 5 steps (3-7: one skipped, one warm-up) with ``torch.profiler`` (CPU, and CUDA when used) into the run
        directory: ``profile/trace.json`` (chrome://tracing, Perfetto) and ``profile/ops.txt`` (the
        operators by total time) — ``debug=profile``.
    """

    batch_size: int = 16
    grad_accum_steps: int = 1
    max_steps: int | None = None
    max_tokens: int | None = None
    # the default budget: DEFAULT_MAX_TIME seconds of training unless max_steps, max_tokens or max_flops is set
    max_time: float | None = f"${{lmrun.time_budget:${{train.max_steps}},${{train.max_tokens}},${{train.max_flops}},{DEFAULT_MAX_TIME}}}"  # type: ignore[assignment]
    max_flops: float | None = None
    device: str = "auto"
    precision: str = "auto"
    compile: bool = False
    grad_clip: float = 1.0
    z_loss: float = 0.0
    log_every: int = 25
    eval_every: int = 250
    eval_tokens: int | None = None
    eval_stride: int | None = None
    checkpoint_every: int = 1000
    keep_last: int = 2
    resume: str = "auto"
    on_nan: str = "stop"
    activation_checkpointing: bool = False
    deterministic: bool = False
    samples: int = 3
    sample_tokens: int = 128
    temperature: float = 0.8
    top_p: float = 0.95
    peak_flops: float | None = None
    noise_scale: bool = False
    fused_loss: bool = True
    keep_heap_memory: bool = True
    ema_decay: float | None = None
    overfit_batches: int = 0
    profile: bool = False


def validate_train(cfg: TrainConfig) -> None:
    """Raise ConfigError for values and combinations the types cannot exclude."""
    budgets = {k: getattr(cfg, k) for k in ("max_steps", "max_tokens", "max_time", "max_flops")
               if getattr(cfg, k) is not None}
    check("train.max_steps/max_tokens/max_time/max_flops", budgets or None, len(budgets) == 1,
          "exactly one budget (set the others to null)")
    for key, value in budgets.items():
        check(f"train.{key}", value, value > 0, "a positive number")
    check("train.batch_size", cfg.batch_size, cfg.batch_size >= 1, "an integer >= 1")
    check("train.grad_accum_steps", cfg.grad_accum_steps,
          cfg.grad_accum_steps >= 1 and cfg.batch_size % cfg.grad_accum_steps == 0,
          f"a divisor of train.batch_size={cfg.batch_size}")
    check_choice("train.device", cfg.device, ["auto", "cpu", "cuda"])
    check_choice("train.precision", cfg.precision, ["auto", "fp32", "bf16"])
    check_choice("train.resume", cfg.resume, ["auto", "never"])
    check_choice("train.on_nan", cfg.on_nan, ["stop", "skip_step"])
    check("train.grad_clip", cfg.grad_clip, cfg.grad_clip >= 0, "a number >= 0 (0 disables clipping)")
    check("train.z_loss", cfg.z_loss, cfg.z_loss >= 0, "a number >= 0")
    for key in ("log_every", "eval_every"):
        check(f"train.{key}", getattr(cfg, key), getattr(cfg, key) >= 1, "an integer >= 1")
    if cfg.eval_stride is not None:
        check("train.eval_stride", cfg.eval_stride, cfg.eval_stride >= 1, "null or an integer >= 1")
    check("train.checkpoint_every", cfg.checkpoint_every, cfg.checkpoint_every >= 0, "an integer >= 0")
    check("train.keep_last", cfg.keep_last, cfg.keep_last >= 1, "an integer >= 1")
    check("train.temperature", cfg.temperature, cfg.temperature >= 0, "a number >= 0 (0 = greedy)")
    check("train.top_p", cfg.top_p, 0 < cfg.top_p <= 1, "a number in (0, 1]")
    check("train.noise_scale", cfg.noise_scale, not cfg.noise_scale or cfg.grad_accum_steps >= 2,
          "false unless train.grad_accum_steps >= 2 (the estimate compares micro-batch and full-batch gradients)")
    if cfg.ema_decay is not None:
        check("train.ema_decay", cfg.ema_decay, 0 <= cfg.ema_decay < 1, "null or a number in [0, 1)")
    check("train.overfit_batches", cfg.overfit_batches, cfg.overfit_batches >= 0, "an integer >= 0 (0: off)")
    if cfg.peak_flops is not None:
        check("train.peak_flops", cfg.peak_flops, cfg.peak_flops > 0, "null or FLOP/s > 0")
