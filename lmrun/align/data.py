"""Alignment data: prompt/response tokenisation with response masks, JSONL readers, packed SFT
sequences and batch iteration.

Sequences are next-token shifted: for tokens ``x_0 … x_n`` the model reads ``input_ids = x_0 …
x_{n-1}`` and predicts ``labels = x_1 … x_n``; ``response_mask[t]`` is 1 where ``labels[t]`` is a
response token. Source: CS336 assignment 5 (``tokenize_prompt_and_output``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from lmrun.errors import DataError, FormatError


def tokenize_prompt_and_output(prompt_strs: list[str], output_strs: list[str], tokenizer,
                               pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """Tokenise prompts and outputs separately, concatenate, right-pad to the longest pair and
    shift.

    Returns ``{"input_ids", "labels", "response_mask"}``, each ``(batch, max_len - 1)`` where
    ``max_len`` is the longest prompt+output length (tokens); ``input_ids``/``labels`` int64
    (padding = ``pad_token_id``), ``response_mask`` bool. ValueError when the lists' lengths
    differ or a prompt+output pair has fewer than 2 tokens."""
    if len(prompt_strs) != len(output_strs):
        raise ValueError(f"{len(prompt_strs)} prompts but {len(output_strs)} outputs")
    pairs = [(list(tokenizer.encode(p)), list(tokenizer.encode(o))) for p, o in zip(prompt_strs, output_strs)]
    return collate_pairs(pairs, pad_token_id)


def collate_pairs(pairs: list[tuple[list[int], list[int]]], pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """``(prompt ids, output ids)`` pairs -> the padded, shifted batch of
    ``tokenize_prompt_and_output``."""
    if not pairs:
        raise ValueError("no sequences to collate")
    max_len = max(len(p) + len(o) for p, o in pairs)
    if max_len < 2:
        raise ValueError("every prompt+output pair has fewer than 2 tokens")
    full = torch.full((len(pairs), max_len), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(pairs), max_len), dtype=torch.bool)
    for i, (p, o) in enumerate(pairs):
        full[i, :len(p) + len(o)] = torch.tensor(p + o, dtype=torch.long)
        mask[i, len(p):len(p) + len(o)] = True
    return {"input_ids": full[:, :-1], "labels": full[:, 1:], "response_mask": mask[:, 1:]}


def scan_jsonl(path: str | Path, keys: tuple[str, ...], what: str) -> Iterator[dict]:
    """Stream the records of a JSONL file, each a JSON object with string values for ``keys``
    (blank lines are skipped; a UTF-8 byte-order mark on line 1 is allowed). ``what`` names the
    config key in errors, which are one line naming the file and the line:

    - DataError: the path does not exist or is not a regular file; a line is not UTF-8 text
      ("not UTF-8 text at byte N (line N)" — a binary file lands here);
    - FormatError: a line is not JSON, or not an object with those string fields (the missing
      or mistyped key is named); the file holds no record (raised after the last line).

    One line is in memory at a time, so a whole file is validated cheaply (``count_jsonl``)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"{what}={path}: no such file")
    if not path.is_file():
        raise DataError(f"{what}={path}: not a regular file")
    offset, records = 0, 0
    try:
        f = open(path, "rb")
    except OSError as e:
        raise DataError(f"{what}={path}: cannot read it ({e.strerror})") from None
    with f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{what}={path}: not UTF-8 text at byte {offset + e.start} (line {n})") from None
            offset += len(raw)
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise FormatError(f"{what}={path}: line {n} is not JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise FormatError(f"{what}={path}: line {n} is not an object with string fields {list(keys)} "
                                  f"(got a JSON {_json_type(row)})")
            for k in keys:
                if k not in row:
                    raise FormatError(f"{what}={path}: line {n} lacks key {k!r} (each record needs string fields "
                                      f"{list(keys)})")
                if not isinstance(row[k], str):
                    raise FormatError(f"{what}={path}: line {n}: {k!r} is a JSON {_json_type(row[k])}, "
                                      "expected a string")
            records += 1
            yield row
    if not records:
        raise FormatError(f"{what}={path}: no records (the file is empty or blank)")


def _json_type(value) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number",
            type(None): "null"}.get(type(value), type(value).__name__)


def read_jsonl(path: str | Path, keys: tuple[str, ...], what: str) -> list[dict]:
    """All records of ``scan_jsonl(path, keys, what)`` (same errors)."""
    return list(scan_jsonl(path, keys, what))


def count_jsonl(path: str | Path, keys: tuple[str, ...], what: str) -> int:
    """Validate the whole file as ``scan_jsonl`` does, holding one line at a time -> the number of
    records (same errors). Stages call it from ``plan`` so bad data is refused before a run
    directory exists."""
    return sum(1 for _ in scan_jsonl(path, keys, what))


