"""Stage ``dpo``: Direct Preference Optimization (Rafailov et al. 2023) against a frozen
reference model.

``lmrun stage=dpo align.model=runs/sft/<run> align.train_data=pairs.jsonl
[align.val_data=val_pairs.jsonl]`` with JSONL records ``{"prompt", "chosen", "rejected"}`` (the
prompt goes into ``align.prompt_template``; responses get the end-of-text token). Or, with
``align.task.name=…`` and no files, preference pairs are built by the verifier: the reference
model samples ``dpo.samples_per_prompt`` responses to each of ``dpo.pair_prompts`` train
questions, and a verified-correct response is paired (chosen) with an incorrect one
(rejected); held-out pairs come from test questions (``pairs_train.jsonl`` /
``pairs_val.jsonl`` are written to the run directory).

The reference is ``align.reference`` (default: ``align.model``), frozen; its log-probs are
computed once. Logged: loss, implicit reward margins, preference accuracy (train and
held-out) and, with a task, held-out greedy task accuracy. Writes checkpoints,
``metrics.jsonl``, ``curves.png`` and ``summary.json``.
"""
from __future__ import annotations

import logging
import time

from lmrun.tracking.files import atomic_write_text, json_dumps
from lmrun.tracking.run import active_run

log = logging.getLogger(__name__)


def plan(cfg) -> dict:
    """The dry-run plan, after checking every input (``lmrun.align.checks``): the policy and the
    reference open as checkpoints, the JSONL files are valid in full. DataError/FormatError/
    ConfigError otherwise."""
    from lmrun.align.checks import DPO_KEYS, check_align_inputs

    a, d = cfg.align, cfg.dpo
    checked = check_align_inputs(cfg, "dpo", DPO_KEYS)
    source = a.train_data or (f"pairs ranked by the {a.task.name} verifier from {d.samples_per_prompt} samples of "
                              f"{d.pair_prompts} questions")
    return {"stage": "dpo", "model": checked["model"], "reference": checked.get("reference", checked["model"]),
            "records": checked["records"], "data": source,
            "beta": d.beta, "steps": a.steps, "batch_size": a.batch_size,
            "inputs": [a.model] + [x for x in (a.train_data, a.val_data) if x],
            "outputs": ["checkpoints/", "metrics.jsonl", "curves.png", "summary.json"]}


def verifier_pairs(ref_lm, task, examples, prompter, d, a, seed: int) -> list[dict]:
    """Preference pairs from sampling: for each example, ``samples_per_prompt`` responses of the
    reference at ``dpo.temperature``; the first correct response (reward 1) becomes ``chosen``,
    the first incorrect one ``rejected``. Questions with no correct or no incorrect response
    give no pair. Records: prompt (the question), chosen, rejected."""
    from lmrun.align.loop import sample

    k = int(d.samples_per_prompt)
    prompts = [prompter(e.question) for e in examples for _ in range(k)]
    completions = sample(ref_lm, prompts, max_new_tokens=int(a.max_new_tokens), temperature=float(d.temperature),
                         seed=seed, desc="sampling pairs", quiet=False)
    pairs = []
    for i, e in enumerate(examples):
        group = completions[i * k:(i + 1) * k]
        scored = [(c.text, task.reward(c.text, e.answer)["reward"]) for c in group]
        good = [t for t, r in scored if r == 1.0]
        bad = [t for t, r in scored if r < 1.0]
        if good and bad:
            pairs.append({"prompt": e.question, "chosen": good[0], "rejected": bad[0]})
    return pairs


def _encode_pairs(lm, prompter, pairs: list[dict]) -> list[tuple[list[int], list[int], list[int]]]:
    eos = [lm.eos_token_id] if lm.eos_token_id is not None else []
    out = []
    for p in pairs:
        prompt = list(lm.prefix_ids) + lm.encode(prompter(p["prompt"]))
        chosen, rejected = lm.encode(p["chosen"]) + eos, lm.encode(p["rejected"]) + eos
        keep = lm.context_length + 1 - len(prompt)
        if keep < 1:
            continue
        out.append((prompt, chosen[:keep], rejected[:keep]))
    return out


def pair_log_probs(model, encoded, device, pad_id: int):
    """Summed response log-probs ``(chosen (B,), rejected (B,))`` of encoded pairs (prompt,
    chosen, rejected token ids) under ``model`` (with gradient if enabled)."""
    from lmrun.align.losses import sequence_log_probs

    seqs = [p + c for p, c, _ in encoded] + [p + r for p, _, r in encoded]
    starts = [len(p) for p, _, _ in encoded] * 2
    lp = sequence_log_probs(model, seqs, starts, pad_id=pad_id)
    return lp[:len(encoded)], lp[len(encoded):]


