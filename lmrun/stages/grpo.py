"""Stage ``grpo``: Group Relative Policy Optimization on a verifiable task (Shao et al. 2024;
DeepSeek-AI 2025), with the knobs of CS336 assignment 5.

``lmrun stage=grpo align.model=runs/sft/<run> align.task.name=arithmetic``. Each of
``align.steps`` GRPO steps: sample ``grpo.rollout_batch_size / grpo.group_size`` train
questions, draw ``grpo.group_size`` responses to each through the inference engine (batched,
KV cache, ``grpo.temperature``), reward them with the task's verifier, normalise rewards within
each group (``grpo.normalize_by_std``), then take ``epochs_per_rollout_batch *
rollout_batch_size / align.batch_size`` optimizer steps on the rollouts with
``grpo.loss_type`` (``no_baseline`` | ``reinforce_with_baseline`` | ``grpo_clip`` — off-policy
epochs clip the ratio to the policy that sampled) and ``grpo.length_normalization``.

Logged per step (a near-zero loss says little; these say whether it is learning): reward,
train accuracy, format rate, zero-std-group fraction (groups with no signal), token entropy,
clip fraction, response length, gradient norm; held-out greedy accuracy every
``align.eval_every`` steps. Writes checkpoints, ``metrics.jsonl``, ``eval_samples.jsonl``,
``curves.png`` and ``summary.json``.
"""
from __future__ import annotations

import logging
import random
import time

from lmrun.tracking.files import atomic_write_text, json_dumps
from lmrun.tracking.run import active_run

log = logging.getLogger(__name__)


def plan(cfg) -> dict:
    """The dry-run plan, after checking every input (``lmrun.align.checks``): the model opens as a
    checkpoint, the task's files are valid in full. DataError/FormatError/ConfigError otherwise."""
    from lmrun.align.checks import check_align_inputs

    a, g = cfg.align, cfg.grpo
    checked = check_align_inputs(cfg, "grpo")
    per_step = g.epochs_per_rollout_batch * g.rollout_batch_size // a.batch_size
    return {"stage": "grpo", "model": checked["model"], "records": checked["records"], "task": a.task.name,
            "template": a.prompt_template,
            "steps": a.steps, "questions_per_step": g.rollout_batch_size // g.group_size, "group_size": g.group_size,
            "optimizer_steps": a.steps * per_step, "loss_type": g.loss_type, "normalize_by_std": g.normalize_by_std,
            "length_normalization": g.length_normalization,
            "inputs": [a.model] + [x for x in (a.train_data, a.val_data) if x],
            "outputs": ["checkpoints/", "metrics.jsonl", "curves.png", "eval_samples.jsonl", "summary.json"]}


