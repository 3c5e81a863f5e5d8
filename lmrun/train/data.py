"""Token data for training: memory-mapped token arrays, random windows, mixtures, a resumable stream.

The token arrays are the flat files the ``encode`` stage writes (``train.bin`` / ``val.bin``:
token ids, uint16 or uint32, no header). :func:`get_batch` is CS336 assignment 1's data loader:
``batch_size`` windows of ``context_length + 1`` tokens at uniformly random starts, split into
inputs and next-token targets. :class:`MixtureSampler` draws each sequence's source array with
given weights; :class:`BatchStream` wraps either with its own seeded numpy ``Generator`` and a
step count, and saves/restores both so a resumed run reads the same batches it would have read.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from lmrun.errors import DataError

__all__ = ["BatchStream", "MixtureSampler", "get_batch", "load_tokens", "windows_to_tensors"]


def load_tokens(path: str | os.PathLike, dtype: str | np.dtype = "uint16") -> np.memmap:
    """Open a flat token file read-only as a 1-D ``numpy.memmap`` of ``dtype`` (the ``dtype`` the
    ``encode`` stage records in ``meta.json``: uint16 or uint32). Nothing is read until indexed.

    Raises DataError (one line naming the file) if the file is missing, empty, or its size is not
    a multiple of the item size (the wrong dtype, or a truncated file)."""
    path = Path(path)
    dtype = np.dtype(dtype)
    if not path.is_file():
        raise DataError(f"{path}: no such token file")
    size = path.stat().st_size
    if size == 0:
        raise DataError(f"{path}: empty token file (0 tokens)")
    if size % dtype.itemsize:
        raise DataError(f"{path}: {size} bytes is not a whole number of {dtype.name} tokens "
                        f"(wrong dtype or a truncated file)")
    return np.memmap(path, dtype=dtype, mode="r")


def _check_lengths(n: int, batch_size: int, context_length: int, what: str = "token array") -> None:
    if batch_size < 1 or context_length < 1:
        raise ValueError(f"batch_size={batch_size}, context_length={context_length}: expected integers >= 1")
    if n < context_length + 1:
        raise DataError(f"{what} has {n} tokens: a window needs context_length + 1 = {context_length + 1}")


def _as_device(device) -> torch.device:
    return device if isinstance(device, torch.device) else torch.device(device)


def windows_to_tensors(windows: np.ndarray, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``windows (batch, context_length + 1)`` token ids -> ``(x, y)``: ``x = windows[:, :-1]``,
    ``y = windows[:, 1:]``, each ``(batch, context_length)`` int64 contiguous on ``device``
    (through pinned memory with a non-blocking copy for CUDA)."""
    device = _as_device(device)
    both = torch.from_numpy(np.ascontiguousarray(windows, dtype=np.int64))
    if device.type == "cuda":
        both = both.pin_memory().to(device, non_blocking=True)
    elif device.type != "cpu":
        both = both.to(device)
    return both[:, :-1].contiguous(), both[:, 1:].contiguous()


def _gather(dataset: np.ndarray, starts: np.ndarray, length: int) -> np.ndarray:
    """Rows ``dataset[s : s + length]`` for each start, as one ``(len(starts), length)`` array."""
    return dataset[starts[:, None] + np.arange(length)]


