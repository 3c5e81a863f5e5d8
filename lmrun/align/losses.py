"""The losses of SFT, policy-gradient RL (REINFORCE, GRPO) and DPO, with the masked reductions
they share. Names and semantics follow CS336 assignment 5 (Spring 2025).

Shapes: ``B`` sequences, ``T`` positions (next-token labels), ``V`` vocabulary. Log-probs are in
nats. ``response_mask`` is 1 on label positions that belong to the response, 0 on prompt and
padding.

Sources: GRPO — Shao et al. 2024, "DeepSeekMath" (group-normalised advantages) and DeepSeek-AI
2025 (R1-Zero); the clipped surrogate — Schulman et al. 2017, "Proximal Policy Optimization";
Dr. GRPO (no std normalisation, constant length normalisation) — Liu et al. 2025,
"Understanding R1-Zero-Like Training"; DPO — Rafailov et al. 2023, "Direct Preference
Optimization", eq. 7.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

LOSS_TYPES = ("no_baseline", "reinforce_with_baseline", "grpo_clip")
LENGTH_NORMALIZATIONS = ("masked_mean", "masked_normalize")


# ---- log-probs and masked reductions ---------------------------------------------------------------------

def compute_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of the next-token distribution at every position.

    logits ``(..., V)`` -> ``(...,)``; computed from ``logsumexp`` (stable for large logits):
    ``H = logsumexp(z) - sum(softmax(z) * z)``."""
    logits = logits.float()
    lse = torch.logsumexp(logits, dim=-1)
    return lse - (torch.softmax(logits, dim=-1) * logits).sum(-1)


def _logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids)
    return getattr(out, "logits", out)