def _rollout_batch(lm, task, pool, prompter, g, a, rng: random.Random, seed: int):
    """Sample questions, draw a group of responses for each, score them -> the training batch."""
    from lmrun.align.data import collate_pairs
    from lmrun.align.loop import sample
    from lmrun.align.losses import compute_group_normalized_rewards

    questions = rng.sample(pool, int(g.rollout_batch_size) // int(g.group_size))
    prompts = [prompter(e.question) for e in questions for _ in range(int(g.group_size))]
    truths = [e.answer for e in questions for _ in range(int(g.group_size))]
    completions = sample(lm, prompts, max_new_tokens=int(a.max_new_tokens), temperature=float(g.temperature),
                         top_p=float(g.top_p), seed=seed, desc="rollouts")
    responses = [c.text for c in completions]
    advantages, raw, meta = compute_group_normalized_rewards(task.reward, responses, truths, int(g.group_size),
                                                             float(g.advantage_eps), bool(g.normalize_by_std))
    batch = collate_pairs([(c.prompt_ids, c.token_ids) for c in completions], lm.pad_id)
    meta["response_length"] = sum(len(c.token_ids) for c in completions) / len(completions)
    meta["stop_fraction"] = sum(c.finish_reason == "stop" for c in completions) / len(completions)
    return batch, advantages.unsqueeze(1), raw.unsqueeze(1), meta, list(zip(prompts, responses, truths))


def run(cfg) -> dict:
    import torch

    from lmrun.align.loop import (History, OptimizerStep, Prompter, StepProgress, autocast, check_finite,
                                  evaluate_task, load_policy, load_task, plot_curves, save_policy)
    from lmrun.align.losses import get_response_log_probs, grpo_microbatch_train_step, masked_mean
    from lmrun.tracking.run import seed_everything

    run = active_run()
    a, g = cfg.align, cfg.grpo
    seed_everything(int(cfg.seed))
    lm = load_policy(cfg)
    task = load_task(cfg)
    prompter = Prompter.from_config(a.prompt_template)
    pool = task.examples("train", int(a.train_examples), int(cfg.seed))
    test = task.examples("test", int(a.eval_examples), int(cfg.seed))
    if len(pool) < g.rollout_batch_size // g.group_size:
        from lmrun.errors import ConfigError
        raise ConfigError(f"align.train_examples={a.train_examples}: fewer than the "
                          f"{g.rollout_batch_size // g.group_size} questions of one rollout batch")
    per_step = int(g.epochs_per_rollout_batch) * int(g.rollout_batch_size) // int(a.batch_size)
    accum = int(a.batch_size) // int(a.microbatch_size)
    opt = OptimizerStep(cfg, lm.model, int(a.steps) * per_step)
    rng = random.Random(int(cfg.seed))
    needs_old = g.loss_type == "grpo_clip" or int(g.epochs_per_rollout_batch) > 1
    history = History(("reward", "eval_accuracy", "token_entropy", "zero_std_group_fraction", "response_length",
                       "clip_fraction"))

    def evaluate(step: int) -> dict:
        r = evaluate_task(lm, task, test, prompter, int(a.max_new_tokens))
        m = {"eval_accuracy": r["accuracy"], "eval_format_rate": r["format_rate"],
             "eval_response_tokens": r["response_tokens"]}
        run.log(m, step=step)
        history.add(step, m)
        log.info("step %d: held-out accuracy %.4f (format %.4f) on %d questions", step, r["accuracy"],
                 r["format_rate"], len(test))
        return {**m, "_records": r["records"]}

    first = last = evaluate(0)
    opt_step, t_start = 0, time.time()
    rollout_s = train_s = 0.0
    progress = StepProgress(int(a.steps), "grpo", int(a.log_every),
                            ("reward", "zero_std_group_fraction", "token_entropy", "response_length", "loss",
                             "grad_norm"), bar=bool(cfg.progress), rate_unit="rollout tokens/s")
    for step in range(1, int(a.steps) + 1):
        t0 = time.time()
        batch, adv, raw, meta, samples = _rollout_batch(lm, task, pool, prompter, g, a, rng,
                                                        seed=int(cfg.seed) * 1_000_003 + step * 7919)
        batch = {k: v.to(lm.device) for k, v in batch.items()}
        adv, raw = adv.to(lm.device), raw.to(lm.device)
        n = batch["input_ids"].shape[0]
        old = None
        if needs_old:
            parts = []
            with torch.no_grad(), autocast(lm.device):
                for i in range(0, n, int(a.microbatch_size)):
                    parts.append(get_response_log_probs(lm.model, batch["input_ids"][i:i + int(a.microbatch_size)],
                                                        batch["labels"][i:i + int(a.microbatch_size)])["log_probs"])
                    progress.tick()
            old = torch.cat(parts)
        t1 = time.time()
        rollout_s += t1 - t0
        losses, entropies, clips, opt_out = [], [], [], {}
        for _ in range(int(g.epochs_per_rollout_batch)):
            order = torch.randperm(n, generator=torch.Generator().manual_seed(rng.randrange(2**31))).tolist()
            for s in range(0, n, int(a.batch_size)):
                rows = order[s:s + int(a.batch_size)]
                for m0 in range(0, len(rows), int(a.microbatch_size)):
                    idx = torch.tensor(rows[m0:m0 + int(a.microbatch_size)], device=lm.device)
                    mask = batch["response_mask"][idx]
                    with autocast(lm.device):
                        out = get_response_log_probs(lm.model, batch["input_ids"][idx], batch["labels"][idx],
                                                     return_token_entropy=True)
                    loss, info = grpo_microbatch_train_step(
                        out["log_probs"], mask, accum, g.loss_type, raw_rewards=raw[idx], advantages=adv[idx],
                        old_log_probs=old[idx] if old is not None else None, cliprange=float(g.cliprange),
                        length_normalization=g.length_normalization, normalize_constant=float(a.max_new_tokens))
                    check_finite(float(loss), "the GRPO loss", step)
                    losses.append(float(loss) * accum)
                    entropies.append(float(masked_mean(out["token_entropy"], mask)))
                    if "clip_fraction" in info:
                        clips.append(float(info["clip_fraction"]))
                    progress.tick()
                opt_step += 1
                opt_out = opt(opt_step)
        train_s += time.time() - t1
        m = {"reward": meta["reward_mean"], "train_accuracy": meta["answer_reward_mean"],
             "format_rate": meta["format_reward_mean"], "zero_std_group_fraction": meta["zero_std_group_fraction"],
             "response_length": meta["response_length"], "stop_fraction": meta["stop_fraction"],
             "token_entropy": sum(entropies) / len(entropies), "loss": sum(losses) / len(losses),
             "clip_fraction": sum(clips) / len(clips) if clips else None, **opt_out,
             "rollout_s": rollout_s, "train_s": train_s}
        history.add(step, m)
        if step % int(a.log_every) == 0 or step == int(a.steps):
            run.log(m, step=step)
        progress.step(step, m, count=int(batch["response_mask"].sum()))
        if (a.eval_every and step % int(a.eval_every) == 0) or step == int(a.steps):
            last = evaluate(step)
    progress.close()
    seconds = time.time() - t_start
    ckpt = save_policy(lm, run.dir, int(a.steps), "grpo", source=lm.source, task=a.task.name)
    atomic_write_text(run.dir / "eval_samples.jsonl", "".join(json_dumps(r) + "\n" for r in last["_records"]))
    plot_curves(history.series, run.dir / "curves.png", f"GRPO on {a.task.name} ({g.loss_type})")
    return {"steps": int(a.steps), "optimizer_steps": opt_step, "seconds": round(seconds, 3),
            "rollout_seconds": round(rollout_s, 3), "train_seconds": round(train_s, 3),
            "initial_eval_accuracy": first["eval_accuracy"], "eval_accuracy": last["eval_accuracy"],
            "eval_format_rate": last["eval_format_rate"], "final_reward": m["reward"], "checkpoint": str(ckpt)}
