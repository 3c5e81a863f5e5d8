"""What the alignment stages share: loading the policy and task, prompts, the optimizer step
(gradient accumulation is the caller's; clipping, lr schedule, a non-finite guard here),
sampling in chunks, held-out task evaluation, the curves figure, and ``StepProgress`` (the
per-step log line with step/total, elapsed, ETA and the rate)."""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from lmrun.align.prompts import format_prompt, load_prompt, template_fields
from lmrun.align.tasks import Task, TaskExample, build_task
from lmrun.errors import LmrunError

GENERATION_CHUNK = 256  # prompts per InferenceEngine call (bounds the KV cache's memory)


class NonFiniteLossError(LmrunError):
    """A loss or gradient norm became NaN/inf; the step was not applied."""


@dataclass
class Prompter:
    """Fills a prompt template with a question (every field of the template gets it)."""

    template: str
    name: str

    @classmethod
    def from_config(cls, name_or_path: str) -> "Prompter":
        return cls(load_prompt(name_or_path), Path(name_or_path).stem)

    def __call__(self, question: str) -> str:
        return format_prompt(self.template, **{f: question for f in template_fields(self.template)})


def load_policy(cfg, key: str = "align.model", path: str | None = None):
    """The ``CausalLM`` at ``path`` (default ``cfg.align.model``) on the configured device, in
    train mode with every dropout module disabled (p = 0; a pretrained checkpoint may carry
    ``model.dropout``): policy log-probs must be a deterministic function of the weights for the
    ratios of GRPO and the margins of DPO to mean anything (TRL's ``disable_dropout`` default)."""
    from lmrun.eval.models import load_causal_lm
    from lmrun.train.trainer import resolve_device

    lm = load_causal_lm(path or cfg.align.model, resolve_device(cfg.align.device), key=key)
    lm.model.train()
    for module in lm.model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return lm


def load_task(cfg) -> Task | None:
    return build_task(cfg.align.task, Path(cfg.align.prompt_template).stem) if cfg.align.task.name else None


class OptimizerStep:
    """The optimizer and lr schedule of the ``optimizer``/``schedule`` groups over
    ``total_steps`` optimizer steps. ``__call__(step)`` clips gradients to ``max_grad_norm``
    (0: no clipping), sets the scheduled lr, steps and zeroes the gradients; returns ``{lr,
    grad_norm}``. NonFiniteLossError (nothing applied) when the gradient norm is not finite."""

    def __init__(self, cfg, model: torch.nn.Module, total_steps: int):
        from lmrun.optim import build_optimizer, build_schedule

        self.model = model
        self.optimizer = build_optimizer(model, cfg.optimizer)
        self.schedule = build_schedule(cfg.schedule, float(cfg.optimizer.lr), max(1, total_steps))
        self.max_grad_norm = float(cfg.align.max_grad_norm)

    def __call__(self, step: int) -> dict:
        from lmrun.optim import clip_grad_norm, set_lr

        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = float(clip_grad_norm(params, self.max_grad_norm if self.max_grad_norm > 0 else math.inf))
        if not math.isfinite(norm):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(f"step {step}: the gradient norm is {norm}; the update was skipped and training "
                                     "stopped (lower optimizer.lr, or check the data)")
        lr = self.schedule(step)
        set_lr(self.optimizer, lr)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"lr": lr, "grad_norm": norm}


def check_finite(value: float, what: str, step: int) -> None:
    if not math.isfinite(value):
        raise NonFiniteLossError(f"step {step}: {what} is {value}; training stopped before the update (lower "
                                 "optimizer.lr, or check the data)")


def sample(lm, prompts: list[str], *, max_new_tokens: int, temperature: float, top_p: float = 1.0,
           seed: int | None = 0, desc: str = "sampling", quiet: bool = True, bar: bool = False) -> list:
    """``lm.generate`` in chunks of ``GENERATION_CHUNK`` prompts (model mode restored), with
    progress lines ``desc: done/total prompts, elapsed, ETA, …, tokens/s`` every ``LOG_EVERY_S``
    seconds (``lmrun.eval.scoring.generate_batches``; quiet: no first line, and a last one only
    after a long run; bar: a bar on a terminal)."""
    from lmrun.eval.scoring import generate_batches
    from lmrun.inference.engine import SamplingParams

    def params_at(i: int):
        return SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                              seed=None if seed is None else seed + i)

    return generate_batches(lm, prompts, params_at, GENERATION_CHUNK, desc=desc, bar=bar, quiet=quiet)


