"""Byte-level BPE training from scratch.

Sources: Sennrich, Haddow & Birch 2016, "Neural Machine Translation of Rare Words with
Subword Units" (BPE merges); Radford et al. 2019, "Language Models are Unsupervised Multitask
Learners" (GPT-2: byte-level BPE over regex pre-tokens); Stanford CS336 assignment 1
(``train_bpe``'s interface, the tie-break rule and the incremental algorithm).

Training has two phases: counting pre-tokens (:func:`lmrun.tokenizer.pretokenize.count_pretokens`,
parallel over file chunks) and the merge loop over the distinct pre-tokens
(:func:`train_bpe_from_counts`). The merge loop runs in the C extension
``lmrun.tokenizer._bpe`` or, without it, in an equivalent pure-Python implementation.

The rules both backends follow (checked against a naive reference in the tests):

- each step merges the adjacent pair with the highest count, summed over all pre-tokens
  weighted by their counts; ties go to the greatest ``(bytes(left), bytes(right))``, compared
  as Python compares tuples of bytes;
- a merge replaces the non-overlapping occurrences of the pair left to right in every
  pre-token;
- tokens are identified by their bytes: a merge whose result equals the bytes of an existing
  (non-special) token reuses that token (the merge is still recorded, the vocab does not grow).
  With left-to-right merging this never actually happens: the bytes of a token always split
  the same way at every earlier step (its outer boundaries persist, so its inside evolves as
  the word of its bytes alone), hence each token is made by exactly one pair at one step; the
  rule is kept as a guard and matches HF ``tokenizers``;
- training stops when the vocab has ``vocab_size`` entries or no pair is left.
"""
from __future__ import annotations

import heapq
import importlib
import logging
import os
from array import array
from itertools import accumulate

from lmrun.errors import ConfigError, LmrunError
from lmrun.tokenizer.pretokenize import count_pretokens

log = logging.getLogger(__name__)

BACKENDS = ("auto", "c", "python")
_warned_no_c = False


def _check_args(vocab_size: int, special_tokens: list[str] | None, backend: str) -> list[str]:
    specials = list(dict.fromkeys(special_tokens or []))  # drop repeats, keep order
    for s in specials:
        if not isinstance(s, str) or not s:
            raise ConfigError(f"special_tokens: every special token must be a non-empty string, got {s!r}")
    minimum = 256 + len(specials)
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < minimum:
        raise ConfigError(
            f"vocab_size={vocab_size!r} is too small: the minimum is {minimum} "
            f"(256 byte tokens + {len(specials)} special tokens)"
        )
    if backend not in BACKENDS:
        raise ConfigError(f"backend={backend!r} is not allowed; choose one of {', '.join(BACKENDS)}")
    return specials


def _resolve_backend(backend: str) -> str:
    global _warned_no_c
    if backend == "python":
        return "python"
    try:
        importlib.import_module("lmrun.tokenizer._bpe")
    except ImportError as e:
        if backend == "c":
            raise LmrunError(
                "the C extension lmrun.tokenizer._bpe is not built "
                "(run `python setup.py build_ext --inplace` or `pip install -e .` with a C compiler), "
                "or use backend='python'"
            ) from e
        if not _warned_no_c:
            log.warning("lmrun.tokenizer._bpe (C extension) is not built; BPE training uses the slower pure-Python merge loop")
            _warned_no_c = True
        return "python"
    return "c"


def train_bpe(
    input_path: str | os.PathLike,
    vocab_size: int,
    special_tokens: list[str] | None = None,
    *,
    num_workers: int | None = None,
    backend: str = "auto",
    progress: bool = False,
) -> tuple[dict[int, bytes], list[tuple[bytes, bytes]]]:
    """Train a byte-level BPE tokenizer on a UTF-8 text file.

    Args:
        input_path: the training text (UTF-8). Special tokens in it split the text and are
            never part of a pre-token or a merge.
        vocab_size: the final number of vocab entries (special tokens + 256 bytes + merged
            tokens); fewer if the text runs out of pairs first.
        special_tokens: strings that get their own ids, first, in the given order (a repeated
            string is kept once). Their occurrences are cut out of the text before
            pre-tokenization, so no learned token contains one.
        num_workers: processes for pre-tokenization (None: ``os.cpu_count()``).
        backend: ``"c"`` (the C extension), ``"python"`` (pure Python, same algorithm),
            ``"auto"`` (C if built, else Python with a one-time warning).
        progress: show a progress bar (MB pre-tokenized).

    Returns:
        ``(vocab, merges)``: ``vocab`` maps id -> token bytes, ids 0..S-1 being the S special
        tokens, S..S+255 the single bytes (byte b at S+b), then one id per new token in
        merge order; ``merges`` lists the merged pairs ``(left bytes, right bytes)`` in the
        order they were made (its length can exceed the number of new tokens when a merge
        reproduces an existing token).

    Raises:
        ConfigError: vocab_size < 256 + number of special tokens, or an unknown backend.
        DataError: the file is missing, empty or not valid UTF-8.
        LmrunError: backend="c" and the extension is not built.
    """
    specials = _check_args(vocab_size, special_tokens, backend)
    backend = _resolve_backend(backend)
    counts = count_pretokens(input_path, specials, num_workers=num_workers, progress=progress)
    return train_bpe_from_counts(counts, vocab_size, specials, backend=backend)


