"""Pre-tokenization: the GPT-2 regex split, special-token handling, and parallel pre-token
counting over a large file (the first phase of BPE training).

Source: OpenAI GPT-2 ``encoder.py`` (the pattern below is GPT-2's, as used by tiktoken's
``gpt2`` encoding and the CS336 assignment 1 handout). Chunking a file at special-token
boundaries and counting chunks in parallel processes follows CS336 assignment 1.
"""
from __future__ import annotations

import multiprocessing
import signal
import os
import re
import sys
from collections import Counter
from typing import Iterator

import regex

from lmrun.errors import DataError
from lmrun.tracking.progress import byte_progress

#: GPT-2's pre-tokenizer pattern: contractions, letter runs, number runs, punctuation runs
#: (each with one optional leading space), then whitespace.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
PRETOKEN_RE = regex.compile(GPT2_PATTERN)

# GPT-2's pattern for ASCII-only text, for the stdlib ``re`` engine (about 2.5x faster than the
# ``regex`` module on this pattern). On ASCII, \p{L} = [A-Za-z], \p{N} = [0-9] and \s (Unicode
# White_Space, as in ``regex`` and in tiktoken) = [\t\n\v\f\r ]; \x1c-\x1f are not whitespace.
_WS = r"\t\n\x0b\x0c\r "
_ASCII_RE = re.compile(
    rf"'(?:[sdmt]|ll|ve|re)| ?[A-Za-z]+| ?[0-9]+| ?[^{_WS}A-Za-z0-9]+|[{_WS}]+(?![^{_WS}])|[{_WS}]+")
_NON_ASCII_RE = re.compile(r"[^\x00-\x7f]")
#: text whose UTF-8 has more than 1 extra byte per this many characters is split by PRETOKEN_RE
#: alone (0: always cut out the non-ASCII stretches; the tests use that)
_SPARSE_NON_ASCII = 200
# A printable non-space ASCII character followed by whitespace: every pre-token ends at the
# boundary between the two (no alternative of the pattern runs from non-space into whitespace),
# and the pre-tokens before it are the same whether the text ends there or goes on (the
# characters the pattern looks at past them are whitespace or the end, which it treats alike).
_BOUNDARY_RE = re.compile(rf"[!-~](?=[{_WS}])")


def pretokenize(text: str, pos: int = 0, endpos: int | None = None) -> list[str]:
    """Split ``text[pos:endpos]`` into GPT-2 pre-tokens; equals
    ``PRETOKEN_RE.findall(text, pos, endpos)`` , faster.

    ASCII stretches are split by an equivalent stdlib ``re`` pattern; stretches around non-ASCII
    characters, cut at pre-token boundaries that do not depend on what follows, by ``PRETOKEN_RE``
    (all of it when more than about 1 character in 200 is non-ASCII).
    Returns the pre-tokens in order (their concatenation is the input). Source: GPT-2 regex."""
    n = len(text) if endpos is None else min(endpos, len(text))
    if pos >= n:
        return []
    m = _NON_ASCII_RE.search(text, pos, n)
    if m is None:
        return _ASCII_RE.findall(text, pos, n)
    # each call of the ``regex`` module costs ~8 us, so cut out non-ASCII stretches only where
    # they are rare (e.g. an accented name in English text); else split it all with PRETOKEN_RE
    part = text[pos:n] if pos or n < len(text) else text
    if (len(part.encode("utf-8", "surrogatepass")) - len(part)) * _SPARSE_NON_ASCII > len(part):
        return PRETOKEN_RE.findall(text, pos, n)
    out: list[str] = []
    while m is not None:
        c = m.start()
        # region [lo, hi) around the non-ASCII character c, from the boundary before it to the one after
        lo = pos
        window = 64
        while True:
            start = max(pos, c - window)
            last = None
            for last in _BOUNDARY_RE.finditer(text, start, c):
                pass
            if last is not None:
                lo = last.end()
                break
            if start == pos:
                break
            window *= 4
        if lo > pos:
            out += _ASCII_RE.findall(text, pos, lo)
        b = _BOUNDARY_RE.search(text, c + 1, n)
        hi = b.end() if b is not None else n
        out += PRETOKEN_RE.findall(text, lo, hi)
        pos = hi
        if pos >= n:
            return out
        m = _NON_ASCII_RE.search(text, pos, n)
    out += _ASCII_RE.findall(text, pos, n)
    return out


DEFAULT_CHUNK_BYTES = 16 << 20
"""Nominal size of one chunk handed to a worker process (bytes)."""

_BLOCK_BYTES = 1 << 16  # how much find_chunk_boundaries reads at a time
_MAX_WINDOW_BYTES = 1 << 20  # how far past a nominal boundary it looks for a cut
_SEGMENT_CHARS = 1 << 20  # a worker runs the regex over pieces of about this many characters
_MIN_PARALLEL_BYTES = 256 << 10  # smaller files are counted in-process when num_workers is None