def evaluate_task(lm, task: Task, examples: list[TaskExample], prompter: Prompter, max_new_tokens: int,
                  quiet: bool = True) -> dict:
    """Greedy responses to ``examples`` scored by the task's reward. Returns ``{accuracy,
    format_rate, response_tokens (mean), records}``; records hold question, response, answer
    and rewards per example. Progress lines ``held-out eval: …`` while it runs longer than
    ``LOG_EVERY_S`` seconds (every time with ``quiet=False``)."""
    completions = sample(lm, [prompter(e.question) for e in examples], max_new_tokens=max_new_tokens,
                         temperature=0.0, desc="held-out eval", quiet=quiet)
    records, correct, formatted, length = [], 0.0, 0.0, 0
    for e, c in zip(examples, completions):
        r = task.reward(c.text, e.answer)
        correct += r["reward"]
        formatted += r["format_reward"]
        length += len(c.token_ids)
        records.append({"question": e.question, "response": c.text, "answer": e.answer, **r})
    n = max(1, len(examples))
    return {"accuracy": correct / n, "format_rate": formatted / n, "response_tokens": length / n, "records": records}


def autocast(device: torch.device):
    """bf16 autocast on CUDA, nothing elsewhere."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def save_policy(lm, run_dir: Path, step: int, stage: str, **extra) -> Path:
    """Write ``checkpoints/ckpt_<step>.pt`` in the run directory (readable by ``align.model``,
    ``evaluate.checkpoint`` and ``generate.checkpoint``); a Hugging Face policy is saved as a
    model directory ``hf_model/`` (``align.model=<run dir>`` finds it). The checkpoint carries
    its tokenizer files (``lmrun.train.loading.tokenizer_facts``; read in from the cache when
    the policy came from an older checkpoint that held paths) and the run directory gets a copy
    in ``tokenizer/``: the run directory works on another machine without the cache."""
    from lmrun.eval.models import HF_RUN_SUBDIR

    if lm.kind == "hf":
        return lm.save(run_dir / HF_RUN_SUBDIR, iteration=step, align={"stage": stage, **extra})
    tokenizer = {}
    if "tokenizer" in lm.facts:
        from lmrun.train.loading import portable_tokenizer_facts, write_run_tokenizer

        tokenizer = {"tokenizer": portable_tokenizer_facts(lm.facts["tokenizer"], lm.source)}
        lm.facts["tokenizer"] = tokenizer["tokenizer"]  # read the old files once, not at every save
        write_run_tokenizer(tokenizer["tokenizer"], run_dir)
    path = run_dir / "checkpoints" / f"ckpt_{step:08d}.pt"
    return lm.save(path, iteration=step, align={"stage": stage, **extra}, **tokenizer)


def plot_curves(history: dict[str, list[tuple[int, float]]], out: Path, title: str) -> None:
    """One panel per metric (``name -> [(step, value), ...]``), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lmrun.tracking.files import save_figure

    names = [k for k, v in history.items() if v]
    if not names:
        return
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), dpi=110, squeeze=False)
    for ax, name in zip(axes.flat, names):
        xs, ys = zip(*history[name])
        ax.plot(xs, ys, "o-" if len(xs) < 30 else "-", ms=3)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, out)


class History:
    """Metric series for the curves figure and the log: ``add(step, metrics)``."""

    def __init__(self, keys: tuple[str, ...]):
        self.keys = keys
        self.series: dict[str, list[tuple[int, float]]] = {k: [] for k in keys}

    def add(self, step: int, metrics: dict) -> None:
        for k in self.keys:
            v = metrics.get(k)
            if isinstance(v, (int, float)) and math.isfinite(v):
                self.series[k].append((step, float(v)))