def get_batch(dataset: np.ndarray, batch_size: int, context_length: int, device="cpu",
              generator: np.random.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample ``batch_size`` random windows from a 1-D token array (CS336 assignment 1).

    Args:
        dataset: 1-D integer array of token ids (a ``numpy.memmap`` of uint16/uint32 works; only
            the sampled windows are read).
        batch_size, context_length: windows per batch and tokens per window (inputs).
        device: where the tensors go (``"cpu"``, ``"cuda:0"``, a ``torch.device``).
        generator: a numpy ``Generator`` to draw the starts from; None uses numpy's global RNG
            (``np.random.randint``), as the CS336 reference loader does.

    Returns:
        ``(x, y)``, each ``(batch_size, context_length)`` int64 on ``device``; with ``s`` the
        window's start, ``x[b, j] = dataset[s + j]`` and ``y[b, j] = dataset[s + j + 1]``. Starts
        are uniform over ``[0, len(dataset) - context_length - 1]`` (every full window possible).

    Raises DataError if ``len(dataset) < context_length + 1``; ValueError if ``batch_size`` or
    ``context_length`` < 1.
    """
    n = len(dataset)
    _check_lengths(n, batch_size, context_length)
    high = n - context_length  # exclusive upper bound of the start
    if generator is None:
        starts = np.random.randint(0, high, size=batch_size)
    else:
        starts = generator.integers(0, high, size=batch_size)
    return windows_to_tensors(_gather(dataset, starts, context_length + 1), device)


class MixtureSampler:
    """Batches whose sequences come from several token arrays, each sequence's source drawn with
    probability ``weights[i] / sum(weights)`` (independently per sequence), then a uniformly random
    window in that source as in :func:`get_batch`.

    Args:
        datasets: the 1-D token arrays (memmaps work).
        weights: one non-negative weight per array, not all zero (normalised here).
        seed: seed of the sampler's own numpy ``Generator`` (used when ``sample`` gets none).
        names: labels for the sources (default ``"0"``, ``"1"``, ...), used in ``counts``.

    ``counts`` holds how many sequences each source has supplied so far. ``state_dict()`` /
    ``load_state_dict()`` save and restore the generator and the counts (plain Python values:
    JSON-able and ``torch.load(weights_only=True)``-safe), so a restored sampler continues the
    same stream. Raises ValueError for mismatched or invalid weights, DataError if an array with
    a non-zero weight is shorter than the window being sampled.
    """

    def __init__(self, datasets: Sequence[np.ndarray], weights: Sequence[float], seed: int = 0,
                 names: Sequence[str] | None = None):
        if not datasets:
            raise ValueError("MixtureSampler needs at least one token array")
        if len(weights) != len(datasets):
            raise ValueError(f"{len(weights)} weights for {len(datasets)} token arrays: expected one weight per array")
        w = np.asarray(weights, dtype=np.float64)
        if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
            raise ValueError(f"mixture weights {list(weights)}: expected finite numbers >= 0, not all zero")
        self.datasets = list(datasets)
        self.weights = (w / w.sum()).tolist()
        self.names = [str(n) for n in names] if names is not None else [str(i) for i in range(len(datasets))]
        if len(self.names) != len(self.datasets):
            raise ValueError(f"{len(self.names)} names for {len(self.datasets)} token arrays")
        self.rng = np.random.default_rng(seed)
        self.counts = [0] * len(self.datasets)

    def sample(self, batch_size: int, context_length: int, device="cpu",
               generator: np.random.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch ``(x, y)``, each ``(batch_size, context_length)`` int64 on ``device``, row
        ``b`` a window of the source drawn for it; ``generator`` overrides the sampler's own."""
        rng = generator if generator is not None else self.rng
        for i, (d, w) in enumerate(zip(self.datasets, self.weights)):
            if w > 0:
                _check_lengths(len(d), batch_size, context_length, f"token array {self.names[i]!r} of the mixture")
        sources = rng.choice(len(self.datasets), size=batch_size, p=self.weights)
        windows = np.empty((batch_size, context_length + 1), dtype=np.int64)
        for i in np.unique(sources):
            rows = np.flatnonzero(sources == i)
            d = self.datasets[i]
            starts = rng.integers(0, len(d) - context_length, size=len(rows))
            windows[rows] = _gather(d, starts, context_length + 1)
            self.counts[i] += len(rows)
        return windows_to_tensors(windows, device)

    def proportions(self) -> dict[str, float]:
        """Fraction of the sequences sampled so far that came from each source (by name)."""
        total = max(sum(self.counts), 1)
        return {name: c / total for name, c in zip(self.names, self.counts)}

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "counts": list(self.counts), "weights": list(self.weights),
                "names": list(self.names)}

    def load_state_dict(self, state: dict) -> None:
        """Restore the generator and counts. The weights and names are kept from the constructor
        (a resumed run may re-weight); the saved ones are informational."""
        self.rng.bit_generator.state = _plain_rng_state(state["rng"])
        counts = list(state.get("counts", self.counts))
        self.counts = counts if len(counts) == len(self.datasets) else [0] * len(self.datasets)


def _plain_rng_state(state: dict) -> dict:
    """A copy of a saved numpy bit-generator state (nested dicts of ints and strs), to set."""
    return {k: (_plain_rng_state(v) if isinstance(v, dict) else v) for k, v in state.items()}


class BatchStream:
    """A reproducible, resumable stream of training batches (the trainer's data position).

    Args:
        data: a 1-D token array (windows as :func:`get_batch`) or a :class:`MixtureSampler`.
        batch_size, context_length: the shape of every batch.
        seed: seed of the stream's numpy ``Generator`` (PCG64). Give each data-parallel rank its
            own, e.g. ``seed + rank``, so ranks read different windows.

    ``next(device)`` returns ``(x, y)``, each ``(batch_size, context_length)`` int64, and advances
    ``step`` (batches drawn). ``state_dict()`` holds the generator state, ``step`` and the
    mixture's counts as plain Python values (JSON-able, ``weights_only``-safe);
    ``load_state_dict()`` restores them, after which ``next`` yields exactly the batches the
    original stream would have yielded. Raises DataError/ValueError as :func:`get_batch`, here
    already in the constructor.
    """

    def __init__(self, data, batch_size: int, context_length: int, seed: int = 0):
        self.data, self.batch_size, self.context_length, self.seed = data, int(batch_size), int(context_length), seed
        self.rng = np.random.default_rng(seed)
        self.step = 0
        if isinstance(data, MixtureSampler):
            for i, (d, w) in enumerate(zip(data.datasets, data.weights)):
                if w > 0:
                    _check_lengths(len(d), self.batch_size, self.context_length,
                                   f"token array {data.names[i]!r} of the mixture")
        else:
            if getattr(data, "ndim", 1) != 1:
                raise ValueError(f"token array of shape {getattr(data, 'shape', '?')}: expected a 1-D array")
            _check_lengths(len(data), self.batch_size, self.context_length)

    def next(self, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(self.data, MixtureSampler):
            batch = self.data.sample(self.batch_size, self.context_length, device, generator=self.rng)
        else:
            batch = get_batch(self.data, self.batch_size, self.context_length, device, generator=self.rng)
        self.step += 1
        return batch

    def __iter__(self):
        while True:
            yield self.next()

    def state_dict(self) -> dict:
        state = {"seed": self.seed, "step": self.step, "rng": self.rng.bit_generator.state,
                 "batch_size": self.batch_size, "context_length": self.context_length}
        if isinstance(self.data, MixtureSampler):
            state["mixture"] = self.data.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = _plain_rng_state(state["rng"])
        self.step = int(state["step"])
        if isinstance(self.data, MixtureSampler) and "mixture" in state:
            self.data.load_state_dict(state["mixture"])
