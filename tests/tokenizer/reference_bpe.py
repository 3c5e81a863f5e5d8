"""A deliberately naive BPE trainer: the reference the fast trainers are checked against.

Every step recounts all adjacent pairs over all pre-tokens (tuples of token bytes, weighted
by their counts), takes the max by (count, left bytes, right bytes), and merges it in every
pre-token, left to right, without overlaps. Tokens are their bytes, so a merge that
reproduces an existing token adds no vocab entry (it is still recorded). Stops when the vocab
has ``vocab_size`` entries or no pair is left. Pre-tokenization is done here independently:
the whole text, split on the special tokens (longest first), then the GPT-2 pattern.

Source: Sennrich et al. 2016; the CS336 assignment 1 handout (tie-break rule).
"""
from __future__ import annotations

import re
from collections import Counter

import regex

GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def naive_pretoken_counts(text: str, special_tokens: list[str]) -> dict[bytes, int]:
    """{pre-token bytes: count} of the whole text in one pass."""
    pieces = [text]
    if special_tokens:
        alt = "|".join(re.escape(s) for s in sorted(special_tokens, key=len, reverse=True))
        pieces = re.split(alt, text)
    counts: Counter[bytes] = Counter()
    pat = regex.compile(GPT2_PATTERN)
    for piece in pieces:
        for m in pat.finditer(piece):
            counts[m.group().encode("utf-8")] += 1
    return dict(counts)


def naive_train_from_counts(
    word_counts: dict[bytes, int], vocab_size: int, special_tokens: list[str]
) -> tuple[dict[int, bytes], list[tuple[bytes, bytes]]]:
    vocab: dict[int, bytes] = {i: s.encode("utf-8") for i, s in enumerate(special_tokens)}
    for b in range(256):
        vocab[len(vocab)] = bytes([b])
    known = set(vocab.values()) - {s.encode("utf-8") for s in special_tokens} | {bytes([b]) for b in range(256)}
    words = {tuple(bytes([x]) for x in w): c for w, c in word_counts.items()}
    merges: list[tuple[bytes, bytes]] = []
    while len(vocab) < vocab_size:
        pairs: Counter[tuple[bytes, bytes]] = Counter()
        for w, c in words.items():
            for p in zip(w, w[1:]):
                pairs[p] += c
        if not pairs:
            break
        (a, b), _ = max(pairs.items(), key=lambda kv: (kv[1], kv[0][0], kv[0][1]))
        new = a + b
        merges.append((a, b))
        if new not in known:
            known.add(new)
            vocab[len(vocab)] = new
        merged: dict[tuple[bytes, ...], int] = {}
        for w, c in words.items():
            out = []
            i = 0
            while i < len(w):
                if i + 1 < len(w) and w[i] == a and w[i + 1] == b:
                    out.append(new)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            t = tuple(out)
            merged[t] = merged.get(t, 0) + c
        words = merged
    return vocab, merges


def naive_train_bpe(
    text: str, vocab_size: int, special_tokens: list[str] | None = None
) -> tuple[dict[int, bytes], list[tuple[bytes, bytes]]]:
    """Naive BPE on a string: ``(vocab, merges)`` laid out as ``lmrun.tokenizer.bpe.train_bpe``."""
    special_tokens = list(special_tokens or [])
    return naive_train_from_counts(naive_pretoken_counts(text, special_tokens), vocab_size, special_tokens)
