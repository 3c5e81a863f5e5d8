"""Deduplication: exact lines, and near-duplicate documents by MinHash + LSH.

- Exact lines (CS336 assignment 4; CCNet, Wenzek et al. 2020, dedups paragraphs the same way):
  every line that occurs more than once in the corpus is removed (all copies). Two passes:
  count a 64-bit MurmurHash3 of each line, then keep the lines counted once; memory is one
  counter per distinct line. Blank lines are never counted or removed (they separate
  paragraphs).
- Near duplicates (Broder 1997 "On the resemblance and containment of documents"; Leskovec,
  Rajaraman & Ullman, Mining of Massive Datasets, ch. 3): text normalised (NFD, accents
  removed, lower case, punctuation removed, whitespace collapsed), word n-gram shingles hashed
  to 32 bits, ``num_hashes`` MinHash values from universal hashes ``(a x + b) mod p``
  (p = 2^32 + 15), LSH with ``num_bands`` bands of ``num_hashes / num_bands`` rows; documents
  sharing a band bucket are candidates, confirmed when the exact Jaccard similarity of their
  shingle sets is >= ``jaccard_threshold``; confirmed pairs are clustered with union-find and
  the first document (corpus order) of each cluster is kept.
"""
from __future__ import annotations

import os
import re
import unicodedata
from collections import defaultdict
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

PRIME = (1 << 32) + 15
_PUNCT_RE = re.compile(r"[^\w\s]|_")
_WS_RE = re.compile(r"\s+")
_CHUNK = 4096  # shingles hashed at a time: memory num_hashes x 4096 x 8 bytes
MAX_PAIRS_BUCKET = 64  # buckets larger than this pair each member with the first and the next one only


# --- exact lines ----------------------------------------------------------------------------
def line_key(line: str) -> int:
    """64-bit MurmurHash3 of a line without its line break."""
    import mmh3

    return mmh3.hash64(line.rstrip("\r\n"), signed=False)[0]


def count_lines(texts: Iterable[str]) -> dict[int, int]:
    """Occurrences of each non-blank line (by :func:`line_key`) over ``texts``, capped at 2."""
    counts: dict[int, int] = {}
    for text in texts:
        for line in text.splitlines():
            if line.strip():
                k = line_key(line)
                if counts.get(k, 0) < 2:
                    counts[k] = counts.get(k, 0) + 1
    return counts


def remove_duplicate_lines(text: str, counts: dict[int, int]) -> tuple[str, int]:
    """``text`` without the lines counted more than once; returns (text, lines removed).
    Runs of blank lines left behind are collapsed to one."""
    out, removed = [], 0
    for line in text.splitlines():
        if line.strip() and counts.get(line_key(line), 0) > 1:
            removed += 1
            continue
        if not line.strip() and out and not out[-1].strip():
            continue
        out.append(line)
    return "\n".join(out).strip("\n"), removed


def exact_line_deduplication(input_files: list[str | os.PathLike], output_dir: str | os.PathLike) -> dict:
    """Rewrite each file (one document per file, UTF-8) into ``output_dir`` under the same
    name without the lines that occur more than once across all the files. Returns
    ``{"files", "lines_removed"}``. Raises DataError for a missing file."""
    from lmrun.errors import DataError

    paths = [Path(p) for p in input_files]
    for p in paths:
        if not p.is_file():
            raise DataError(f"exact_line_deduplication: file not found: {p}")
    counts = count_lines(p.read_text(encoding="utf-8", errors="replace") for p in paths)
    out_dir = Path(output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    removed = 0
    for p in paths:
        kept = []
        for line in p.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True):
            if line.strip() and counts.get(line_key(line), 0) > 1:
                removed += 1
            else:
                kept.append(line)
        (out_dir / p.name).write_text("".join(kept), encoding="utf-8")
    return {"files": len(paths), "lines_removed": removed}


# --- MinHash --------------------------------------------------------------------------------
def normalize_text(text: str) -> str:
    """NFD, combining marks (accents) removed, lower case, punctuation removed (replaced by a
    space), whitespace collapsed to single spaces and stripped."""
    text = unicodedata.normalize("NFD", text)
    text = "".join(ch for ch in text if not unicodedata.combining(ch))
    text = _PUNCT_RE.sub(" ", text.lower())
    return _WS_RE.sub(" ", text).strip()


def shingles(text: str, ngrams: int) -> set[int]:
    """32-bit MurmurHash3 of each word ``ngrams``-gram of the normalised text (a text shorter
    than ``ngrams`` words gives one shingle of all its words; an empty text none)."""
    import mmh3

    words = normalize_text(text).split()
    if not words:
        return set()
    if len(words) < ngrams:
        return {mmh3.hash(" ".join(words), signed=False)}
    return {mmh3.hash(" ".join(words[i:i + ngrams]), signed=False) for i in range(len(words) - ngrams + 1)}


