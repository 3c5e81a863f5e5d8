"""Byte-level BPE encoding and decoding, with tiktoken and HuggingFace ``tokenizers`` export.

Encoding (GPT-2; Sennrich et al. 2016, "Neural Machine Translation of Rare Words with Subword
Units"; Radford et al. 2019; the ``Tokenizer`` of Stanford CS336 assignment 1):

1. split the text on special tokens (longest first, leftmost match wins); each special token
   becomes its own id;
2. split the text between special tokens into pre-tokens with GPT-2's regex
   (:data:`lmrun.tokenizer.pretokenize.GPT2_PATTERN`);
3. turn each pre-token into its UTF-8 bytes, one token per byte, and apply the merges: repeatedly
   merge every occurrence (left to right) of the adjacent pair whose merge has the lowest rank,
   until no adjacent pair has a merge. This is GPT-2's ``encoder.py`` ``bpe`` loop.

Pre-token encodings are cached (pre-token text -> ids), which is what makes the pure-Python
encoder fast on natural text, where few distinct pre-tokens make up most of the text.
``encode`` runs the same algorithm in C when the extension is built (:mod:`lmrun.tokenizer.native`).

The ids this module returns are those of the vocabulary it was given, whatever their order;
:meth:`Tokenizer.to_tiktoken` and :meth:`Tokenizer.to_hf` export encoders that return the same ids.
"""
from __future__ import annotations

import heapq
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

from lmrun.errors import ConfigError, DataError, FormatError, LmrunError
from lmrun.tokenizer import native as _native
from lmrun.tokenizer.formats import check_consistent, load_merges, load_vocab
from lmrun.tokenizer.pretokenize import GPT2_PATTERN, pretokenize
from lmrun.tracking.files import atomic_write_text

if TYPE_CHECKING:  # pragma: no cover
    import tiktoken

__all__ = ["Tokenizer", "UnknownTokenError"]

_NO_RANK = 1 << 62
#: pre-tokens longer than this many bytes are merged with a heap (O(n log n)) instead of the
#: quadratic rescanning loop (same result, see ``Tokenizer._bpe_heap``)
_HEAP_MIN_BYTES = 128
#: pre-tokens longer than this many characters are not cached (they rarely repeat)
_CACHE_MAX_CHARS = 256


class UnknownTokenError(LmrunError, ValueError):
    """A token id given to :meth:`Tokenizer.decode` is not in the vocabulary."""


