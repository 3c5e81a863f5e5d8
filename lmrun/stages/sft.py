"""Stage ``sft``: supervised fine-tuning on prompt/response pairs, loss on response tokens only.

``lmrun stage=sft align.model=runs/pretrain/<run> align.train_data=train.jsonl
[align.val_data=val.jsonl]`` (JSONL records ``{"prompt": ..., "response": ...}``; the prompt is
put into ``align.prompt_template``), or ``align.task.name=arithmetic`` to fine-tune on a
verifiable task's solutions (and report held-out task accuracy while training).
``sft.packing=true`` packs the examples into one stream cut into context-length windows
(CS336's packed SFT dataset; ``sft.shuffle=true`` shuffles the examples first, seeded by
``seed``). Every response gets the end-of-text token appended, so the model learns to stop.

Writes ``checkpoints/ckpt_<step>.pt`` (an lmrun checkpoint: ``align.model`` of the next stage),
``metrics.jsonl``, ``eval_samples.jsonl`` (final held-out responses, with a task),
``curves.png`` and ``summary.json``.
"""
from __future__ import annotations

import logging
import time

from lmrun.tracking.files import atomic_write_text, json_dumps
from lmrun.tracking.run import active_run

log = logging.getLogger(__name__)


def _examples(cfg, prompter, task, split: str):
    """(prompts, responses) from the JSONL file of ``split`` or the task; None when neither."""
    from lmrun.align.data import read_jsonl

    a = cfg.align
    path = a.train_data if split == "train" else a.val_data
    if path:
        rows = read_jsonl(path, ("prompt", "response"), f"align.{split}_data")
        return [prompter(r["prompt"]) for r in rows], [r["response"] for r in rows]
    if task is None:
        return None
    n = int(a.train_examples) if split == "train" else int(a.eval_examples)
    ex = task.examples("train" if split == "train" else "test", n, int(cfg.seed))
    return [prompter(e.question) for e in ex], [e.solution for e in ex]


def plan(cfg) -> dict:
    """The dry-run plan, after checking every input (``lmrun.align.checks``): the model opens as a
    checkpoint, the JSONL files are valid in full. DataError/FormatError/ConfigError otherwise."""
    from lmrun.align.checks import SFT_KEYS, check_align_inputs

    a = cfg.align
    checked = check_align_inputs(cfg, "sft", SFT_KEYS)
    return {"stage": "sft", "model": checked["model"], "records": checked["records"],
            "data": a.train_data or f"task {a.task.name} ({a.train_examples} generated train examples)",
            "val": a.val_data or (f"task {a.task.name} test split" if a.task.name else None),
            "template": a.prompt_template, "steps": a.steps, "batch_size": a.batch_size,
            "gradient_accumulation": a.batch_size // a.microbatch_size, "packing": cfg.sft.packing,
            "shuffle": bool(cfg.sft.shuffle and cfg.sft.packing),
            "inputs": [a.model] + [x for x in (a.train_data, a.val_data) if x],
            "outputs": ["checkpoints/", "metrics.jsonl", "curves.png", "summary.json"]}


def run(cfg) -> dict:
    from lmrun.align.data import build_sft_sequences, iterate_batches
    from lmrun.align.loop import (History, OptimizerStep, Prompter, StepProgress, evaluate_task, load_policy,
                                  load_task, plot_curves, save_policy, sft_eval_loss, sft_update)
    from lmrun.tracking.run import seed_everything

    run = active_run()
    a = cfg.align
    seed_everything(int(cfg.seed))
    lm = load_policy(cfg)
    task = load_task(cfg)
    prompter = Prompter.from_config(a.prompt_template)
    prompts, responses = _examples(cfg, prompter, task, "train")
    log.info("SFT: tokenizing %d training examples", len(prompts))
    seqs, truncated = build_sft_sequences(prompts, responses, lm.tokenizer, lm.eos_token_id, lm.context_length,
                                          packing=bool(cfg.sft.packing), prefix_ids=lm.prefix_ids,
                                          shuffle=bool(cfg.sft.shuffle), seed=int(cfg.seed))
    if truncated:
        log.warning("%d of %d training examples were longer than the context (%d tokens) and were cut", truncated,
                    len(prompts), lm.context_length)
    val = _examples(cfg, prompter, task, "val")
    val_seqs = (build_sft_sequences(*val, lm.tokenizer, lm.eos_token_id, lm.context_length,
                                    prefix_ids=lm.prefix_ids)[0] if val else None)
    test = task.examples("test", int(a.eval_examples), int(cfg.seed)) if task else None
    log.info("SFT: %d sequences (%d response tokens), %d steps of %d", len(seqs), seqs.response_tokens, a.steps,
             a.batch_size)

    opt = OptimizerStep(cfg, lm.model, int(a.steps))
    history = History(("loss", "val_loss", "accuracy"))

    def evaluate(step: int) -> dict:
        out = {}
        if val_seqs is not None:
            out["val_loss"] = sft_eval_loss(lm, val_seqs, int(a.microbatch_size))
        if task is not None:
            r = evaluate_task(lm, task, test, prompter, int(a.max_new_tokens))
            out.update(accuracy=r["accuracy"], format_rate=r["format_rate"], response_tokens=r["response_tokens"])
            out["_records"] = r["records"]
        return out

    def report(step: int, ev: dict) -> dict:
        clean = {k: v for k, v in ev.items() if not k.startswith("_")}
        run.log(clean, step=step)
        history.add(step, clean)
        log.info("step %d: %s", step, ", ".join(f"{k} {v:.4f}" for k, v in clean.items()))
        return ev

    first = report(0, evaluate(0))
    batches = iterate_batches(len(seqs), int(a.batch_size), shuffle=True, seed=int(cfg.seed))
    t0, tokens = time.time(), 0
    last = first
    progress = StepProgress(int(a.steps), "sft", int(a.log_every), ("loss", "lr", "grad_norm"), bar=bool(cfg.progress),
                            rate_unit="response tokens/s")
    for step in range(1, int(a.steps) + 1):
        m = sft_update(lm, opt, seqs, next(batches), int(a.microbatch_size), step,
                       cfg.sft.normalize_constant, tick=progress.tick)
        tokens += m["response_tokens"]
        history.add(step, m)
        if step % int(a.log_every) == 0 or step == int(a.steps):
            run.log({**m, "response_tokens_per_s": tokens / max(1e-9, time.time() - t0)}, step=step)
        progress.step(step, m, count=m["response_tokens"])
        if (a.eval_every and step % int(a.eval_every) == 0) or step == int(a.steps):
            last = report(step, evaluate(step))
    progress.close()
    seconds = time.time() - t0
    ckpt = save_policy(lm, run.dir, int(a.steps), "sft", source=lm.source)
    if "_records" in last:
        atomic_write_text(run.dir / "eval_samples.jsonl", "".join(json_dumps(r) + "\n" for r in last["_records"]))
    plot_curves(history.series, run.dir / "curves.png", f"SFT ({a.task.name or a.train_data})")
    summary = {"steps": int(a.steps), "train_seconds": round(seconds, 3), "response_tokens": tokens,
               "final_train_loss": m["loss"], "checkpoint": str(ckpt)}
    for k in ("val_loss", "accuracy", "format_rate"):
        if k in last:
            summary[k] = last[k]
            summary[f"initial_{k}"] = first[k]
    return summary
