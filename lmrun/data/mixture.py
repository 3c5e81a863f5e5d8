"""Data mixtures: several sources weighted by size (``data.mixture``), realised by choosing documents.

Definition (used for token arrays, where sizes are tokens, and for the tokenizer's training
text, where sizes are UTF-8 bytes): with normalised weights ``w_i`` and source sizes ``n_i``
(the whole split of source i, in documents of sizes ``s_ij``), the mixture has
``total = sum_i n_i`` units (or an explicit total) and source i gets the budget
``b_i = w_i * total``. Source i contributes ``floor(b_i / n_i)`` whole passes over its
documents (in order) plus, for the remainder, the shortest prefix of a seeded random permutation
of its documents whose size is closest to the remainder — so a source larger than its budget is
truncated to a random subset of its documents and a smaller one is repeated. Documents are never
cut: each source's realised share is within half its largest document of its budget. The chosen
documents of all sources are then written in one seeded random order (documents interleaved).
The seed is ``data.seed`` (per source: ``[seed, i]``), so a mixture is the same across runs.

Validation splits are mixed without repetition: ``total = min_i n_i / w_i`` (the largest total
that no source has to repeat for).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np


def select_documents(sizes: Sequence[np.ndarray], weights: Sequence[float], seed: int,
                     total: float | None = None) -> list[np.ndarray]:
    """Per source, the indices of its chosen documents (with repeats), as defined in the module
    docstring. ``sizes[i]``: the document sizes of source i (tokens or bytes, each > 0);
    ``weights``: normalised (sum 1); ``total``: units in the mixture (default: all sources' sum).
    Raises ValueError for a source without documents."""
    sizes = [np.asarray(s, dtype=np.int64) for s in sizes]
    if total is None:
        total = float(sum(int(s.sum()) for s in sizes))
    picks = []
    for i, (s, w) in enumerate(zip(sizes, weights)):
        n = int(s.sum())
        if len(s) == 0 or n <= 0:
            raise ValueError(f"source {i} has no documents")
        budget = w * total
        full = int(budget // n)
        rest = budget - full * n
        perm = np.random.default_rng([seed, i]).permutation(len(s))
        cum = np.cumsum(s[perm])
        k = int(np.searchsorted(cum, rest))  # cum[k-1] < rest <= cum[k]
        if k < len(s):
            below = cum[k - 1] if k > 0 else 0
            k = k if rest - below <= cum[k] - rest else k + 1
        index = np.int32 if len(s) < 1 << 31 else np.int64
        picks.append(np.concatenate([np.tile(np.arange(len(s), dtype=index), full), perm[:k].astype(index)]))
        del perm, cum
    return picks


def interleave(picks: list[np.ndarray], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(source index, document index) arrays of all picks in one seeded random order."""
    src = np.concatenate([np.full(len(p), i, dtype=np.int16) for i, p in enumerate(picks)])
    doc = np.concatenate(picks)
    order = np.random.default_rng([seed, 1 << 20]).permutation(len(doc))
    if len(doc) < 1 << 31:
        order = order.astype(np.int32)
    return src[order], doc[order]


def write_mixture(ends: Sequence[np.ndarray], read: Callable[[int, int, int], np.ndarray | bytes], write: Callable,
                  weights: Sequence[float], seed: int, total: float | None = None,
                  flush_units: int = 1 << 22, also: Sequence[np.ndarray] | None = None) -> dict:
    """Choose (``select_documents``) and write a mixture. ``ends[i]``: source i's document end
    offsets (cumulative, units); ``read(i, start, end)``: those units of source i (bytes or a
    numpy array); ``write(list_of_chunks)``: appends them to the output. Returns per source
    ``{"documents", "units", "passes"}`` and the realised ``shares``; with ``also`` (per source,
    its documents' sizes in another unit, e.g. UTF-8 bytes) also ``"also"``, the chosen
    documents' total in that unit. Memory: O(documents) —
    about 50 bytes per document of the inputs and the output — plus ``flush_units`` units."""
    picks = select_documents([np.diff(e, prepend=0) for e in ends], weights, seed, total)
    src, doc = interleave(picks, seed)
    units = np.zeros(len(ends), dtype=np.int64)
    buf, pending = [], 0
    step = 1 << 16  # picks converted to Python ints a slice at a time (memory: ~50 bytes per document)
    for k in range(0, len(src), step):
        for s, d in zip(src[k:k + step].tolist(), doc[k:k + step].tolist()):
            a, b = (int(ends[s][d - 1]) if d else 0), int(ends[s][d])
            buf.append(read(s, a, b))
            units[s] += b - a
            pending += b - a
            if pending >= flush_units:
                write(buf)
                buf, pending = [], 0
    if buf:
        write(buf)
    got = int(units.sum())
    rows = [{"documents": int(len(p)), "units": int(u), "passes": round(float(u) / max(int(e[-1]), 1), 4),
             "share": round(float(u) / max(got, 1), 6)} for p, u, e in zip(picks, units, ends)]
    if also is not None:
        for row, p, a in zip(rows, picks, also):
            row["also"] = int(np.asarray(a, dtype=np.int64)[p].sum())
    return {"total": got, "sources": rows}


__all__ = ["select_documents", "interleave", "write_mixture"]
