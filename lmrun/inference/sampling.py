"""Autoregressive sampling with temperature, top-k and nucleus (top-p) filtering.

``sample`` is the plain form: every step runs the model on the (cropped) context, without a KV
cache (the baseline of ``lmrun.inference.engine``, which batches prompts and uses the cache).
Source: Holtzman et al. 2020 (nucleus sampling); CS336 assignment 1 (``decode``).
"""
from __future__ import annotations

import torch


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probabilities sum to at least ``top_p`` and
    renormalise. probs: (..., vocab), rows summing to 1; returns the same shape."""
    if top_p >= 1.0:
        return probs
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    cumulative = torch.cumsum(sorted_probs, dim=-1)
    keep_sorted = cumulative - sorted_probs < top_p  # a token stays if the mass before it is < top_p
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    filtered = torch.where(keep, probs, torch.zeros_like(probs))
    return filtered / filtered.sum(dim=-1, keepdim=True)


def top_k_filter(probs: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep the ``top_k`` most likely tokens of each row (ties with the k-th kept too) and
    renormalise. probs: (..., vocab), rows summing to 1; ``top_k`` 0 or >= vocab: unchanged."""
    if top_k <= 0 or top_k >= probs.shape[-1]:
        return probs
    kth = torch.topk(probs, top_k, dim=-1).values[..., -1:]
    filtered = torch.where(probs >= kth, probs, torch.zeros_like(probs))
    return filtered / filtered.sum(dim=-1, keepdim=True)


def sampling_probs(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """The distribution tokens are drawn from: ``softmax(logits / temperature)``, then top-k,
    then top-p. logits ``(..., vocab)`` -> probabilities ``(..., vocab)`` in float32 (float64 for
    float64 logits). ``temperature == 0`` is greedy: one-hot on the argmax (the first on ties).
    Sources: Holtzman et al. 2020 (top-p); Fan et al. 2018 (top-k)."""
    logits = logits if logits.dtype == torch.float64 else logits.float()
    if temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).to(logits.dtype)
    probs = torch.softmax(logits / temperature, dim=-1)
    return top_p_filter(top_k_filter(probs, top_k), top_p)


@torch.no_grad()
def sample(model, prompt: list[int], max_new_tokens: int, *, context_length: int, temperature: float = 1.0,
           top_p: float = 1.0, stop_ids: tuple[int, ...] = (), generator: torch.Generator | None = None) -> list[int]:
    """Sample up to ``max_new_tokens`` token ids after ``prompt`` (a non-empty list of ids).

    The model maps (1, seq) int64 ids to (1, seq, vocab) logits; the context is cropped to the
    last ``context_length`` tokens. temperature 0 is greedy. Stops early after a token in
    ``stop_ids`` (included in the output). Returns only the new ids."""
    if not prompt:
        raise ValueError("prompt must hold at least one token id")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ids = torch.tensor([prompt], dtype=torch.long, device=device)
    out: list[int] = []
    try:
        for _ in range(max_new_tokens):
            logits = model(ids[:, -context_length:])[0, -1].float()
            if temperature == 0:
                nxt = int(torch.argmax(logits))
            else:
                probs = top_p_filter(torch.softmax(logits / temperature, dim=-1), top_p)
                nxt = int(torch.multinomial(probs.cpu(), 1, generator=generator))
            out.append(nxt)
            if nxt in stop_ids:
                break
            ids = torch.cat([ids, torch.tensor([[nxt]], device=device)], dim=1)
    finally:
        model.train(was_training)
    return out