def hash_params(num_hashes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(a, b)`` of the ``num_hashes`` universal hashes: a in [1, 2^31), b in [0, 2^32), uint64
    (so ``a * x + b`` with x < 2^32 never overflows 64 bits)."""
    rng = np.random.default_rng(seed)
    a = rng.integers(1, 1 << 31, size=num_hashes, dtype=np.uint64)
    b = rng.integers(0, 1 << 32, size=num_hashes, dtype=np.uint64)
    return a, b


def minhash_signature(shingle_set: set[int], a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """MinHash signature (num_hashes,) uint64 of a shingle set; all ``PRIME`` for an empty set."""
    sig = np.full(a.shape[0], PRIME, dtype=np.uint64)
    if not shingle_set:
        return sig
    x = np.fromiter(shingle_set, dtype=np.uint64, count=len(shingle_set))
    for start in range(0, len(x), _CHUNK):
        chunk = x[start:start + _CHUNK]
        h = (a[:, None] * chunk[None, :] + b[:, None]) % np.uint64(PRIME)
        np.minimum(sig, h.min(axis=1), out=sig)
    return sig


def jaccard(s: set, t: set) -> float:
    """|s ∩ t| / |s ∪ t| (1.0 for two empty sets)."""
    if not s and not t:
        return 1.0
    return len(s & t) / len(s | t)


class UnionFind:
    """Disjoint sets over integers with path halving; ``find`` returns the smallest member as root."""

    def __init__(self):
        self.parent: dict[int, int] = {}

    def find(self, x: int) -> int:
        p = self.parent
        p.setdefault(x, x)
        while p[x] != x:
            p[x] = p[p[x]]
            x = p[x]
        return x

    def union(self, x: int, y: int) -> None:
        rx, ry = self.find(x), self.find(y)
        if rx != ry:
            lo, hi = min(rx, ry), max(rx, ry)
            self.parent[hi] = lo


def lsh_candidates(signatures: np.ndarray, num_bands: int) -> set[tuple[int, int]]:
    """Candidate pairs ``(i, j)``, i < j, of rows of ``signatures`` (num_docs, num_hashes) that
    agree on every row of at least one band. A bucket with more than ``MAX_PAIRS_BUCKET``
    members contributes (first, member) and (member, next member) pairs only — enough to
    connect it in the union-find when the members are true duplicates."""
    n, h = signatures.shape
    rows = h // num_bands
    pairs: set[tuple[int, int]] = set()
    for band in range(num_bands):
        buckets: dict[bytes, list[int]] = defaultdict(list)
        block = np.ascontiguousarray(signatures[:, band * rows:(band + 1) * rows])
        for i in range(n):
            buckets[block[i].tobytes()].append(i)
        for members in buckets.values():
            if len(members) < 2:
                continue
            if len(members) <= MAX_PAIRS_BUCKET:
                pairs.update((members[x], members[y]) for x in range(len(members)) for y in range(x + 1, len(members)))
            else:
                pairs.update((members[0], m) for m in members[1:])
                pairs.update(zip(members[1:], members[2:]))
    return pairs


def find_near_duplicates(texts: Callable[[], Iterator[str]], num_hashes: int = 120, num_bands: int = 20,
                         ngrams: int = 5, jaccard_threshold: float = 0.8, seed: int = 0) -> dict:
    """Near-duplicate clusters of a corpus that ``texts()`` streams (called twice: signatures,
    then the exact Jaccard of the candidates, whose shingle sets are the only ones kept).

    Returns ``{"num_docs", "candidates", "confirmed", "pairs": confirmed (i, j) pairs,
    "clusters": [[doc indices], ...] (size >= 2, sorted), "remove": set of indices (every
    cluster member except its first)}``.
    Memory: num_docs x num_hashes x 8 bytes of signatures plus the candidates' shingles."""
    if num_hashes % num_bands:
        raise ValueError(f"num_bands={num_bands} must divide num_hashes={num_hashes}")
    a, b = hash_params(num_hashes, seed)
    sigs = [minhash_signature(shingles(t, ngrams), a, b) for t in texts()]
    n = len(sigs)
    if n < 2:
        return {"num_docs": n, "candidates": 0, "confirmed": 0, "pairs": [], "clusters": [], "remove": set()}
    matrix = np.stack(sigs)
    del sigs
    empty = np.all(matrix == PRIME, axis=1)
    pairs = {(i, j) for i, j in lsh_candidates(matrix, num_bands) if not empty[i] and not empty[j]}
    need = {i for pair in pairs for i in pair}
    sets: dict[int, set[int]] = {}
    for i, t in enumerate(texts()):
        if i in need:
            sets[i] = shingles(t, ngrams)
    uf = UnionFind()
    confirmed = []
    for i, j in sorted(pairs):
        if jaccard(sets[i], sets[j]) >= jaccard_threshold:
            uf.union(i, j)
            confirmed.append((i, j))
    groups: dict[int, list[int]] = defaultdict(list)
    for x in list(uf.parent):
        groups[uf.find(x)].append(x)
    clusters = sorted(sorted(g) for g in groups.values() if len(g) > 1)
    remove = {x for c in clusters for x in c[1:]}
    return {"num_docs": n, "candidates": len(pairs), "confirmed": len(confirmed), "pairs": confirmed,
            "clusters": clusters, "remove": remove}


def minhash_deduplication(input_files: list[str | os.PathLike], num_hashes: int, num_bands: int, ngrams: int,
                          jaccard_threshold: float, output_dir: str | os.PathLike, seed: int = 0) -> dict:
    """Copy each file (one document per file) into ``output_dir`` unless it is a near
    duplicate of an earlier file (see :func:`find_near_duplicates`). Returns its statistics
    plus ``"kept"`` (file names written). Raises DataError for a missing file, ValueError for
    bands not dividing hashes."""
    from lmrun.errors import DataError

    paths = [Path(p) for p in input_files]
    for p in paths:
        if not p.is_file():
            raise DataError(f"minhash_deduplication: file not found: {p}")
    result = find_near_duplicates(lambda: (p.read_text(encoding="utf-8", errors="replace") for p in paths),
                                  num_hashes, num_bands, ngrams, jaccard_threshold, seed)
    out_dir = Path(output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    kept = []
    for i, p in enumerate(paths):
        if i not in result["remove"]:
            (out_dir / p.name).write_bytes(p.read_bytes())
            kept.append(p.name)
    return {**result, "kept": kept}