class StepProgress:
    """Progress of an alignment training loop: a bar on a terminal (``bar``) and the per-step log
    line ``desc: step/total steps (pct), elapsed, ETA, steps/s, <metric> <value>, …, tokens/s``
    every ``log_every`` steps, at the last step, and at least every ``LOG_EVERY_S`` seconds.

    ``step(step, metrics, count)`` after each step (``keys``: the metrics shown, in order;
    ``count``: the units of work the step did — tokens, pairs — for the ``rate_unit`` rate); ``tick()`` inside a long step (a line if
    ``LOG_EVERY_S`` seconds passed without one); ``close()`` at the end."""

    def __init__(self, total: int, desc: str, log_every: int, keys: tuple[str, ...], bar: bool = False,
                 unit: str = "step", rate_unit: str = "tokens/s"):
        from lmrun.tracking.progress import Progress

        self.p = Progress(total, desc, unit=unit, bar=bar, log_start=True)
        self.log_every, self.keys, self.rate_unit = max(1, int(log_every)), keys, rate_unit
        self.count = 0

    def step(self, step: int, metrics: dict, count: int = 0) -> None:
        self.count += int(count)
        fields = {k: metrics[k] for k in self.keys if isinstance(metrics.get(k), (int, float))}
        if self.count:
            fields[self.rate_unit] = self.count / max(self.p.elapsed, 1e-9)
        due = step % self.log_every == 0 or (self.p.total is not None and self.p.done + 1 >= self.p.total)
        self.p.update(1, force=due, **fields)

    def tick(self) -> None:
        self.p.update(0)

    def close(self) -> None:
        self.p.close(log_final=False)  # the last step logged its line


def sft_update(lm, opt: OptimizerStep, seqs, index: list[int], microbatch_size: int, step: int,
               normalize_constant: float | None = None, tick: Callable[[], None] | None = None) -> dict:
    """One SFT optimizer step over the rows ``index`` of ``seqs`` (``SFTSequences``), in
    microbatches of ``microbatch_size`` (gradient accumulation). normalize_constant: None = mean
    NLL per response token over each microbatch; else ``sft_microbatch_train_step``'s constant.
    tick: called after each microbatch (``StepProgress.tick``).
    Returns ``{loss (mean NLL per response token, nats), lr, grad_norm, response_tokens}``."""
    from lmrun.align.losses import get_response_log_probs, sft_microbatch_train_step

    pad = lm.pad_id
    chunks = [index[i:i + microbatch_size] for i in range(0, len(index), microbatch_size)]
    total_nll, tokens = 0.0, 0
    for chunk in chunks:
        b = {k: v.to(lm.device) for k, v in seqs.batch(chunk, pad).items()}
        n_tok = int(b["response_mask"].sum())
        with autocast(lm.device):
            lp = get_response_log_probs(lm.model, b["input_ids"], b["labels"])["log_probs"]
        const = normalize_constant if normalize_constant is not None else max(1, n_tok) / len(chunk)
        _, meta = sft_microbatch_train_step(lp, b["response_mask"], len(chunks), const)
        nll = float(meta["nll_per_token"])
        check_finite(nll, "the SFT loss", step)
        total_nll += nll * n_tok
        tokens += n_tok
        if tick is not None:
            tick()
    return {"loss": total_nll / max(1, tokens), **opt(step), "response_tokens": tokens}


@torch.no_grad()
def sft_eval_loss(lm, seqs, batch_size: int) -> float:
    """Mean NLL per response token (nats) of ``seqs`` under ``lm`` (eval mode, restored)."""
    from lmrun.align.losses import get_response_log_probs

    from lmrun.tracking.progress import Progress

    was = lm.model.training
    lm.model.eval()
    pad = lm.pad_id
    total, tokens = 0.0, 0
    p = Progress(len(seqs), "validation loss", unit="sequence", bar=False)
    try:
        for i in range(0, len(seqs), batch_size):
            b = {k: v.to(lm.device) for k, v in seqs.batch(list(range(i, min(len(seqs), i + batch_size))), pad).items()}
            with autocast(lm.device):
                lp = get_response_log_probs(lm.model, b["input_ids"], b["labels"])["log_probs"]
            total += float(-(lp * b["response_mask"]).sum())
            tokens += int(b["response_mask"].sum())
            p.update(len(b["input_ids"]))
    finally:
        lm.model.train(was)
        p.close(log_final=p.logged)  # a last line only after a long evaluation
    return total / max(1, tokens)