def run(cfg) -> dict:
    import torch

    from lmrun.align.data import iterate_batches, read_jsonl
    from lmrun.align.loop import (History, OptimizerStep, Prompter, StepProgress, autocast, check_finite,
                                  evaluate_task, load_policy, load_task, plot_curves, save_policy)
    from lmrun.tracking.progress import Progress
    from lmrun.align.losses import dpo_loss
    from lmrun.errors import DataError
    from lmrun.tracking.run import seed_everything

    run = active_run()
    a, d = cfg.align, cfg.dpo
    seed_everything(int(cfg.seed))
    lm = load_policy(cfg)
    ref = load_policy(cfg, key="align.reference", path=a.reference or a.model)
    ref.model.eval().requires_grad_(False)
    task = load_task(cfg)
    prompter = Prompter.from_config(a.prompt_template)
    keys = ("prompt", "chosen", "rejected")
    if a.train_data:
        train_pairs = read_jsonl(a.train_data, keys, "align.train_data")
    else:
        t0 = time.time()
        train_pairs = verifier_pairs(ref, task, task.examples("train", int(d.pair_prompts), int(cfg.seed)),
                                     prompter, d, a, seed=int(cfg.seed))
        log.info("%d train pairs from %d questions (%.1f s)", len(train_pairs), d.pair_prompts, time.time() - t0)
        atomic_write_text(run.dir / "pairs_train.jsonl", "".join(json_dumps(p) + "\n" for p in train_pairs))
    if a.val_data:
        val_pairs = read_jsonl(a.val_data, keys, "align.val_data")
    elif task is not None:
        val_pairs = verifier_pairs(ref, task, task.examples("test", int(a.eval_examples), int(cfg.seed)),
                                   prompter, d, a, seed=int(cfg.seed) + 1)
        atomic_write_text(run.dir / "pairs_val.jsonl", "".join(json_dumps(p) + "\n" for p in val_pairs))
    else:
        val_pairs = []
    train = _encode_pairs(lm, prompter, train_pairs)
    val = _encode_pairs(lm, prompter, val_pairs)
    if not train:
        raise DataError("dpo: no training pairs (the reference's samples were all correct or all wrong, or every "
                        "prompt is longer than the context); raise dpo.samples_per_prompt or dpo.temperature")
    pad = lm.pad_id
    mb = int(a.microbatch_size)

    def logps(model_lm, encoded, desc: str = "log-probs", quiet: bool = True):
        """(chosen, rejected) summed log-probs, no gradient, in microbatches; progress lines while
        it runs (quiet: only after LOG_EVERY_S seconds)."""
        out_c, out_r = [], []
        p = Progress(len(encoded), desc, unit="pair", bar=bool(cfg.progress) and not quiet, log_start=not quiet)
        with torch.no_grad(), autocast(model_lm.device):
            for i in range(0, len(encoded), mb):
                c, r = pair_log_probs(model_lm.model, encoded[i:i + mb], model_lm.device, pad)
                out_c.append(c.float().cpu())
                out_r.append(r.float().cpu())
                p.update(len(encoded[i:i + mb]))
        p.close(log_final=not quiet or p.logged)
        return torch.cat(out_c), torch.cat(out_r)

    ref_train = logps(ref, train, "reference log-probs (train)", quiet=False)
    ref_val = logps(ref, val, "reference log-probs (val)", quiet=False) if val else None
    test = task.examples("test", int(a.eval_examples), int(cfg.seed)) if task else None
    opt = OptimizerStep(cfg, lm.model, int(a.steps))
    history = History(("loss", "reward_margin", "preference_accuracy", "val_preference_accuracy", "eval_accuracy"))

    def evaluate(step: int) -> dict:
        m = {}
        if val:
            loss, info = dpo_loss(*logps(lm, val), *ref_val, float(d.beta))
            m.update(val_loss=float(loss), val_preference_accuracy=float(info["preference_accuracy"]),
                     val_reward_margin=float(info["reward_margin"]))
        if task is not None:
            r = evaluate_task(lm, task, test, prompter, int(a.max_new_tokens))
            m.update(eval_accuracy=r["accuracy"], eval_format_rate=r["format_rate"])
        if m:
            run.log(m, step=step)
            history.add(step, m)
            log.info("step %d: %s", step, ", ".join(f"{k} {v:.4f}" for k, v in m.items()))
        return m

    first = last = evaluate(0)
    batches = iterate_batches(len(train), int(a.batch_size), shuffle=True, seed=int(cfg.seed))
    t0 = time.time()
    progress = StepProgress(int(a.steps), "dpo", int(a.log_every),
                            ("loss", "reward_margin", "preference_accuracy", "lr", "grad_norm"), bar=bool(cfg.progress),
                            unit="step", rate_unit="pairs/s")
    for step in range(1, int(a.steps) + 1):
        index = next(batches)
        sums = {"loss": 0.0, "chosen_reward": 0.0, "rejected_reward": 0.0, "reward_margin": 0.0,
                "preference_accuracy": 0.0}
        for i in range(0, len(index), mb):
            part = index[i:i + mb]
            with autocast(lm.device):
                c, r = pair_log_probs(lm.model, [train[j] for j in part], lm.device, pad)
            loss, info = dpo_loss(c.float(), r.float(), ref_train[0][part].to(lm.device),
                                  ref_train[1][part].to(lm.device), float(d.beta))
            check_finite(float(loss.detach()), "the DPO loss", step)
            w = len(part) / len(index)
            (loss * w).backward()
            sums["loss"] += float(loss.detach()) * w
            for k in ("chosen_reward", "rejected_reward", "reward_margin", "preference_accuracy"):
                sums[k] += float(info[k]) * w
            progress.tick()
        m = {**sums, **opt(step)}
        history.add(step, m)
        if step % int(a.log_every) == 0 or step == int(a.steps):
            run.log(m, step=step)
        progress.step(step, m, count=len(index))
        if (a.eval_every and step % int(a.eval_every) == 0) or step == int(a.steps):
            last = evaluate(step)
    progress.close()
    seconds = time.time() - t0
    ckpt = save_policy(lm, run.dir, int(a.steps), "dpo", source=lm.source, beta=float(d.beta))
    plot_curves(history.series, run.dir / "curves.png", f"DPO (beta={d.beta})")
    summary = {"steps": int(a.steps), "train_seconds": round(seconds, 3), "train_pairs": len(train),
               "val_pairs": len(val), "final_loss": m["loss"], "checkpoint": str(ckpt)}
    for k in ("val_preference_accuracy", "val_reward_margin", "eval_accuracy"):
        if k in last:
            summary[k] = last[k]
            summary[f"initial_{k}"] = first[k]
    return summary