@dataclass
class SFTSequences:
    """Tokenised SFT data: ``pairs`` of (prompt ids, response ids) — or, packed, ``tokens``
    ``(n, context_length + 1)`` windows of the packed stream (consecutive windows share one
    token: row ``i`` is ``ids[i·L : (i+1)·L + 1]``) with their ``mask`` (1 where a token is a
    response token; loss is taken where the *label* is a response token)."""

    pairs: list[tuple[list[int], list[int]]] | None = None
    tokens: torch.Tensor | None = None
    mask: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.pairs) if self.pairs is not None else int(self.tokens.shape[0])

    @property
    def response_tokens(self) -> int:
        """Response tokens the loss is taken on (packed: labels that are response tokens)."""
        if self.pairs is not None:
            return sum(len(o) for _, o in self.pairs)
        return int(self.mask[:, 1:].sum())

    def batch(self, index: list[int], pad_token_id: int = 0) -> dict[str, torch.Tensor]:
        """The shifted batch (see ``tokenize_prompt_and_output``) of the rows in ``index``;
        packed: ``input_ids = ids[i·L:(i+1)·L]``, ``labels = ids[i·L+1:(i+1)·L+1]``."""
        if self.pairs is not None:
            return collate_pairs([self.pairs[i] for i in index], pad_token_id)
        t, m = self.tokens[index], self.mask[index]
        return {"input_ids": t[:, :-1], "labels": t[:, 1:], "response_mask": m[:, 1:]}


def build_sft_sequences(prompts: list[str], responses: list[str], tokenizer, eos_token_id: int | None,
                        context_length: int, packing: bool = False, prefix_ids: list[int] | None = None,
                        shuffle: bool = False, seed: int = 0) -> tuple[SFTSequences, int]:
    """Tokenise prompt/response pairs (the response gets ``eos_token_id`` appended when not
    None; every prompt gets ``prefix_ids`` — e.g. a BOS token — in front) for a model of
    ``context_length`` tokens.

    Unpacked: one sequence per example; an example longer than ``context_length + 1`` tokens is
    cut at the end (its response keeps what fits; an example whose prompt fills the context is
    dropped). Packed (the packed SFT dataset of CS336 assignment 5): the examples — in order,
    or shuffled with ``random.Random(seed)`` when ``shuffle`` — are joined into one stream of
    ids (each ends with its EOS) and cut into ``n = (len(ids) - 1) // L`` windows of ``L =
    context_length`` inputs: window ``i`` has ``input_ids = ids[i·L:(i+1)·L]`` and ``labels =
    ids[i·L+1:(i+1)·L+1]``, so consecutive windows overlap by one token and every token but the
    first is a label exactly once (the tail after the last full window is dropped; long
    examples span windows; attention crosses example boundaries). ``shuffle`` is ignored
    unpacked (batches are drawn in random order anyway). Returns ``(sequences, number of
    examples truncated)``. ValueError when no example has a response token that fits, or
    packed, when the stream is shorter than ``L + 1`` tokens."""
    limit = context_length + 1
    pairs, truncated = [], 0
    for p, r in zip(prompts, responses):
        pi = list(prefix_ids or []) + list(tokenizer.encode(p))
        ri = list(tokenizer.encode(r)) + ([eos_token_id] if eos_token_id is not None else [])
        if not packing and len(pi) + len(ri) > limit:
            truncated += 1
            ri = ri[:max(0, limit - len(pi))]
        if ri and pi:
            pairs.append((pi, ri))
    if not pairs:
        raise ValueError(f"no example has a response that fits in context_length={context_length}")
    if not packing:
        return SFTSequences(pairs=pairs), truncated
    if shuffle:
        import random

        random.Random(seed).shuffle(pairs)
    flat = [t for p, r in pairs for t in p + r]
    flags = [f for p, r in pairs for f in [False] * len(p) + [True] * len(r)]
    rows = (len(flat) - 1) // context_length
    if rows == 0:
        raise ValueError(f"packing: {len(flat)} tokens make no window of {context_length} inputs and their labels")
    used = rows * context_length + 1
    # (rows, L + 1) views of the stream, step L: row i is ids[i*L : (i+1)*L + 1]
    tokens = torch.tensor(flat[:used], dtype=torch.long).unfold(0, limit, context_length)
    mask = torch.tensor(flags[:used], dtype=torch.bool).unfold(0, limit, context_length)
    return SFTSequences(tokens=tokens, mask=mask), truncated


def iterate_batches(n: int, batch_size: int, shuffle: bool = True, seed: int = 0,
                    drop_last: bool = False) -> Iterator[list[int]]:
    """Endless epochs of index batches over ``range(n)``: each epoch a fresh permutation
    (seeded by ``seed`` and the epoch number) cut into ``batch_size`` pieces; the last partial
    piece is kept unless ``drop_last`` (or ``n < batch_size`` would leave none)."""
    if n < 1 or batch_size < 1:
        raise ValueError(f"n={n}, batch_size={batch_size}: expected both >= 1")
    epoch = 0
    while True:
        order = (torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
                 if shuffle else list(range(n)))
        for i in range(0, n, batch_size):
            piece = order[i:i + batch_size]
            if drop_last and len(piece) < batch_size and n >= batch_size:
                continue
            yield piece
        epoch += 1
