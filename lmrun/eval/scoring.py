"""The two primitives the task evaluations are built on, for any ``CausalLM`` (ours or HF):

- ``continuation_logprobs``: the summed log-probability (nats) of a continuation given a context
  (option log-likelihood for MMLU, the judge's choice for AlpacaEval), batched, right-padded (the
  models are causal, so padding after a sequence changes none of its logits).
- ``generate_responses``: batched sampling of responses to text prompts, with prompts that do not
  fit the context cut from the left (the end of a prompt, where the question and the answer cue
  are, is kept) and the number of new tokens capped to half the context.
- ``generate_batches``: ``lm.generate`` over many prompts in batches, with progress (also what
  the alignment stages sample through).

Both primitives report progress (``lmrun.tracking.progress.Progress``): a log line every
``LOG_EVERY_S`` seconds with done/total, elapsed, ETA and the rate, and a bar on a terminal when
asked.
"""
from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

log = logging.getLogger(__name__)


def _prefix(lm) -> list[int]:
    return list(getattr(lm, "prefix_ids", []) or [])


def fit_left(ids: list[int], budget: int, keep_prefix: list[int] | None = None) -> tuple[list[int], bool]:
    """``ids`` cut from the left to at most ``budget`` tokens, keeping ``keep_prefix`` (a BOS) in
    front when ``ids`` starts with it -> ``(ids, whether anything was cut)``. ValueError when
    ``budget`` cannot hold the prefix plus one token."""
    keep = list(keep_prefix or [])
    if len(ids) <= budget:
        return list(ids), False
    head = keep if keep and ids[:len(keep)] == keep else []
    room = budget - len(head)
    if room < 1:
        raise ValueError(f"a budget of {budget} tokens cannot hold a prompt")
    return head + list(ids[len(ids) - room:]), True


@torch.no_grad()
def continuation_logprobs(lm, contexts: list[str], continuations: list[str], batch_size: int = 16,
                          desc: str = "scoring", bar: bool = False) -> list[float]:
    """``sum_t log p(continuation_t | context, continuation_<t)`` in nats for each pair.

    contexts, continuations: equal-length lists of strings (a continuation must encode to at
    least one token). Each pair is encoded as ``prefix_ids + encode(context) + encode(continuation)``
    (encoded separately, as lm-evaluation-harness does, so that every candidate continuation of
    one context is scored after the same context tokens); a pair longer than the model's context
    loses tokens from the left of its context. batch_size: sequences per forward pass. desc: what the
    progress lines call the work (``desc: done/total sequences, elapsed, ETA, sequences/s,
    tokens/s``); bar: a bar on a terminal. Raises ValueError for mismatched lists, an empty continuation or one that does not fit the
    context."""
    if len(contexts) != len(continuations):
        raise ValueError(f"{len(contexts)} contexts but {len(continuations)} continuations")
    prefix, ctx_len = _prefix(lm), int(lm.context_length)
    seqs: list[tuple[list[int], int]] = []  # (token ids, number of continuation tokens)
    for context, cont in zip(contexts, continuations):
        c_ids = lm.encode(cont)
        if not c_ids:
            raise ValueError(f"continuation {cont!r} encodes to no tokens")
        if len(c_ids) >= ctx_len:
            raise ValueError(f"a continuation of {len(c_ids)} tokens does not fit context_length={ctx_len}")
        x_ids, _ = fit_left(prefix + lm.encode(context), ctx_len - len(c_ids), prefix)
        seqs.append((x_ids + c_ids, len(c_ids)))
    from lmrun.tracking.progress import Progress

    device = lm.device
    out: list[float] = []
    was_training = lm.model.training
    lm.model.eval()
    tokens = 0
    try:
        with Progress(len(seqs), desc, unit="sequence", bar=bar, log_start=True) as p:
            for start in range(0, len(seqs), batch_size):
                chunk = seqs[start:start + batch_size]
                width = max(len(s) for s, _ in chunk)
                batch = torch.zeros(len(chunk), width, dtype=torch.long)
                for i, (s, _) in enumerate(chunk):
                    batch[i, :len(s)] = torch.tensor(s)
                logits = lm.logits(batch.to(device))
                for i, (s, n) in enumerate(chunk):
                    targets = torch.tensor(s[len(s) - n:], device=device)
                    # the logits at t predict token t + 1; only the continuation's rows are normalised
                    rows = torch.log_softmax(logits[i, len(s) - n - 1:len(s) - 1].double(), -1)
                    out.append(float(rows.gather(-1, targets[:, None]).sum()))
                tokens += sum(len(s) for s, _ in chunk)
                p.update(len(chunk), **{"tokens/s": tokens / max(p.elapsed, 1e-9)})
    finally:
        lm.model.train(was_training)
    return out