def train_bpe_from_counts(
    word_counts: dict[bytes, int],
    vocab_size: int,
    special_tokens: list[str] | None = None,
    backend: str = "auto",
) -> tuple[dict[int, bytes], list[tuple[bytes, bytes]]]:
    """The merge phase of :func:`train_bpe` alone: BPE over distinct pre-tokens.

    Args:
        word_counts: {pre-token bytes: occurrences (> 0)}, e.g. from
            :func:`lmrun.tokenizer.pretokenize.count_pretokens`.
        vocab_size, special_tokens, backend: as in :func:`train_bpe`.

    Returns ``(vocab, merges)`` as :func:`train_bpe` does. Raises ConfigError and LmrunError
    as :func:`train_bpe` does, ValueError if a count is not positive.
    """
    specials = _check_args(vocab_size, special_tokens, backend)
    backend = _resolve_backend(backend)
    max_new = vocab_size - 256 - len(specials)
    if backend == "c":
        _bpe = importlib.import_module("lmrun.tokenizer._bpe")
        words = list(word_counts)
        offsets = array("q", [0])
        offsets.extend(accumulate(map(len, words)))
        counts = array("q", word_counts.values())
        triples = _bpe.train(b"".join(words), offsets, counts, max_new)
    else:
        triples = _merge_loop_python(word_counts, max_new)

    # internal ids: 0..255 bytes, 256.. new tokens; public ids are shifted by S
    S = len(specials)
    vocab: dict[int, bytes] = {i: s.encode("utf-8") for i, s in enumerate(specials)}
    tokens = [bytes([b]) for b in range(256)]
    merges: list[tuple[bytes, bytes]] = []
    for a, b, n in triples:
        if n == len(tokens):
            tokens.append(tokens[a] + tokens[b])
        merges.append((tokens[a], tokens[b]))
    for i, t in enumerate(tokens):
        vocab[S + i] = t
    return vocab, merges


class _Desc:
    """Heap key for a pair: orders (left bytes, right bytes) descending, so that Python's
    min-heap pops the greatest pair among equal counts."""

    __slots__ = ("key",)

    def __init__(self, key: tuple[bytes, bytes]):
        self.key = key

    def __lt__(self, other: "_Desc") -> bool:
        return self.key > other.key

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Desc) and self.key == other.key


def _merge_loop_python(word_counts: dict[bytes, int], max_new: int) -> list[tuple[int, int, int]]:
    """Pure-Python twin of the C merge loop (``_bpe.c``): same data structures (pair counts,
    pair -> words index, max-heap with lazy invalidation), same results. Returns the merges
    as (left id, right id, result id) with ids 0..255 = bytes and 256.. = new tokens."""
    tokens = [bytes([b]) for b in range(256)]
    token_id: dict[bytes, int] = {}  # multi-byte token bytes -> id
    words: list[list[int]] = []
    wcounts: list[int] = []
    pair_count: dict[tuple[int, int], int] = {}
    pair_words: dict[tuple[int, int], set[int]] = {}
    for w, c in word_counts.items():
        if c <= 0:
            raise ValueError(f"every word count must be > 0, got {c} for {w!r}")
        if len(w) < 2:
            continue
        idx = len(words)
        ids = list(w)
        words.append(ids)
        wcounts.append(c)
        for p in zip(ids, ids[1:]):
            pair_count[p] = pair_count.get(p, 0) + c
            s = pair_words.get(p)
            if s is None:
                pair_words[p] = {idx}
            else:
                s.add(idx)

    def entry(p: tuple[int, int], c: int):
        return (-c, _Desc((tokens[p[0]], tokens[p[1]])), p)

    heap = [entry(p, c) for p, c in pair_count.items() if c > 0]
    heapq.heapify(heap)
    out: list[tuple[int, int, int]] = []
    created = 0
    while created < max_new and heap:
        negc, _, p = heapq.heappop(heap)
        cur = pair_count.get(p, 0)
        if -negc != cur:
            if cur > 0:
                heapq.heappush(heap, entry(p, cur))
            continue
        if cur <= 0:
            continue
        a, b = p
        nb = tokens[a] + tokens[b]
        n = token_id.get(nb)
        if n is None:
            n = len(tokens)
            tokens.append(nb)
            token_id[nb] = n
            created += 1
        out.append((a, b, n))
        touched: set[tuple[int, int]] = set()
        for wi in pair_words.pop(p, ()):
            old = words[wi]
            L = len(old)
            c = wcounts[wi]
            new: list[int] = []
            merged: list[bool] = []  # whether new[j] was made by this merge
            changed_old: list[tuple[int, int]] = []
            i = 0
            while i < L:
                if i + 1 < L and old[i] == a and old[i + 1] == b:
                    # the pairs around and inside the occurrence disappear
                    if i > 0 and not (merged and merged[-1]):
                        changed_old.append((old[i - 1], a))
                    changed_old.append((a, b))
                    if i + 2 < L:
                        changed_old.append((b, old[i + 2]))
                    new.append(n)
                    merged.append(True)
                    i += 2
                else:
                    new.append(old[i])
                    merged.append(False)
                    i += 1
            if not changed_old:
                continue  # stale index entry: the word no longer holds the pair
            for q in changed_old:
                pair_count[q] -= c
            words[wi] = new
            for j in range(len(new) - 1):
                if merged[j] or merged[j + 1]:
                    q = (new[j], new[j + 1])
                    pair_count[q] = pair_count.get(q, 0) + c
                    s = pair_words.get(q)
                    if s is None:
                        pair_words[q] = {wi}
                    else:
                        s.add(wi)
                    touched.add(q)
        for q in touched:
            c = pair_count[q]
            if c > 0:
                heapq.heappush(heap, entry(q, c))
    return out
