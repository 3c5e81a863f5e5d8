"""GPT-2 tokenizer file formats: ``vocab.json`` (token string -> id) and ``merges.txt``.

Token byte strings are written through GPT-2's reversible bytes-to-unicode table, so every
byte (including spaces and control bytes) becomes one printable character. Source: OpenAI
GPT-2 ``encoder.py`` (``bytes_to_unicode``); the same format is read by HuggingFace
``tokenizers`` and by the CS336 assignment-1 fixtures.
"""
from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path

from lmrun.errors import FormatError
from lmrun.tracking.files import atomic_write_text

MERGES_HEADER = "#version: 0.2"


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table from each byte 0..255 to a printable unicode character (256 entries).

    Printable Latin-1 bytes map to themselves; the other 68 bytes map to U+0100 onwards."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


@lru_cache(maxsize=1)
def unicode_to_bytes() -> dict[str, int]:
    """Inverse of :func:`bytes_to_unicode`."""
    return {c: b for b, c in bytes_to_unicode().items()}


def token_to_str(token: bytes) -> str:
    """Bytes of one token -> its printable GPT-2 string."""
    table = bytes_to_unicode()
    return "".join(table[b] for b in token)


def str_to_token(s: str) -> bytes:
    """Printable GPT-2 string -> token bytes. Characters outside the table (e.g. a special
    token written literally by another tool) are taken as their UTF-8 encoding."""
    table = unicode_to_bytes()
    out = bytearray()
    for ch in s:
        b = table.get(ch)
        if b is None:
            out += ch.encode("utf-8")
        else:
            out.append(b)
    return bytes(out)


def save_vocab(vocab: dict[int, bytes], path: str | os.PathLike) -> None:
    """Write ``vocab`` (id -> token bytes) as GPT-2 ``vocab.json`` (string -> id), atomically.

    Raises FormatError if two ids share the same bytes (the format cannot hold that)."""
    out: dict[str, int] = {}
    for i in sorted(vocab):
        s = token_to_str(vocab[i])
        if s in out:
            raise FormatError(f"cannot save vocab: ids {out[s]} and {i} both hold token {vocab[i]!r}")
        out[s] = i
    atomic_write_text(path, json.dumps(out, ensure_ascii=False, indent=0) + "\n")


def load_vocab(path: str | os.PathLike) -> dict[int, bytes]:
    """Read a GPT-2 ``vocab.json`` -> {id: token bytes}. Raises FormatError on malformed files."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FormatError(f"vocab file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FormatError(f"{path}: not a valid vocab.json ({e})") from None
    if not isinstance(raw, dict):
        raise FormatError(f"{path}: expected a JSON object mapping token strings to ids")
    vocab: dict[int, bytes] = {}
    for s, i in raw.items():
        if not isinstance(i, int) or isinstance(i, bool) or i < 0:
            raise FormatError(f"{path}: token {s!r} has id {i!r}; ids must be non-negative integers")
        if i in vocab:
            raise FormatError(f"{path}: id {i} is used twice")
        vocab[i] = str_to_token(s)
    return vocab


def save_merges(merges: list[tuple[bytes, bytes]], path: str | os.PathLike) -> None:
    """Write merges in rank order as GPT-2 ``merges.txt`` (header line, then ``a b`` per line)."""
    lines = [MERGES_HEADER] + [f"{token_to_str(a)} {token_to_str(b)}" for a, b in merges]
    atomic_write_text(path, "\n".join(lines) + "\n")


def load_merges(path: str | os.PathLike) -> list[tuple[bytes, bytes]]:
    """Read a GPT-2 ``merges.txt`` -> [(left bytes, right bytes)] in rank order.

    A first line starting with ``#version`` is skipped; blank lines are ignored.
    Raises FormatError naming the line of a malformed entry."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FormatError(f"merges file not found: {path}") from None
    except UnicodeDecodeError as e:
        raise FormatError(f"{path}: not valid UTF-8 ({e})") from None
    merges: list[tuple[bytes, bytes]] = []
    for lineno, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        if not line or (lineno == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2 or not parts[0] or not parts[1]:
            raise FormatError(f"{path}:{lineno}: expected two tokens separated by one space, got {line!r}")
        merges.append((str_to_token(parts[0]), str_to_token(parts[1])))
    return merges


def check_consistent(vocab: dict[int, bytes], merges: list[tuple[bytes, bytes]], source: str = "tokenizer") -> None:
    """Raise FormatError unless every merge's parts and result are tokens of ``vocab``."""
    known = set(vocab.values())
    for rank, (a, b) in enumerate(merges):
        for part in (a, b, a + b):
            if part not in known:
                raise FormatError(f"{source}: merge {rank} ({a!r}, {b!r}) uses {part!r}, which is not in the vocab")
