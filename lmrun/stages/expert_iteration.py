"""Stage ``expert_iteration``: sample, keep what the verifier accepts, fine-tune on it, repeat
(Anthony et al. 2017, "Thinking Fast and Slow with Deep Learning and Tree Search"; as STaR,
Zelikman et al. 2022, without rationalisation; CS336 assignment 5).

``lmrun stage=expert_iteration align.model=runs/sft/<run> align.task.name=arithmetic``. Each of
``expert_iteration.iterations`` rounds: ``questions`` train questions, ``samples_per_question``
responses each at ``temperature``; the verified-correct ones (deduplicated per question) are
the round's SFT data, trained for ``sft_epochs`` epochs in batches of ``align.batch_size``;
held-out greedy accuracy after every round. Writes checkpoints, ``metrics.jsonl``,
``eval_samples.jsonl``, ``curves.png`` and ``summary.json``.
"""
from __future__ import annotations

import logging
import math
import random
import time

from lmrun.tracking.files import atomic_write_text, json_dumps
from lmrun.tracking.run import active_run

log = logging.getLogger(__name__)


def plan(cfg) -> dict:
    """The dry-run plan, after checking every input (``lmrun.align.checks``): the model opens as a
    checkpoint, the task's files are valid in full. DataError/FormatError/ConfigError otherwise."""
    from lmrun.align.checks import check_align_inputs

    a, e = cfg.align, cfg.expert_iteration
    checked = check_align_inputs(cfg, "expert_iteration")
    return {"stage": "expert_iteration", "model": checked["model"], "records": checked["records"], "task": a.task.name,
            "iterations": e.iterations,
            "samples_per_round": e.questions * e.samples_per_question, "sft_epochs": e.sft_epochs,
            "inputs": [a.model] + [x for x in (a.train_data, a.val_data) if x],
            "outputs": ["checkpoints/", "metrics.jsonl", "curves.png", "eval_samples.jsonl", "summary.json"]}


def run(cfg) -> dict:
    from lmrun.align.data import SFTSequences, iterate_batches
    from lmrun.align.loop import (History, OptimizerStep, Prompter, StepProgress, evaluate_task, load_policy,
                                  load_task, plot_curves, sample, save_policy, sft_update)
    from lmrun.tracking.progress import Progress
    from lmrun.errors import ConfigError
    from lmrun.tracking.run import seed_everything

    run = active_run()
    a, e = cfg.align, cfg.expert_iteration
    seed_everything(int(cfg.seed))
    lm = load_policy(cfg)
    task = load_task(cfg)
    prompter = Prompter.from_config(a.prompt_template)
    pool = task.examples("train", int(a.train_examples), int(cfg.seed))
    if len(pool) < int(e.questions):
        raise ConfigError(f"expert_iteration.questions={e.questions}: more than align.train_examples={a.train_examples}")
    test = task.examples("test", int(a.eval_examples), int(cfg.seed))
    rng = random.Random(int(cfg.seed))
    # the schedule spans the largest possible number of SFT steps (every sample kept)
    max_steps = int(e.iterations) * int(e.sft_epochs) * math.ceil(int(e.questions) * int(e.samples_per_question)
                                                                  / int(a.batch_size))
    opt = OptimizerStep(cfg, lm.model, max_steps)
    history = History(("kept_fraction", "sft_loss", "eval_accuracy"))

    def evaluate(it: int) -> dict:
        r = evaluate_task(lm, task, test, prompter, int(a.max_new_tokens))
        m = {"eval_accuracy": r["accuracy"], "eval_format_rate": r["format_rate"]}
        run.log(m, step=it)
        history.add(it, m)
        log.info("round %d: held-out accuracy %.4f (format %.4f)", it, r["accuracy"], r["format_rate"])
        return {**m, "_records": r["records"]}

    first = last = evaluate(0)
    step, t0 = 0, time.time()
    rounds = Progress(int(e.iterations), "expert iteration", unit="round", bar=bool(cfg.progress), every_s=0)
    for it in range(1, int(e.iterations) + 1):
        questions = rng.sample(pool, int(e.questions))
        k = int(e.samples_per_question)
        prompts = [prompter(q.question) for q in questions for _ in range(k)]
        completions = sample(lm, prompts, max_new_tokens=int(a.max_new_tokens), temperature=float(e.temperature),
                             seed=int(cfg.seed) * 1_000_003 + it, desc=f"round {it} sampling", quiet=False)
        kept, seen, correct = [], set(), 0
        for i, c in enumerate(completions):
            q = questions[i // k]
            if task.reward(c.text, q.answer)["reward"] == 1.0:
                correct += 1
                key = (i // k, tuple(c.token_ids))
                if key not in seen:
                    seen.add(key)
                    kept.append((list(c.prompt_ids), list(c.token_ids)))
        m = {"sample_accuracy": correct / len(completions), "kept": len(kept),
             "kept_fraction": len(kept) / len(completions)}
        losses = []
        if kept:
            seqs = SFTSequences(pairs=kept)
            batches = iterate_batches(len(kept), int(a.batch_size), shuffle=True, seed=int(cfg.seed) + it)
            n_steps = int(e.sft_epochs) * math.ceil(len(kept) / int(a.batch_size))
            progress = StepProgress(n_steps, f"round {it} SFT", int(a.log_every), ("loss", "lr", "grad_norm"),
                                    bar=bool(cfg.progress), rate_unit="response tokens/s")
            for i in range(1, n_steps + 1):
                step += 1
                out = sft_update(lm, opt, seqs, next(batches), int(a.microbatch_size), step, tick=progress.tick)
                losses.append(out["loss"])
                progress.step(i, out, count=out["response_tokens"])
            progress.close()
        m.update(sft_steps=len(losses), sft_loss=sum(losses) / len(losses) if losses else None)
        run.log(m, step=it)
        history.add(it, m)
        log.info("round %d: %d/%d samples correct, %d kept, %d SFT steps", it, correct, len(completions), len(kept),
                 len(losses))
        last = evaluate(it)
        rounds.update(1, eval_accuracy=last["eval_accuracy"])
    rounds.close(log_final=False)  # every round logged its line
    seconds = time.time() - t0
    ckpt = save_policy(lm, run.dir, step, "expert_iteration", source=lm.source, task=a.task.name)
    atomic_write_text(run.dir / "eval_samples.jsonl", "".join(json_dumps(r) + "\n" for r in last["_records"]))
    plot_curves(history.series, run.dir / "curves.png", f"Expert iteration on {a.task.name}")
    return {"iterations": int(e.iterations), "sft_steps": step, "seconds": round(seconds, 3),
            "initial_eval_accuracy": first["eval_accuracy"], "eval_accuracy": last["eval_accuracy"],
            "checkpoint": str(ckpt)}