@dataclass
class GenerationOptions:
    """Sampling of task responses. max_new_tokens: requested new tokens (capped to half the
    model's context); temperature: 0 = greedy; top_p: nucleus mass (1 = off); stop: stop strings
    (the eos token always stops); batch_size: prompts decoded together; seed: sampling seed;
    progress: a console progress bar."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    batch_size: int = 16
    seed: int = 0
    progress: bool = False


@dataclass
class Responses:
    """Results of ``generate_responses``: completions in prompt order, which prompts were cut from
    the left, the new-token cap used, new tokens in all, and seconds spent."""

    completions: list = field(default_factory=list)
    truncated: list[bool] = field(default_factory=list)
    max_new_tokens: int = 0
    new_tokens: int = 0
    seconds: float = 0.0


def generate_responses(lm, prompts: list[str], opts: GenerationOptions, desc: str = "generate") -> Responses:
    """Responses of ``lm`` to ``prompts`` (strings, templates already applied).

    The new-token cap is ``min(opts.max_new_tokens, context_length // 2)``; a prompt longer than
    ``context_length - cap`` tokens is cut from the left (``Responses.truncated``). Generation
    stops at the model's eos token, a stop string (``text`` is cut before it) or the cap.
    Returns ``Responses``; completions are ``lmrun.inference.Completion`` (text, token_ids,
    raw-distribution logprobs in nats, finish_reason)."""
    from lmrun.inference.engine import SamplingParams

    ctx = int(lm.context_length)
    cap = max(1, min(int(opts.max_new_tokens), ctx // 2))
    if cap < opts.max_new_tokens:
        log.warning("max_new_tokens=%d does not fit this model's context (%d tokens): generating at most %d",
                    opts.max_new_tokens, ctx, cap)
    prefix = _prefix(lm)
    ids, truncated = [], []
    for p in prompts:
        x, cut = fit_left(prefix + lm.encode(p), ctx - cap, prefix)
        if not x:
            raise ValueError("a prompt encodes to no tokens")
        ids.append(x)
        truncated.append(cut)
    if any(truncated):
        log.warning("%d of %d prompts are longer than %d tokens and were cut from the left", sum(truncated),
                    len(prompts), ctx - cap)
    res = Responses(truncated=truncated, max_new_tokens=cap)
    t0 = time.perf_counter()

    def params_at(start: int):
        return SamplingParams(max_new_tokens=cap, temperature=float(opts.temperature), top_p=float(opts.top_p),
                              stop_strings=tuple(opts.stop), seed=int(opts.seed) + start)

    res.completions = generate_batches(lm, ids, params_at, int(opts.batch_size), desc=desc, bar=bool(opts.progress))
    res.seconds = time.perf_counter() - t0
    res.new_tokens = sum(len(c.token_ids) for c in res.completions)
    return res


def generate_batches(lm, prompts: list, params_at: Callable[[int], object], batch_size: int,
                     desc: str = "generate", bar: bool = False, quiet: bool = False) -> list:
    """``lm.generate`` over ``prompts`` (strings or token-id lists) in batches of ``batch_size``;
    ``params_at(start)`` gives the ``SamplingParams`` of the batch that starts at prompt ``start``.
    Returns the completions in prompt order.

    Progress: ``desc: done/total prompts (pct), elapsed, ETA, prompts/s, new_tokens N, tokens/s R``
    every ``LOG_EVERY_S`` seconds — also inside a batch, counting tokens as they are accepted,
    when ``lm.generate`` takes ``on_token`` — plus a first and a last line (quiet: no first line,
    and a last one only when a line was logged in between: for sampling inside a training step).
    bar: a bar on a terminal."""
    from lmrun.tracking.progress import Progress

    out: list = []
    streams = "on_token" in inspect.signature(lm.generate).parameters
    p = Progress(len(prompts), desc, unit="prompt", bar=bar, log_start=not quiet)
    done_tokens = 0  # tokens of the finished batches
    live = [0]  # tokens of the running batch

    def on_token(*_) -> None:
        live[0] += 1
        if live[0] % 8 == 0:  # cheap: the clock is read every 8 tokens
            n = done_tokens + live[0]
            p.update(0, new_tokens=n, **{"tokens/s": n / max(p.elapsed, 1e-9)})

    ok = False
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            live[0] = 0
            if streams:
                got = lm.generate(chunk, params_at(start), on_token=on_token)
            else:
                got = lm.generate(chunk, params_at(start))
            out.extend(got)
            done_tokens += sum(len(c.token_ids) for c in got)
            p.update(len(chunk), new_tokens=done_tokens, **{"tokens/s": done_tokens / max(p.elapsed, 1e-9)})
        ok = True
    finally:
        p.close(log_final=ok and (not quiet or p.logged))
    return out