class Tokenizer:
    """Byte-level BPE tokenizer: ``encode`` text to token ids, ``decode`` ids to text.

    Args:
        vocab: token id -> token bytes. Every byte 0..255 that occurs in the text must have a
            one-byte token. Not modified; special tokens missing from it are added to a copy.
        merges: ``(left bytes, right bytes)`` pairs in rank order (rank 0 is merged first, as
            BPE training created them). Every part and every result must be in ``vocab``.
        special_tokens: strings that are never split or merged and always encode to one id.
            A special token whose UTF-8 bytes are already a token of ``vocab`` uses that id;
            the others are appended with new ids ``max id + 1, + 2, ...`` in the order given.
            Overlapping special tokens match longest first.
        cache_size: number of distinct pre-tokens whose encoding is cached; the cache is cleared
            when it is full (memory is bounded, about 200 bytes an entry).

    Raises:
        FormatError: a merge uses or produces bytes that are not in ``vocab``.
        ConfigError: a special token is empty or not a string.

    Attributes:
        vocab: id -> bytes, including appended special tokens (a copy of the argument).
        merges: the merges, in rank order.
        special_tokens: the special tokens, as given (duplicates removed).
        special_ids: special token -> id.

    Source: GPT-2 ``encoder.py`` (OpenAI, 2019); CS336 assignment 1 (``Tokenizer``).
    """

    def __init__(
        self,
        vocab: dict[int, bytes],
        merges: list[tuple[bytes, bytes]],
        special_tokens: list[str] | None = None,
        *,
        cache_size: int = 1 << 17,
    ) -> None:
        self.vocab: dict[int, bytes] = dict(vocab)
        self.merges: list[tuple[bytes, bytes]] = [(bytes(a), bytes(b)) for a, b in merges]

        # bytes -> id; where two ids hold the same bytes, the lowest id is used
        self._token_id: dict[bytes, int] = {}
        for i in sorted(self.vocab, reverse=True):
            self._token_id[self.vocab[i]] = i

        # merges as id pairs: key left * stride + right -> rank; rank -> (left, right, result)
        self._stride = max(self.vocab, default=0) + 1
        self._pair_rank: dict[int, int] = {}
        self._merge_info: list[tuple[int, int, int]] = []
        tid = self._token_id
        try:
            for rank, (a, b) in enumerate(self.merges):
                ia, ib = tid[a], tid[b]
                self._pair_rank.setdefault(ia * self._stride + ib, rank)
                self._merge_info.append((ia, ib, tid[a + b]))
        except KeyError:
            check_consistent(self.vocab, self.merges)  # raises FormatError naming the merge
            raise

        self.special_tokens: list[str] = []
        self.special_ids: dict[str, int] = {}
        next_id = max(self.vocab, default=-1) + 1
        for s in special_tokens or []:
            if not isinstance(s, str) or not s:
                raise ConfigError(f"special token {s!r} is not allowed: special tokens must be non-empty strings")
            if s in self.special_ids:
                continue
            b = s.encode("utf-8")
            i = tid.get(b)
            if i is None:
                i = next_id
                next_id += 1
                self.vocab[i] = b
                tid[b] = i
            self.special_tokens.append(s)
            self.special_ids[s] = i

        self._byte_id: list[int | None] = [tid.get(bytes([x])) for x in range(256)]
        # "Ordered" merges only use tokens that no later merge produces (true of GPT-2's files and
        # of most trained merge lists); for them the faster leftmost-pair merge equals the loop.
        made_at: dict[int, int] = {}  # token -> last rank that produces it
        for rank, (_, _, ir) in enumerate(self._merge_info):
            made_at[ir] = rank
        self._ordered = all(made_at.get(ia, -1) < rank and made_at.get(ib, -1) < rank
                            for rank, (ia, ib, _) in enumerate(self._merge_info))

        if self.special_tokens:
            alternatives = sorted(self.special_tokens, key=len, reverse=True)
            self._special_re: re.Pattern[str] | None = re.compile("|".join(map(re.escape, alternatives)))
        else:
            self._special_re = None
        self._special_prefixes = {s[:k] for s in self.special_tokens for k in range(1, len(s))}
        self._special_maxlen = max(map(len, self.special_tokens), default=0)

        self._cache: dict[str, tuple[int, ...]] = {}
        self._cache_size = max(int(cache_size), 0)
        # the C core of encoding (same ids), or None: pure Python (lmrun.tokenizer.native)
        self._native = _native.native_encoder(self)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_files(
        cls,
        vocab_path: str | os.PathLike,
        merges_path: str | os.PathLike,
        special_tokens: list[str] | None = None,
        **kwargs,
    ) -> Tokenizer:
        """Load a tokenizer from GPT-2 format files: ``vocab.json`` (token string -> id) and
        ``merges.txt`` (one ``left right`` merge a line, rank order), as written by
        :func:`lmrun.tokenizer.formats.save_vocab` / ``save_merges`` and by OpenAI's GPT-2.

        Raises FormatError if a file is missing or malformed or the two files disagree."""
        vocab = load_vocab(vocab_path)
        merges = load_merges(merges_path)
        check_consistent(vocab, merges, source=f"{vocab_path} + {merges_path}")
        return cls(vocab, merges, special_tokens, **kwargs)

    @property
    def vocab_size(self) -> int:
        """Number of ids an embedding table needs: largest id + 1 (special tokens included)."""
        return max(self.vocab, default=-1) + 1

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab={len(self.vocab)} tokens, merges={len(self.merges)}, "
                f"special_tokens={self.special_tokens!r})")

    # ------------------------------------------------------------------ encoding

    def encode(self, text: str) -> list[int]:
        """Encode ``text`` to token ids (a list of ints, one per token).

        Lone surrogate code points (not valid in UTF-8) are replaced by U+FFFD first, as
        tiktoken does.

        Raises DataError if the text holds a byte that has no one-byte token in the vocabulary."""
        try:
            return self._encode(text)
        except UnicodeEncodeError:
            return self._encode(_fix_surrogates(text))

    def encode_iterable(self, iterable: Iterable[str]) -> Iterator[int]:
        """Lazily encode an iterable of strings (e.g. a text file handle, line by line), yielding
        token ids. The output equals ``encode("".join(iterable))``: a special token or a
        pre-token that spans two chunks is encoded whole.

        Memory is bounded by the longest chunk plus a few pre-tokens (and the longest special
        token), independent of the total size. Errors as :meth:`encode`; DataError for a chunk
        that is not a str (e.g. a file opened in binary mode)."""
        buf = ""
        for chunk in iterable:
            if not chunk:
                continue
            if not isinstance(chunk, str):
                raise DataError(f"encode_iterable needs str chunks, got {type(chunk).__name__} "
                                "(open the file in text mode, encoding='utf-8')")
            buf += chunk
            try:
                ids, keep = self._encode_stable_prefix(buf)
            except UnicodeEncodeError:
                buf = _fix_surrogates(buf)
                ids, keep = self._encode_stable_prefix(buf)
            buf = buf[keep:]
            yield from ids
        if buf:
            yield from self.encode(buf)

    def _encode(self, text: str) -> list[int]:
        if self._native is not None:
            return _native.encode(self, self._native, text)
        if self._special_re is None:
            return self._encode_pretokens(pretokenize(text))
        ids: list[int] = []
        pos = 0
        special_ids = self.special_ids
        for m in self._special_re.finditer(text):
            if m.start() > pos:
                ids += self._encode_pretokens(pretokenize(text, pos, m.start()))
            ids.append(special_ids[m.group()])
            pos = m.end()
        if pos < len(text):
            ids += self._encode_pretokens(pretokenize(text, pos))
        return ids

    def _encode_pretokens(self, pretokens: list[str]) -> list[int]:
        cache = self._cache
        get = cache.get
        ids: list[int] = []
        for p in pretokens:
            t = get(p)
            if t is None:
                t = self._encode_pretoken(p)
            ids += t
        return ids

    def _encode_pretoken(self, p: str) -> tuple[int, ...]:
        """Cache miss: BPE one pre-token and cache the result (bounded)."""
        data = p.encode("utf-8")
        byte_id = self._byte_id
        try:
            ids = [byte_id[x] for x in data]
            if None in ids:
                raise TypeError
        except TypeError:
            bad = next(x for x in data if byte_id[x] is None)
            raise DataError(f"cannot encode {p!r}: byte 0x{bad:02x} has no token in the vocabulary") from None
        if len(ids) > 1:
            if len(ids) >= _HEAP_MIN_BYTES:
                ids = self._bpe_heap(ids)
            elif self._ordered:
                ids = self._bpe_leftmost(ids)
            else:
                ids = self._bpe_loop(ids)
        t = tuple(ids)
        if len(p) <= _CACHE_MAX_CHARS and self._cache_size:
            if len(self._cache) >= self._cache_size:
                self._cache.clear()
            self._cache[p] = t
        return t

    def _bpe_loop(self, ids: list[int]) -> list[int]:
        """GPT-2's merge loop: merge all occurrences of the lowest-rank pair; repeat."""
        ranks = self._pair_rank
        s = self._stride
        info = self._merge_info
        while len(ids) > 1:
            best = min(ranks.get(a * s + b, _NO_RANK) for a, b in zip(ids, ids[1:]))
            if best == _NO_RANK:
                break
            a, b, new = info[best]
            out: list[int] = []
            i, n = 0, len(ids)
            while i < n:
                if ids[i] == a and i + 1 < n and ids[i + 1] == b:
                    out.append(new)
                    i += 2
                else:
                    out.append(ids[i])
                    i += 1
            ids = out
        return ids

    def _bpe_leftmost(self, ids: list[int]) -> list[int]:
        """Same result as :meth:`_bpe_loop` when merges are ordered (checked at construction):
        merge the leftmost lowest-rank pair, update the ranks of its two neighbour pairs, repeat.
        Ordered merges never create a pair ranked below the one just merged, so this visits the
        occurrences of each pair left to right, as the loop does."""
        get = self._pair_rank.get
        s = self._stride
        info = self._merge_info
        rs = [get(a * s + b, _NO_RANK) for a, b in zip(ids, ids[1:])]
        while True:
            best = min(rs)
            if best == _NO_RANK:
                return ids
            i = rs.index(best)
            new = info[best][2]
            ids[i] = new
            del ids[i + 1]
            del rs[i]
            if i:
                rs[i - 1] = get(ids[i - 1] * s + new, _NO_RANK)
            if i < len(rs):
                rs[i] = get(new * s + ids[i + 1], _NO_RANK)
            elif not rs:
                return ids

    def _bpe_heap(self, ids: list[int]) -> list[int]:
        """Same result as :meth:`_bpe_loop` in O(n log n), for long pre-tokens: a heap of
        (rank, position) over a linked list of tokens. Each round takes every heap entry of the
        lowest rank and merges those still valid, left to right (an entry is stale once one of
        its two tokens has been merged into a longer one); pairs created meanwhile wait for
        the next round, as in the loop."""
        ranks = self._pair_rank
        s = self._stride
        info = self._merge_info
        n = len(ids)
        tok = list(ids)
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        prv = list(range(-1, n - 1))
        heap = [(r, i) for i in range(n - 1) if (r := ranks.get(tok[i] * s + tok[i + 1])) is not None]
        heapq.heapify(heap)
        push, pop = heapq.heappush, heapq.heappop
        while heap:
            r = heap[0][0]
            batch = []
            while heap and heap[0][0] == r:
                batch.append(pop(heap)[1])
            a, b, new = info[r]
            for i in batch:
                j = nxt[i]
                if tok[i] != a or j < 0 or tok[j] != b:
                    continue
                tok[i] = new
                tok[j] = -1
                k = nxt[j]
                nxt[i] = k
                if k >= 0:
                    prv[k] = i
                    rr = ranks.get(new * s + tok[k])
                    if rr is not None:
                        push(heap, (rr, i))
                p = prv[i]
                if p >= 0:
                    rr = ranks.get(tok[p] * s + new)
                    if rr is not None:
                        push(heap, (rr, p))
        out = []
        i = 0
        while i >= 0:
            out.append(tok[i])
            i = nxt[i]
        return out

    def _encode_stable_prefix(self, buf: str) -> tuple[list[int], int]:
        """Encode the part of ``buf`` whose tokens cannot change whatever text follows it.

        Returns (ids, keep): ids of ``buf[:keep]``; the caller keeps ``buf[keep:]``.
        Held back: a possible unfinished special token, and the last two pre-tokens of the
        text before it (GPT-2's regex looks at most one character past a match, and its
        contraction alternative three characters from a match's start, so every pre-token
        but the last two is final)."""
        if self._native is not None:
            return _native.encode_stable_prefix(self, self._native, buf)
        ids: list[int] = []
        pos = 0
        end = len(buf)
        if self._special_re is not None:
            # starts of suffixes that may still grow into a (longer) special token, ascending
            n = len(buf)
            prefixes = self._special_prefixes
            partial = [n - k for k in range(min(self._special_maxlen - 1, n), 0, -1) if buf[n - k:] in prefixes]
            special_ids = self.special_ids
            for m in self._special_re.finditer(buf):
                # a match is final unless a possible longer special starts at or before it
                end = next((j for j in partial if j >= pos), n)
                if m.start() >= end:
                    break
                if m.start() > pos:
                    ids += self._encode_pretokens(pretokenize(buf, pos, m.start()))
                ids.append(special_ids[m.group()])
                pos = m.end()
            end = next((j for j in partial if j >= pos), n)
        pretokens = pretokenize(buf, pos, end)
        if len(pretokens) > 2:
            held = len(pretokens[-1]) + len(pretokens[-2])
            ids += self._encode_pretokens(pretokens[:-2])
            return ids, end - held
        return ids, pos

    # ------------------------------------------------------------------ decoding

    def decode(self, ids: Sequence[int] | Iterable[int]) -> str:
        """Decode token ids (any iterable of ints, e.g. a list or a 1-D numpy array) to text.

        Byte sequences that are not valid UTF-8 (e.g. a multi-byte character cut between
        tokens) become U+FFFD replacement characters; this never raises for known ids.

        Raises UnknownTokenError (an LmrunError) naming the first id not in the vocabulary."""
        ids = list(ids)
        vocab = self.vocab
        try:
            data = b"".join([vocab[i] for i in ids])
        except (KeyError, TypeError):
            bad = next(i for i in ids if _lookup(vocab, i) is None)
            raise UnknownTokenError(
                f"cannot decode token id {bad!r}: not in the vocabulary "
                f"({len(vocab)} tokens, ids 0..{self.vocab_size - 1})") from None
        return data.decode("utf-8", errors="replace")

    # ------------------------------------------------------------------ export

    def to_tiktoken(self, name: str = "lmrun") -> tiktoken.Encoding:
        """A ``tiktoken.Encoding`` that encodes like this tokenizer and returns the same ids.

        tiktoken merges the adjacent pair whose *concatenation* has the lowest rank, so the
        ranks given to it are merge order: the result of merge k ranks above that of every
        earlier merge. Single-byte tokens are never compared by rank, so they keep their ids.
        When the ids of merge results grow with merge order (GPT-2's files, and vocabularies
        from :func:`lmrun.tokenizer.bpe.train_bpe`), the ranks are simply our ids. Otherwise
        tokens are renumbered by merge order and the returned encoding (a subclass) maps ids
        both ways in ``encode*`` / ``decode*``.

        Call ``encode(text, allowed_special="all")`` to treat special tokens as this
        tokenizer does. Vocabulary entries that are neither a byte, a merge result nor a
        special token cannot be produced by encoding and are left out.

        tiktoken is not the merge loop: it returns a pre-token whole when its bytes are a
        token, merges any two adjacent parts whose concatenation is a token, and tries
        overlapping special tokens in no fixed order (ours: longest first). None of this
        matters for GPT-2's files or merge lists from BPE training (tested), but merge lists
        in which a token's own bytes do not encode to that token, or in which one token is
        made by two different merges, can encode differently, as can overlapping specials.

        Raises FormatError if a byte 0..255 has no one-byte token. Needs the ``tiktoken`` package.
        Source: tiktoken (OpenAI), ``tiktoken/core.py`` and ``load.py``."""
        import tiktoken

        missing = [x for x in range(256) if self._byte_id[x] is None]
        if missing:
            raise FormatError(f"cannot export to tiktoken: bytes {missing[:8]} have no one-byte token")
        byte_tokens = [(bytes([x]), self._byte_id[x]) for x in range(256)]
        merged: list[tuple[bytes, int]] = []
        seen = {t for t, _ in byte_tokens}
        for a, b in self.merges:
            t = a + b
            if t not in seen:
                seen.add(t)
                merged.append((t, self._token_id[t]))
        specials = dict(self.special_ids)
        mids = [i for _, i in merged]
        if all(x < y for x, y in zip(mids, mids[1:])):
            ranks = dict(byte_tokens)
            ranks.update(merged)
            return tiktoken.Encoding(name, pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens=specials)
        # renumber: bytes 0..255 (by byte value), merge results 256.. in merge order, specials after
        order = byte_tokens + merged
        ranks = {t: r for r, (t, _) in enumerate(order)}
        rank_to_id = [i for _, i in order]
        special_ranks = {}
        for s, i in specials.items():
            r = ranks.get(s.encode("utf-8"))
            if r is None:
                r = len(rank_to_id)
                rank_to_id.append(i)
            special_ranks[s] = r
        return _RemappedEncoding(name, pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                                 special_tokens=special_ranks, rank_to_id=rank_to_id)

    def to_hf(self, path: str | os.PathLike) -> None:
        """Write a HuggingFace ``tokenizers`` ``tokenizer.json`` to ``path`` (atomically).

        Built by the ``tokenizers`` library (:func:`lmrun.tokenizer.hf.build_hf_tokenizer`): BPE
        model with this vocabulary and merges in GPT-2's printable byte-level string form, a
        pre-tokenizer that splits with GPT-2's regex then maps bytes (no prefix space), a
        ByteLevel decoder, and the special tokens as added tokens.
        ``tokenizers.Tokenizer.from_file(path).encode(text)`` gives the same ids as
        :meth:`encode` (HF matches added tokens leftmost-longest too). For a whole
        ``transformers`` folder see :func:`lmrun.tokenizer.hf.save_hf_tokenizer`.

        Raises FormatError if two ids hold the same bytes, or a special token's text is another
        token's byte-level string (the format cannot express either).
        Source: HuggingFace ``tokenizers`` serialization format (``tokenizer.json``)."""
        from lmrun.tokenizer.hf import build_hf_tokenizer

        hf = build_hf_tokenizer(self.vocab, self.merges, self.special_tokens)
        atomic_write_text(path, hf.to_str() + "\n")