# A safe cut without special tokens: just after a "\n" that sits between two ASCII letters or
# digits. The GPT-2 pattern ends every match that holds the left character at the "\n" (no
# alternative matches a letter or digit together with "\n"), matches the "\n" alone (the
# next character is not whitespace), and starts afresh at the right character; cutting the
# text there yields the same pre-tokens.
_SAFE_CUT_BYTES = re.compile(rb"[A-Za-z0-9]\n(?=[A-Za-z0-9])")
_SAFE_CUT_STR = re.compile(r"[A-Za-z0-9]\n(?=[A-Za-z0-9])")


def special_split_pattern(special_tokens: list[str]) -> "re.Pattern[str] | None":
    """Regex alternation of the escaped special tokens, longest first (so that a special
    token that is a prefix of another never wins), or None if there are none."""
    specials = sorted({s for s in special_tokens if s}, key=len, reverse=True)
    if not specials:
        return None
    return re.compile("|".join(re.escape(s) for s in specials))


def _file_size(path: str | os.PathLike) -> int:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise DataError(f"input file not found: {os.fspath(path)}") from None
    except OSError as e:
        raise DataError(f"cannot read input file {os.fspath(path)}: {e.strerror}") from None
    if not os.path.isfile(path):
        raise DataError(f"input path is not a regular file: {os.fspath(path)}")
    return st.st_size


def _occurrences(data: bytes, tokens: list[bytes], base: int) -> list[tuple[int, int]]:
    """All (start, end) of every token in ``data``, absolute (offset ``base``), by start."""
    occ = []
    for tok in tokens:
        i = data.find(tok)
        while i >= 0:
            occ.append((base + i, base + i + len(tok)))
            i = data.find(tok, i + 1)
    occ.sort()
    return occ


def _covered(occ: list[tuple[int, int]], p: int) -> bool:
    """True if some occurrence starts before ``p`` and ends after it (a cut at p would split it)."""
    return any(s < p < e for s, e in occ)


def _find_cut(f, lo: int, hi: int, size: int, tokens: list[bytes], maxlen: int) -> int | None:
    """First safe cut in [lo, hi): the start of a special-token occurrence that no other
    occurrence straddles; failing that (in the whole window), the first newline cut."""
    ctx = max(maxlen - 1, 2)
    fallback = None
    for s in range(lo, hi, _BLOCK_BYTES):
        e = min(s + _BLOCK_BYTES, hi)
        a = max(s - ctx, 0)
        f.seek(a)
        data = f.read(min(e + maxlen - 1, size) - a)
        occ = _occurrences(data, tokens, a) if tokens else []
        # occurrences that start in [s, e), in order; valid unless straddled by another one
        max_end = 0
        for start, end in occ:
            if start >= s and start < e and max_end <= start:
                return start
            max_end = max(max_end, end)
        if fallback is None:
            for m in _SAFE_CUT_BYTES.finditer(data, max(s - a - 2, 0)):
                p = a + m.start() + 2
                if p >= e:
                    break
                if p >= s and not _covered(occ, p):
                    fallback = p
                    break
    return fallback


def find_chunk_boundaries(path: str | os.PathLike, target_chunk_bytes: int, split_tokens: list[bytes]) -> list[int]:
    """Byte offsets that cut the file into chunks of about ``target_chunk_bytes`` bytes, each
    of which pre-tokenizes exactly as its part of the whole file would.

    Returns a sorted list that starts with 0 and ends with the file size (bytes). Every inner
    boundary lies at the start of an occurrence of one of ``split_tokens`` (the special tokens,
    UTF-8) found within a window (up to 1 MiB) after a nominal boundary; if there is none, at
    a position p where byte p-1 is ``\\n`` and bytes p-2 and p are ASCII letters or digits
    (the GPT-2 pattern splits there anyway); if neither exists in the window, the chunk is
    merged into the next. Reads the file in 64 KiB blocks, never whole.

    Raises DataError if the file is missing or not a regular file, ValueError if
    ``target_chunk_bytes`` < 1.
    """
    if target_chunk_bytes < 1:
        raise ValueError(f"target_chunk_bytes must be >= 1, got {target_chunk_bytes}")
    size = _file_size(path)
    tokens = sorted({t for t in split_tokens if t}, key=len, reverse=True)
    maxlen = max((len(t) for t in tokens), default=1)
    window = min(target_chunk_bytes, _MAX_WINDOW_BYTES)
    bounds = [0]
    nominal = target_chunk_bytes
    with open(path, "rb") as f:
        while nominal < size:
            p = _find_cut(f, nominal, min(nominal + window, size), size, tokens, maxlen)
            if p is None:
                nominal += target_chunk_bytes  # merge this chunk into the next
                continue
            bounds.append(p)
            nominal = p + target_chunk_bytes
    bounds.append(size)
    return bounds


def _segments(text: str, n: int) -> Iterator[str]:
    """Cut ``text`` into pieces of about ``n`` characters at safe newline cuts."""
    start = 0
    while len(text) - start > n:
        m = _SAFE_CUT_STR.search(text, start + n)
        if m is None:
            break
        yield text[start : m.start() + 2]
        start = m.start() + 2
    yield text[start:] if start else text