def get_response_log_probs(model, input_ids: torch.Tensor, labels: torch.Tensor,
                           return_token_entropy: bool = False) -> dict[str, torch.Tensor]:
    """Per-token conditional log-probs ``log p(labels[t] | input_ids[:t+1])``.

    model: a callable ``input_ids (B, T) -> logits (B, T, V)`` (or an object with ``.logits``,
    as Hugging Face models return). input_ids, labels: ``(B, T)`` int64 (``labels`` are
    ``input_ids`` shifted by one, see ``tokenize_prompt_and_output``). Returns ``{"log_probs":
    (B, T)}`` float32 and, with ``return_token_entropy``, ``"token_entropy": (B, T)``
    (nats; computed without gradient)."""
    logits = _logits(model, input_ids).float()
    log_probs = torch.log_softmax(logits, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    out = {"log_probs": log_probs}
    if return_token_entropy:
        with torch.no_grad():
            out["token_entropy"] = compute_entropy(logits)
    return out


def masked_mean(tensor: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``tensor`` over the elements where ``mask`` is 1, along ``dim`` (None: all).
    ``mask`` has ``tensor``'s shape. A slice with no masked element gives NaN (0/0)."""
    mask = mask.to(tensor.dtype)
    if dim is None:
        return (tensor * mask).sum() / mask.sum()
    return (tensor * mask).sum(dim) / mask.sum(dim)


def masked_normalize(tensor: torch.Tensor, mask: torch.Tensor, dim: int | None = None,
                     normalize_constant: float = 1.0) -> torch.Tensor:
    """Sum of ``tensor`` where ``mask`` is 1, along ``dim`` (None: all), divided by the constant
    ``normalize_constant`` (> 0) — unlike ``masked_mean`` the divisor does not depend on the
    number of masked elements (Dr. GRPO's length normalisation)."""
    if normalize_constant <= 0:
        raise ValueError(f"normalize_constant={normalize_constant}: expected > 0")
    mask = mask.to(tensor.dtype)
    total = (tensor * mask).sum() if dim is None else (tensor * mask).sum(dim)
    return total / normalize_constant


# ---- SFT -------------------------------------------------------------------------------------------------

def sft_microbatch_train_step(policy_log_probs: torch.Tensor, response_mask: torch.Tensor,
                              gradient_accumulation_steps: int, normalize_constant: float = 1.0
                              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One microbatch of SFT: negative log-likelihood of the response tokens, summed over each
    sequence and divided by ``normalize_constant``, averaged over the batch, divided by
    ``gradient_accumulation_steps``; calls ``backward()``.

    policy_log_probs, response_mask: ``(B, T)``. Returns ``(loss, metadata)``: the scalar loss
    that was backpropagated and ``{"nll_per_token": ...}`` (mean NLL per response token,
    detached, for logging)."""
    if gradient_accumulation_steps < 1:
        raise ValueError(f"gradient_accumulation_steps={gradient_accumulation_steps}: expected >= 1")
    per_seq = masked_normalize(-policy_log_probs, response_mask, dim=-1, normalize_constant=normalize_constant)
    loss = per_seq.mean() / gradient_accumulation_steps
    loss.backward()
    with torch.no_grad():
        nll = masked_mean(-policy_log_probs, response_mask)
    return loss.detach(), {"nll_per_token": nll.detach()}


# ---- policy gradient / GRPO ------------------------------------------------------------------------------

def compute_group_normalized_rewards(reward_fn: Callable[[str, str], dict], rollout_responses: list[str],
                                     repeated_ground_truths: list[str], group_size: int, advantage_eps: float,
                                     normalize_by_std: bool) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Rewards of a rollout batch and their group-normalised advantages (GRPO).

    reward_fn: ``(response, ground_truth) -> {"reward": float, ...}`` (``format_reward`` and
    ``answer_reward`` are averaged into the metadata when present). rollout_responses,
    repeated_ground_truths: ``group_size`` consecutive responses per prompt (length ``n_prompts
    * group_size``). Advantage ``A_i = (r_i - mean(group))`` divided by ``(std(group) +
    advantage_eps)`` when ``normalize_by_std`` (std is the unbiased sample std, as
    ``torch.std``); a group whose rewards are all equal gets advantage 0.

    Returns ``(advantages (N,), raw_rewards (N,), metadata)``; metadata: ``reward_mean``,
    ``reward_std``, ``reward_max``, ``reward_min``, ``zero_std_group_fraction`` (groups that
    carry no learning signal) and the mean of each other reward key. ValueError when the
    lengths disagree or are not a multiple of ``group_size``."""
    n = len(rollout_responses)
    if group_size < 1 or n != len(repeated_ground_truths) or n % group_size:
        raise ValueError(f"{n} responses, {len(repeated_ground_truths)} ground truths, group_size={group_size}: "
                         "expected equal lengths, a multiple of group_size")
    scored = [reward_fn(r, g) for r, g in zip(rollout_responses, repeated_ground_truths)]
    raw = torch.tensor([float(s["reward"]) for s in scored], dtype=torch.float32)
    groups = raw.view(-1, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if normalize_by_std:
        std = groups.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(groups[:, :1])
        centred = centred / (std + advantage_eps)
    spread = groups.max(dim=1).values - groups.min(dim=1).values
    meta = {"reward_mean": float(raw.mean()), "reward_std": float(raw.std()) if n > 1 else 0.0,
            "reward_max": float(raw.max()), "reward_min": float(raw.min()),
            "zero_std_group_fraction": float((spread == 0).float().mean())}
    for key in scored[0]:
        if key != "reward":
            meta[f"{key}_mean"] = sum(float(s[key]) for s in scored) / n
    return centred.reshape(-1), raw, meta


def compute_naive_policy_gradient_loss(raw_rewards_or_advantages: torch.Tensor,
                                       policy_log_probs: torch.Tensor) -> torch.Tensor:
    """REINFORCE per-token loss ``-A * log pi(o_t)``. raw_rewards_or_advantages ``(B, 1)``
    (broadcast over positions), policy_log_probs ``(B, T)`` -> ``(B, T)``."""
    return -raw_rewards_or_advantages.to(policy_log_probs.dtype) * policy_log_probs


def compute_grpo_clip_loss(advantages: torch.Tensor, policy_log_probs: torch.Tensor, old_log_probs: torch.Tensor,
                           cliprange: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate per-token loss ``-min(rho * A, clip(rho, 1-eps, 1+eps) * A)`` with
    ``rho = exp(log pi - log pi_old)``.

    advantages ``(B, 1)``; policy_log_probs, old_log_probs ``(B, T)``; cliprange ``eps``.
    Returns ``(loss (B, T), {"clipped": (B, T) bool — where the clipped term was the
    minimum (strictly smaller), "ratio": (B, T)})``."""
    ratio = torch.exp(policy_log_probs - old_log_probs)
    adv = advantages.to(policy_log_probs.dtype)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange) * adv
    loss = -torch.minimum(unclipped, clipped)
    return loss, {"clipped": (clipped < unclipped).detach(), "ratio": ratio.detach()}


def compute_policy_gradient_loss(policy_log_probs: torch.Tensor, loss_type: str,
                                 raw_rewards: torch.Tensor | None = None, advantages: torch.Tensor | None = None,
                                 old_log_probs: torch.Tensor | None = None, cliprange: float | None = None
                                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token policy-gradient loss ``(B, T)`` of ``loss_type``: ``no_baseline`` (REINFORCE on
    ``raw_rewards (B, 1)``), ``reinforce_with_baseline`` (on ``advantages (B, 1)``), ``grpo_clip``
    (clipped surrogate; needs ``advantages``, ``old_log_probs (B, T)`` and ``cliprange``).
    ValueError for an unknown type or a missing argument."""
    if loss_type == "no_baseline":
        if raw_rewards is None:
            raise ValueError("loss_type=no_baseline needs raw_rewards")
        return compute_naive_policy_gradient_loss(raw_rewards, policy_log_probs), {}
    if loss_type == "reinforce_with_baseline":
        if advantages is None:
            raise ValueError("loss_type=reinforce_with_baseline needs advantages")
        return compute_naive_policy_gradient_loss(advantages, policy_log_probs), {}
    if loss_type == "grpo_clip":
        if advantages is None or old_log_probs is None or cliprange is None:
            raise ValueError("loss_type=grpo_clip needs advantages, old_log_probs and cliprange")
        return compute_grpo_clip_loss(advantages, policy_log_probs, old_log_probs, cliprange)
    raise ValueError(f"loss_type={loss_type!r}: expected one of {LOSS_TYPES}")


def grpo_microbatch_train_step(policy_log_probs: torch.Tensor, response_mask: torch.Tensor,
                               gradient_accumulation_steps: int, loss_type: str,
                               raw_rewards: torch.Tensor | None = None, advantages: torch.Tensor | None = None,
                               old_log_probs: torch.Tensor | None = None, cliprange: float | None = None,
                               length_normalization: str = "masked_mean", normalize_constant: float | None = None
                               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One microbatch of policy-gradient training; calls ``backward()``.

    The per-token loss of ``compute_policy_gradient_loss`` is reduced per sequence by
    ``length_normalization``: ``masked_mean`` (divide by the sequence's response length — GRPO)
    or ``masked_normalize`` (divide by the constant ``normalize_constant``, e.g. the maximum
    response length — Dr. GRPO), averaged over the batch, divided by
    ``gradient_accumulation_steps``. Returns ``(loss, metadata)`` with the backpropagated
    scalar and, for ``grpo_clip``, ``clip_fraction`` (fraction of response tokens where the
    clipped term was active) and ``approx_kl`` (mean ``old - new`` log-prob)."""
    if length_normalization not in LENGTH_NORMALIZATIONS:
        raise ValueError(f"length_normalization={length_normalization!r}: expected one of {LENGTH_NORMALIZATIONS}")
    per_token, meta = compute_policy_gradient_loss(policy_log_probs, loss_type, raw_rewards, advantages,
                                                   old_log_probs, cliprange)
    if length_normalization == "masked_mean":
        per_seq = masked_mean(per_token, response_mask, dim=-1)
    else:
        if normalize_constant is None:
            raise ValueError("length_normalization=masked_normalize needs normalize_constant")
        per_seq = masked_normalize(per_token, response_mask, dim=-1, normalize_constant=normalize_constant)
    loss = per_seq.mean() / gradient_accumulation_steps
    loss.backward()
    out: dict[str, torch.Tensor] = {}
    if "clipped" in meta:
        out["clip_fraction"] = masked_mean(meta["clipped"].float(), response_mask).detach()
        out["approx_kl"] = masked_mean((old_log_probs - policy_log_probs).detach(), response_mask)
    return loss.detach(), out


# ---- DPO -------------------------------------------------------------------------------------------------

def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta: float
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Batched DPO loss (Rafailov et al. 2023, eq. 7):
    ``-log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))``, averaged over the batch.

    Each argument ``(B,)``: summed response log-probs (nats) of the chosen / rejected response
    under the policy and the frozen reference. Returns ``(loss, metadata)`` with the implicit
    rewards ``chosen_reward = beta (pi_c - ref_c)``, ``rejected_reward``, ``reward_margin`` (batch
    means) and ``preference_accuracy`` (fraction with ``chosen_reward > rejected_reward``)."""
    chosen = beta * (policy_chosen_logps - ref_chosen_logps)
    rejected = beta * (policy_rejected_logps - ref_rejected_logps)
    margin = chosen - rejected
    loss = -F.logsigmoid(margin).mean()
    return loss, {"chosen_reward": chosen.detach().mean(), "rejected_reward": rejected.detach().mean(),
                  "reward_margin": margin.detach().mean(), "preference_accuracy": (margin > 0).float().mean().detach()}


def sequence_log_probs(model, token_ids: list[list[int]], response_starts: list[int], pad_id: int = 0) -> torch.Tensor:
    """Summed log-prob ``(B,)`` (nats) of each sequence's tokens from ``response_starts[i]`` on,
    given what precedes them. token_ids: full sequences (prompt + response); response_starts:
    index of each response's first token (>= 1)."""
    device = next(model.parameters()).device
    length = max(len(t) for t in token_ids)
    ids = torch.full((len(token_ids), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(token_ids), length - 1))
    for i, (t, s) in enumerate(zip(token_ids, response_starts)):
        if not 1 <= s < len(t):
            raise ValueError(f"sequence {i}: response start {s} outside 1..{len(t) - 1}")
        ids[i, :len(t)] = torch.tensor(t)
        mask[i, s - 1:len(t) - 1] = 1
    ids, mask = ids.to(device), mask.to(device)
    lp = get_response_log_probs(model, ids[:, :-1], ids[:, 1:])["log_probs"]
    return (lp * mask).sum(-1)


def compute_per_instance_dpo_loss(lm, lm_ref, tokenizer, beta: float, prompt: str, response_chosen: str,
                                  response_rejected: str, template: str | None = None,
                                  eos_token: str | None = "<|endoftext|>") -> torch.Tensor:
    """DPO loss of one preference pair (scalar, with gradient through ``lm``).

    The prompt is formatted with ``template`` (a template text with one field; None: the Alpaca
    template, as in CS336 assignment 5), each response gets ``eos_token`` appended, and the
    log-probs of the whole sequences are compared (the prompt's terms cancel in the
    difference). lm, lm_ref: callables ``input_ids -> logits``; tokenizer: ``encode``."""
    from lmrun.align.prompts import format_prompt, load_prompt, template_fields

    template = load_prompt("alpaca") if template is None else template
    fields = template_fields(template)
    text = format_prompt(template, **{f: prompt for f in fields})
    suffix = eos_token or ""
    seqs = [list(tokenizer.encode(text + response_chosen + suffix)),
            list(tokenizer.encode(text + response_rejected + suffix))]
    starts = [1, 1]
    with torch.no_grad():
        ref = sequence_log_probs(lm_ref, seqs, starts)
    pol = sequence_log_probs(lm, seqs, starts)
    loss, _ = dpo_loss(pol[:1], pol[1:], ref[:1], ref[1:], beta)
    return loss