def _lookup(vocab: dict[int, bytes], i) -> bytes | None:
    try:
        return vocab[i]
    except (KeyError, TypeError):
        return None


def _fix_surrogates(text: str) -> str:
    """Lone surrogates -> U+FFFD (surrogate pairs -> the character they encode), as tiktoken."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _make_remapped_encoding():
    import tiktoken

    class RemappedEncoding(tiktoken.Encoding):
        """tiktoken Encoding whose public ids are the source tokenizer's ids, not tiktoken ranks."""

        def __init__(self, name, *, pat_str, mergeable_ranks, special_tokens, rank_to_id):
            super().__init__(name, pat_str=pat_str, mergeable_ranks=mergeable_ranks, special_tokens=special_tokens)
            self._rank_to_id = list(rank_to_id)
            self._id_to_rank = {i: r for r, i in enumerate(self._rank_to_id)}
            self._special_token_values = {self._rank_to_id[r] for r in special_tokens.values()}
            self.max_token_value = max(self._rank_to_id)

        def _ids(self, ranks):
            m = self._rank_to_id
            return [m[r] for r in ranks]

        def _ranks(self, ids):
            m = self._id_to_rank
            try:
                return [m[i] for i in ids]
            except KeyError as e:
                raise KeyError(f"token id {e.args[0]} is not in this encoding") from None

        def encode_ordinary(self, text):
            return self._ids(super().encode_ordinary(text))

        def encode(self, text, **kwargs):
            return self._ids(super().encode(text, **kwargs))

        def encode_to_numpy(self, text, **kwargs):
            import numpy as np

            return np.asarray(self.encode(text, **kwargs), dtype=np.uint32)

        def encode_with_unstable(self, text, **kwargs):
            stable, completions = super().encode_with_unstable(text, **kwargs)
            return self._ids(stable), [self._ids(c) for c in completions]

        def encode_single_token(self, text_or_bytes):
            return self._rank_to_id[super().encode_single_token(text_or_bytes)]

        def decode_bytes(self, tokens):
            return super().decode_bytes(self._ranks(tokens))

        def decode(self, tokens, errors="replace"):
            return super().decode_bytes(self._ranks(tokens)).decode("utf-8", errors=errors)

        def decode_single_token_bytes(self, token):
            return super().decode_single_token_bytes(self._ranks([token])[0])

        @property
        def eot_token(self):
            return self._rank_to_id[self._special_tokens["<|endoftext|>"]]

        def __reduce__(self):
            raise TypeError("a renumbered lmrun tiktoken export cannot be pickled; rebuild it with Tokenizer.to_tiktoken")

    return RemappedEncoding


def _RemappedEncoding(*args, **kwargs):
    global _RemappedEncodingClass
    try:
        cls = _RemappedEncodingClass
    except NameError:
        cls = _RemappedEncodingClass = _make_remapped_encoding()
    return cls(*args, **kwargs)
