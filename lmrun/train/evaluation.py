"""Validation loss over a whole token array, and its conversion to bits per byte.

The loss is the exact token-weighted mean of the per-token cross-entropy (nats per predicted
token); every token after the first is predicted once. By default the windows are consecutive
and non-overlapping, each starting with an empty context: the standard "chunked" validation loss
(nanoGPT, CS336). With ``stride < context_length`` the windows overlap and each scores only its
last ``stride`` predictions, so every token but those of the first window sees at least
``context_length - stride`` tokens of context: the sliding-window evaluation (Press et al. 2021,
"Shortformer", section 4; the Hugging Face perplexity guide), lower and closer to the model's
loss with a full context, at ``context_length / stride`` times the compute.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import numpy as np
import torch

from lmrun.errors import DataError
from lmrun.train.data import _gather, windows_to_tensors
from lmrun.train.loss import cross_entropy

__all__ = ["bits_per_byte", "evaluate_loss"]


def evaluate_loss(model: torch.nn.Module, dataset: np.ndarray, batch_size: int, context_length: int,
                  device="cpu", max_tokens: int | None = None, autocast_dtype: torch.dtype | None = None,
                  stride: int | None = None, progress: Callable[[int], None] | None = None) -> dict:
    """Mean next-token cross-entropy of ``model`` over a token array, in one sequential pass.

    Args:
        model: maps int64 token ids ``(batch, seq)`` to logits ``(batch, seq, vocab)``.
        dataset: 1-D token array (a ``numpy.memmap`` works; read window by window).
        batch_size: windows per forward pass. context_length: tokens per window (inputs).
        device: where the model lives; batches are moved there.
        max_tokens: evaluate only the first ``max_tokens`` tokens of the array (None: all).
        autocast_dtype: e.g. ``torch.bfloat16`` to run the forward pass under ``torch.autocast``
            (None: the model's own precision). The loss is accumulated in float64 either way.
        stride: tokens between window starts, ``1 <= stride <= context_length`` (None or
            ``context_length``: non-overlapping windows). Smaller strides give each prediction
            more context and cost ``context_length / stride`` times the forward passes.
        progress: called after each forward pass with the number of predictions it scored (they
            add up to ``n - 1``), e.g. ``lmrun.tracking.progress.Progress.update`` (None: silent).

    The ``n`` tokens evaluated give ``n - 1`` predictions: windows ``[s, s + context_length)`` at
    ``s = 0, context_length, 2·context_length, ...`` predict tokens ``s + 1 ... s + context_length``;
    the last, partial window (fewer than ``context_length`` predictions) is included, so every
    token ``1 ... n - 1`` is predicted exactly once.

    With a stride ``r < context_length``, window ``k`` holds inputs ``[k·r, k·r + context_length)``
    and scores only the predictions no earlier window made (its last ``r``; the first window
    scores all of its own); the last window ends at token ``n - 1``.

    Returns ``{"loss": nats per predicted token, "perplexity": exp(loss), "tokens": n - 1}``.
    Runs under ``torch.no_grad`` with ``model.eval()`` and restores the model's train/eval mode.
    Raises DataError if fewer than 2 tokens are evaluated; ValueError for batch_size or
    context_length < 1 or a stride outside ``[1, context_length]``.
    """
    if batch_size < 1 or context_length < 1:
        raise ValueError(f"batch_size={batch_size}, context_length={context_length}: expected integers >= 1")
    if stride is not None and not 1 <= stride <= context_length:
        raise ValueError(f"stride={stride}: expected an integer in [1, context_length={context_length}]")
    n = len(dataset) if max_tokens is None else min(int(max_tokens), len(dataset))
    if n < 2:
        raise DataError(f"validation data has {n} token(s) to evaluate: at least 2 are needed for one prediction")
    device = device if isinstance(device, torch.device) else torch.device(device)
    autocast = (torch.autocast(device_type=device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), autocast:
            if stride is None or stride == context_length:
                total = _chunked_sum(model, dataset, n, batch_size, context_length, device, progress)
            else:
                total = _strided_sum(model, dataset, n, batch_size, context_length, device, stride, progress)
    finally:
        model.train(was_training)
    loss = total / (n - 1)
    return {"loss": loss, "perplexity": math.exp(loss) if loss < 700 else math.inf, "tokens": n - 1}


def _chunked_sum(model, dataset, n: int, batch_size: int, context_length: int, device, progress=None) -> float:
    """Summed loss of targets 1 .. n-1 over non-overlapping windows (the last one partial)."""
    full, rest = divmod(n - 1, context_length)
    total = 0.0
    for first in range(0, full, batch_size):
        starts = np.arange(first, min(first + batch_size, full), dtype=np.int64) * context_length
        x, y = windows_to_tensors(_gather(dataset, starts, context_length + 1), device)
        total += cross_entropy(model(x), y, reduction="sum").item()
        if progress is not None:
            progress(len(starts) * context_length)
    if rest:
        s = full * context_length
        x, y = windows_to_tensors(np.asarray(dataset[s:s + rest + 1])[None, :], device)
        total += cross_entropy(model(x), y, reduction="sum").item()
        if progress is not None:
            progress(rest)
    return total


def _strided_sum(model, dataset, n: int, batch_size: int, context_length: int, device, stride: int,
                 progress=None) -> float:
    """Summed loss of targets 1 .. n-1 over windows every ``stride`` tokens; each window's
    already-scored targets are set to ``ignore_index`` so that each prediction counts once."""
    # full windows start at 0, r, 2r, ... while they end at or before token n - 1; one more
    # window ending at n - 1 (if needed) covers the rest
    last_full = (n - 1 - context_length) // stride if n - 1 >= context_length else -1
    starts = np.arange(last_full + 1, dtype=np.int64) * stride
    covered = int(starts[-1]) + context_length if len(starts) else 0  # targets 1 .. covered are scored
    positions = torch.arange(context_length, device=device)[None, :]
    total = 0.0
    for first in range(0, len(starts), batch_size):
        s = starts[first:first + batch_size]
        x, y = windows_to_tensors(_gather(dataset, s, context_length + 1), device)
        seen = torch.full((len(s), 1), context_length - stride, device=device)
        if first == 0:
            seen[0] = 0  # the first window scores every prediction
        y = y.masked_fill(positions < seen, -100)
        total += cross_entropy(model(x), y, ignore_index=-100, reduction="sum").item()
        if progress is not None:
            progress(int((y != -100).sum()))
    if covered < n - 1:
        s = max(0, n - 1 - context_length)
        x, y = windows_to_tensors(np.asarray(dataset[s:n])[None, :], device)
        y = y.masked_fill(positions[:, :y.shape[1]] < covered - s, -100)
        total += cross_entropy(model(x), y, ignore_index=-100, reduction="sum").item()
        if progress is not None:
            progress(n - 1 - covered)
    return total


def bits_per_byte(loss_nats_per_token: float, bytes_per_token: float) -> float:
    """Convert a loss in nats per token to bits per byte of text: ``loss / ln 2 / bytes_per_token``.

    ``bytes_per_token``: UTF-8 bytes of the evaluated text divided by its token count (the
    ``encode`` stage records it per split in ``meta.json``). Bits per byte compares models with
    different tokenizers. Raises ValueError if ``bytes_per_token <= 0``.
    """
    if not bytes_per_token > 0:
        raise ValueError(f"bytes_per_token={bytes_per_token}: expected a number > 0")
    return float(loss_nats_per_token) / math.log(2) / float(bytes_per_token)