def read_byte_range(path: str | os.PathLike, start: int, end: int) -> bytes:
    """Bytes [start, end) of a file (a chunk from ``find_chunk_boundaries``)."""
    with open(path, "rb") as f:
        f.seek(start)
        return f.read(end - start)


def read_text_range(path: str | os.PathLike, start: int, end: int) -> str:
    """Bytes [start, end) of a file decoded as UTF-8 (a chunk from ``find_chunk_boundaries``).

    Raises DataError naming the file and the absolute byte offset of invalid UTF-8."""
    data = read_byte_range(path, start, end)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{os.fspath(path)}: not valid UTF-8 at byte offset {start + e.start} ({e.reason})") from None


def mp_context():
    """The multiprocessing context for worker pools: fork on Linux (workers inherit what the
    parent built), spawn elsewhere."""
    if sys.platform.startswith("linux"):
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


def _pool_worker_init(initializer, initargs) -> None:
    # Forked workers inherit the parent's Python signal handlers. In a Slurm job submitit's
    # handler ignores SIGTERM, so Pool.terminate() would wait forever for such a worker; and the
    # preemption signal is for the parent alone.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    for name in ("SIGUSR1", "SIGUSR2"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)
    if initializer is not None:
        initializer(*initargs)


def worker_pool(processes: int, initializer=None, initargs: tuple = ()):
    """A ``multiprocessing`` pool of :func:`mp_context` whose workers use default signal
    handling (whatever the parent installed), then run ``initializer(*initargs)``."""
    return mp_context().Pool(processes, initializer=_pool_worker_init, initargs=(initializer, tuple(initargs)))


def _count_range(args: tuple[str, int, int, "re.Pattern[str] | None"]) -> tuple[int, dict[bytes, int]]:
    """Worker: pre-token counts of bytes [start, end) of the file. Returns (bytes read, counts)."""
    path, start, end, special_re = args
    text = read_text_range(path, start, end)
    counts: Counter[str] = Counter()
    findall = pretokenize
    pieces = special_re.split(text) if special_re is not None else (text,)
    for piece in pieces:
        if len(piece) <= _SEGMENT_CHARS:
            counts.update(findall(piece))
        else:
            for seg in _segments(piece, _SEGMENT_CHARS):
                counts.update(findall(seg))
    return end - start, {w.encode("utf-8"): c for w, c in counts.items()}


def count_pretokens(
    path: str | os.PathLike,
    special_tokens: list[str],
    *,
    num_workers: int | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    progress: bool = False,
) -> dict[bytes, int]:
    """Count the GPT-2 pre-tokens of a UTF-8 text file: {pre-token bytes: occurrences}.

    The text is split on the special tokens first (they are removed, never part of a
    pre-token), then each piece is split by :data:`PRETOKEN_RE`. The file is cut by
    :func:`find_chunk_boundaries` into chunks of about ``chunk_bytes`` bytes (at most about a
    quarter of the file per worker, so every worker gets work); ``num_workers`` processes
    (None: ``os.cpu_count()``, or 1 for files under 256 KiB; 1: in this process, no pool)
    each read and count their own chunks, and the counts are merged as chunks finish, so
    memory is bounded by the number of distinct pre-tokens plus a few chunks, not by the file
    size. ``progress`` shows a tqdm bar in MB.

    Raises DataError if the file is missing, empty, or not valid UTF-8 (naming the absolute
    byte offset).
    """
    path = os.fspath(path)
    size = _file_size(path)
    if size == 0:
        raise DataError(f"input file is empty: {path}")
    if num_workers is None:
        # below this size starting worker processes costs more than it saves
        num_workers = 1 if size < _MIN_PARALLEL_BYTES else os.cpu_count() or 1
    num_workers = max(1, int(num_workers))
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
    if num_workers > 1:
        # enough chunks to keep every worker busy and balance uneven chunks
        chunk_bytes = max(1, min(chunk_bytes, -(-size // (4 * num_workers))))
    special_re = special_split_pattern(special_tokens)
    bounds = find_chunk_boundaries(path, chunk_bytes, [s.encode("utf-8") for s in special_tokens])
    tasks = [(path, a, b, special_re) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]

    bar = byte_progress(size, "pre-tokenizing", progress)

    total: dict[bytes, int] = {}

    def merge(result: tuple[int, dict[bytes, int]]) -> None:
        nbytes, counts = result
        if not total:
            total.update(counts)
        else:
            get = total.get
            for w, c in counts.items():
                total[w] = get(w, 0) + c
        if bar is not None:
            bar.update(nbytes)

    try:
        if num_workers == 1 or len(tasks) == 1:
            for t in tasks:
                merge(_count_range(t))
        else:
            with worker_pool(min(num_workers, len(tasks))) as pool:
                for result in pool.imap_unordered(_count_range, tasks):
                    merge(result)
    finally:
        if bar is not None:
            bar.close()
    return total
