"""Tokenizer encode/decode: round trips, special tokens, streaming, errors, merge algorithms.

The GPT-2 files and the texts come from tests/fixtures (see SOURCES.md there); nothing here
reads ../shared/data. test_parity.py imports the loaders below.
"""
from __future__ import annotations

import atexit
import functools
import gzip
import io
import random
import shutil
import tempfile
import tracemalloc
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmrun.errors import ConfigError, DataError, FormatError, LmrunError
from lmrun.tokenizer.formats import save_merges, save_vocab
from lmrun.tokenizer.pretokenize import PRETOKEN_RE
from lmrun.tokenizer import pretokenize as pretokmod
from lmrun.tokenizer.pretokenize import pretokenize
from lmrun.tokenizer.tokenizer import Tokenizer, UnknownTokenError

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
EOT = "<|endoftext|>"
TEXT_FILES = ["enc_tinyshakespeare_head.txt", "enc_wikitext2_valid_slice.txt", "enc_tinystories_sample.txt",
              "enc_corpus_en_head.txt", "enc_german.txt"]


# ----------------------------------------------------------------------------- shared loaders

@functools.lru_cache(maxsize=None)
def gpt2_files() -> tuple[Path, Path]:
    """The GPT-2 vocab.json / merges.txt, unzipped once per process into a temporary folder."""
    folder = Path(tempfile.mkdtemp(prefix="lmrun-enc-"))
    atexit.register(shutil.rmtree, folder, True)
    out = []
    for name in ("vocab.json", "merges.txt"):
        dst = folder / f"gpt2_{name}"
        dst.write_bytes(gzip.decompress((FIXTURES / f"enc_gpt2_{name}.gz").read_bytes()))
        out.append(dst)
    return out[0], out[1]


@functools.lru_cache(maxsize=None)
def gpt2_tokenizer() -> Tokenizer:
    """GPT-2 with <|endoftext|> as its special token (id 50256, already in the vocab)."""
    return Tokenizer.from_files(*gpt2_files(), special_tokens=[EOT])


@functools.lru_cache(maxsize=None)
def small_tokenizer(n_merges: int = 2000, shuffle_ids: bool = False) -> Tokenizer:
    """A small trained-like tokenizer: GPT-2's first ``n_merges`` merges with the 256 bytes and
    their results (a prefix of a trained merge list is itself a trained merge list), plus
    <|endoftext|>, which is not in that vocab and is appended. With ``shuffle_ids`` the ids are
    a random permutation, so they no longer follow merge order."""
    full = gpt2_tokenizer()
    merges = full.merges[:n_merges]
    keep = {bytes([b]) for b in range(256)} | {a + b for a, b in merges}
    tokens = sorted(keep, key=lambda t: full._token_id[t])
    ids = list(range(len(tokens)))
    if shuffle_ids:
        random.Random(0).shuffle(ids)
    return Tokenizer(dict(zip(ids, tokens)), merges, [EOT])


@functools.lru_cache(maxsize=None)
def fixture_text(name: str) -> str:
    return (FIXTURES / name).read_text(encoding="utf-8")


# Fragments that stress pre-tokenization and byte handling; texts are built by joining them.
FRAGMENTS = [
    "", " ", "  ", "   ", "\t", "\n", "\n\n", " \n", "\r\n", "\r\n\r\n", "\u00a0", "\u3000", "\x0b", "\x0c",
    "\x1c", "\x85", "'s", "'S", "'ll", "'LL", "'ve", "'re", "'d", "'m", "'t", "'", "''", "don't", "I'M",
    "123", " 4567", "3.14", "1,000,000", "٣٤٥", "Ⅻ", "½", "hello", " world", "Hello,", "HTTP/1.1",
    "👩‍👩‍👧", "🙂", "👍🏽", "e\u0301", "a\u0308\u0323", "\u200d", "\ufeff", "Ελληνικά", "日本語のテキスト",
    "עברית", "العربية", "हिन्दी", "한국어", "Ñandú", "ß", "ﬁ", "$%&", "...", "!!!", "—", "“quoted”",
    "\U0001d400", "\U00010348", "\ufffd", EOT, "<|endof", "<|", "|>", "endoftext", "<|endoftext|",
]
fragment_texts = st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=8)), max_size=30).map("".join)
any_text = st.one_of(st.text(), fragment_texts)


def gpt2_ids(tok: Tokenizer, *pieces: bytes) -> list[int]:
    return [tok._token_id[p] for p in pieces]


# ----------------------------------------------------------------------------- loading

def test_gpt2_files_load_with_known_ids():
    tok = gpt2_tokenizer()
    assert len(tok.vocab) == 50257 and len(tok.merges) == 50000
    assert tok.special_ids == {EOT: 50256} and tok.vocab_size == 50257  # in the vocab already: not appended
    # ids published for GPT-2 (OpenAI's encoder / tiktoken "gpt2")
    assert tok.encode("hello world") == [31373, 995]
    assert tok.encode("Hello, world!") == [15496, 11, 995, 0]
    assert tok.encode("hello<|endoftext|>") == [31373, 50256]


def test_from_files_errors(tmp_path):
    vocab, merges = gpt2_files()
    with pytest.raises(FormatError, match="not found"):
        Tokenizer.from_files(tmp_path / "missing.json", merges)
    # merges that use tokens the vocab lacks
    save_vocab({i: bytes([i]) for i in range(256)}, tmp_path / "v.json")
    save_merges([(b"a", b"b"), (b"ab", b"c")], tmp_path / "m.txt")
    with pytest.raises(FormatError, match="not in the vocab"):
        Tokenizer.from_files(tmp_path / "v.json", tmp_path / "m.txt")


def test_save_and_reload_round_trip(tmp_path):
    tok = small_tokenizer(500)
    save_vocab(tok.vocab, tmp_path / "vocab.json")
    save_merges(tok.merges, tmp_path / "merges.txt")
    again = Tokenizer.from_files(tmp_path / "vocab.json", tmp_path / "merges.txt", [EOT])
    text = fixture_text("enc_tinystories_sample.txt")
    assert again.encode(text) == tok.encode(text)


def test_bad_special_tokens():
    tok = gpt2_tokenizer()
    with pytest.raises(ConfigError):
        Tokenizer(tok.vocab, tok.merges, [""])
    with pytest.raises(ConfigError):
        Tokenizer(tok.vocab, tok.merges, [None])


# ----------------------------------------------------------------------------- round trips

@pytest.mark.parametrize("text", [
    "", " ", "a", "\n", "   \n\n \t ", "\r\n\r\n", "hello world", "Hello, World!  ", "I'm here, they'll go; it's",
    "IT'S WE'LL", "numbers 1234567890 3.14159 -42", "👩‍👩‍👧 family 🙂", "e\u0301 combining", "日本語 and Ελληνικά mixed",
    "\u00a0nbsp\u3000ideographic", EOT, EOT + EOT, f"a{EOT}b", f" {EOT} ", "<|endoftext", "\x00\x01\x1f\x7f",
    "a" * 5000, " " * 3000, "x" * 200 + " " + "ab" * 700,
])
def test_round_trip_examples(text):
    tok = gpt2_tokenizer()
    assert tok.decode(tok.encode(text)) == text
    small = small_tokenizer()
    assert small.decode(small.encode(text)) == text


def test_empty_text():
    tok = gpt2_tokenizer()
    assert tok.encode("") == []
    assert tok.decode([]) == ""
    assert list(tok.encode_iterable([])) == []
    assert list(tok.encode_iterable(["", ""])) == []


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=any_text)
def test_round_trip_property(text):
    tok = gpt2_tokenizer()
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert all(isinstance(i, int) and i in tok.vocab for i in ids)


@settings(max_examples=150, deadline=None)
@given(text=any_text)
def test_round_trip_property_small_vocab(text):
    tok = small_tokenizer()
    assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("name", TEXT_FILES)
def test_round_trip_real_text(name):
    tok = gpt2_tokenizer()
    text = fixture_text(name)
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert len(ids) < len(text.encode("utf-8")) / 2  # GPT-2 compresses English-like text > 2 bytes/token


# ----------------------------------------------------------------------------- special tokens

def test_overlapping_special_tokens_match_longest_first():
    base = gpt2_tokenizer()
    double = EOT + EOT
    for specials in ([EOT, double], [double, EOT]):  # the order given does not matter
        tok = Tokenizer(base.vocab, base.merges, specials)
        d = tok.special_ids[double]
        assert d == 50257 and tok.special_ids[EOT] == 50256
        assert tok.encode(double) == [d]
        assert tok.encode(EOT * 3) == [d, 50256]
        assert tok.encode(f"a{EOT}{EOT}b{EOT}") == [64, d, 65, 50256]
        assert tok.decode(tok.encode(EOT * 5)) == EOT * 5


def test_special_token_not_in_vocab_is_appended():
    base = gpt2_tokenizer()
    vocab = dict(base.vocab)
    tok = Tokenizer(vocab, base.merges, [EOT, "<|pad|>", "<|im_start|>", "<|pad|>"])
    assert vocab == base.vocab  # the caller's dict is not modified
    assert tok.special_tokens == [EOT, "<|pad|>", "<|im_start|>"]
    assert tok.special_ids == {EOT: 50256, "<|pad|>": 50257, "<|im_start|>": 50258}
    assert tok.vocab[50257] == b"<|pad|>" and tok.vocab_size == 50259
    text = "<|im_start|>user hi<|pad|><|pad|>"
    ids = tok.encode(text)
    assert ids[0] == 50258 and ids[-2:] == [50257, 50257]
    assert tok.decode(ids) == text
    # without the special tokens the same text is ordinary text
    assert 50257 not in base.encode(text)


def test_special_tokens_with_regex_characters_and_text_around():
    base = gpt2_tokenizer()
    specials = ["[SEP]", "a.b", "(x)", "$^", "\\"]
    tok = Tokenizer(base.vocab, base.merges, specials)
    text = "foo[SEP]bar axb a.b (x)(y) $^ back\\slash"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    sids = tok.special_ids
    assert ids.count(sids["[SEP]"]) == 1 and ids.count(sids["a.b"]) == 1 and ids.count(sids["(x)"]) == 1
    assert ids.count(sids["$^"]) == 1 and ids.count(sids["\\"]) == 1
    # text between special tokens is pre-tokenized on its own: "foo" then special then "bar"
    assert ids[:3] == [base.encode("foo")[0], sids["[SEP]"], base.encode("bar")[0]]


def test_special_token_that_is_a_regular_token_keeps_its_id():
    base = gpt2_tokenizer()
    tok = Tokenizer(base.vocab, base.merges, ["hello"])
    assert tok.special_ids == {"hello": 31373}
    assert tok.encode("hellohello world") == [31373, 31373, 995]  # never merged with neighbours


# ----------------------------------------------------------------------------- decode

def test_decode_invalid_utf8_gives_replacement_character():
    tok = gpt2_tokenizer()
    euro = "€".encode("utf-8")  # e2 82 ac
    assert tok.decode(gpt2_ids(tok, euro[:1], euro[1:2])) == "\ufffd"
    assert tok.decode(gpt2_ids(tok, b"\xff", b"a")) == "\ufffda"
    assert tok.decode(gpt2_ids(tok, b"a", euro[:1], b"b", euro[:1], euro[1:2], euro[2:3])) == "a\ufffdb€"
    # cutting a multi-byte character's tokens anywhere never raises
    ids = tok.encode("日本語 🙂 e\u0301")
    for i in range(len(ids) + 1):
        assert isinstance(tok.decode(ids[:i]), str)


def test_decode_unknown_id_raises_clear_error():
    tok = gpt2_tokenizer()
    for bad in (50257, -1, 10**9):
        with pytest.raises(UnknownTokenError, match=rf"token id {bad}\b.*not in the vocabulary") as e:
            tok.decode([31373, bad])
        assert isinstance(e.value, LmrunError)


def test_decode_accepts_numpy_and_iterables():
    tok = gpt2_tokenizer()
    ids = tok.encode("hello world, again")
    assert tok.decode(np.array(ids, dtype=np.uint16)) == "hello world, again"
    assert tok.decode(iter(ids)) == "hello world, again"


# ----------------------------------------------------------------------------- encode errors and odd input

def test_byte_without_token_raises_data_error():
    tok = Tokenizer({0: b"a", 1: b"b", 2: b"ab"}, [(b"a", b"b")])
    assert tok.encode("abba") == [2, 1, 0]
    with pytest.raises(DataError, match="0x63"):
        tok.encode("abc")


def test_lone_surrogates_are_replaced_like_tiktoken():
    tok = gpt2_tokenizer()
    assert tok.encode("a\ud800b") == tok.encode("a\ufffdb")
    assert list(tok.encode_iterable(["a\ud800", "b"])) == tok.encode("a\ufffdb")


def test_cache_is_bounded_and_does_not_change_results():
    base = gpt2_tokenizer()
    tok = Tokenizer(base.vocab, base.merges, [EOT], cache_size=16)
    text = fixture_text("enc_wikitext2_valid_slice.txt")
    assert tok.encode(text) == base.encode(text)
    assert len(tok._cache) <= 16
    nocache = Tokenizer(base.vocab, base.merges, [EOT], cache_size=0)
    assert nocache.encode(text[:3000]) == base.encode(text[:3000]) and not nocache._cache


# ----------------------------------------------------------------------------- merge algorithms

@settings(max_examples=200, deadline=None)
@given(data=st.one_of(st.binary(min_size=2, max_size=300),
                      fragment_texts.map(lambda s: s.encode("utf-8")).filter(lambda b: len(b) >= 2)))
def test_merge_algorithms_agree(data):
    """The leftmost-pair merge and the heap merge give what GPT-2's loop gives."""
    tok = gpt2_tokenizer()
    ids = [tok._byte_id[x] for x in data]
    want = tok._bpe_loop(list(ids))
    assert tok._bpe_leftmost(list(ids)) == want
    assert tok._bpe_heap(list(ids)) == want


def test_unordered_merges_use_the_loop_semantics():
    """A merge list where rank 1 uses "abc" before rank 2 makes it (possible when training
    reaches one token by two paths). GPT-2's loop merges every occurrence of the lowest-rank
    pair before looking again, so "abcabc" -> [abc, abc]; merging only the leftmost occurrence
    first would let rank 1 fire in between and give [abca, bc]."""
    vocab = {i: bytes([i]) for i in range(256)}
    vocab.update({256: b"bc", 257: b"abc", 258: b"abca"})
    merges = [(b"b", b"c"), (b"abc", b"a"), (b"a", b"bc")]
    tok = Tokenizer(vocab, merges)
    assert not tok._ordered
    ids = [tok._byte_id[x] for x in b"abcabc"]
    assert tok._bpe_loop(list(ids)) == [257, 257]
    assert tok._bpe_leftmost(list(ids)) == [258, 256]  # why the check on merge order exists
    assert tok._bpe_heap(list(ids)) == [257, 257]
    assert tok.encode("abcabc") == [257, 257]
    assert tok.encode("abca") == [258]  # (a,bc) then (abc,a): a lower rank may come later
    for text in ["abcabcabc", "aabcbc", "abc" * 100 + "a", ("abca" * 60) + "bc"]:
        ids = [tok._byte_id[x] for x in text.encode()]
        want = tok._bpe_loop(list(ids))
        assert tok._bpe_heap(list(ids)) == want
        assert tok.encode(text) == want
        assert tok.decode(want) == text


@settings(max_examples=300, deadline=None)
@given(text=st.one_of(any_text, st.text(alphabet=" \t\n\r\x0b\x0c\x1c\x85\xa0aZ9'slvdt.!é日٣", max_size=60)),
       cut=st.integers(0, 80))
def test_pretokenize_equals_gpt2_regex(text, cut):
    end = min(cut, len(text))
    for sparse in (pretokmod._SPARSE_NON_ASCII, 0):  # 0: the ASCII fast path around every non-ASCII char
        with mock.patch.object(pretokmod, "_SPARSE_NON_ASCII", sparse):
            assert pretokenize(text) == PRETOKEN_RE.findall(text)
            assert pretokenize(text, 0, end) == PRETOKEN_RE.findall(text, 0, end)
            assert pretokenize(text, end) == PRETOKEN_RE.findall(text, end)


@settings(max_examples=100, deadline=None)
@given(inserts=st.lists(st.tuples(st.integers(0, 6000), st.sampled_from(FRAGMENTS + ["é", "\xa0", "\u2028"])),
                        max_size=12))
def test_pretokenize_mostly_ascii_text(inserts):
    """English text with a few non-ASCII characters: the default (mixed) path of pretokenize."""
    text = fixture_text("enc_tinyshakespeare_head.txt")[:6000]
    for at, frag in sorted(inserts, reverse=True):
        text = text[:at] + frag + text[at:]
    assert pretokenize(text) == PRETOKEN_RE.findall(text)


@pytest.mark.parametrize("name", TEXT_FILES)
def test_pretokenize_equals_gpt2_regex_on_real_text(name):
    text = fixture_text(name)
    for sparse in (pretokmod._SPARSE_NON_ASCII, 0):
        with mock.patch.object(pretokmod, "_SPARSE_NON_ASCII", sparse):
            assert pretokenize(text) == PRETOKEN_RE.findall(text)
    # every ASCII character next to every other, and next to a non-ASCII one
    chars = [chr(c) for c in range(128)] + ["é"]
    probe = "".join(a + b for a in chars for b in chars)
    with mock.patch.object(pretokmod, "_SPARSE_NON_ASCII", 0):
        assert pretokenize(probe) == PRETOKEN_RE.findall(probe)


# ----------------------------------------------------------------------------- encode_iterable

def _chunked(text: str, sizes: list[int]):
    i = 0
    k = 0
    while i < len(text):
        n = sizes[k % len(sizes)] if sizes else len(text)
        yield text[i:i + n]
        i += max(n, 1)
        k += 1


@pytest.mark.parametrize("name", TEXT_FILES)
def test_encode_iterable_over_file_handle_equals_encode(name, tmp_path):
    tok = gpt2_tokenizer()
    path = FIXTURES / name
    text = path.read_text(encoding="utf-8")
    with open(path, encoding="utf-8") as f:
        assert list(tok.encode_iterable(f)) == tok.encode(text)


def test_encode_iterable_straddling_lines(tmp_path):
    """Whitespace runs, \\r\\n, contractions and special tokens that span line boundaries."""
    base = gpt2_tokenizer()
    special = "<|sep\n|>"  # a special token with a newline in it: it straddles two lines
    tok = Tokenizer(base.vocab, base.merges, [EOT, EOT + EOT, special])
    text = ("Line one   \n\n\n   indented\r\n\r\n   \r\nit's\n's and 'll\n" + EOT + "\n" + EOT + EOT
            + "\nword<|sep\n|>word <|sep\n|> <|sep\n" + "tail  \n \n\t\n" + "x" * 300 + "\n" + " " * 50 + "\n"
            + EOT + "\n" + EOT + "<|endof\ntext|>" + " end   ")
    path = tmp_path / "straddle.txt"
    path.write_bytes(text.encode("utf-8"))
    with open(path, encoding="utf-8", newline="") as f:  # newline="" keeps \r\n as it is
        assert list(tok.encode_iterable(f)) == tok.encode(text)
    assert tok.special_ids[special] in tok.encode(text)
    for sizes in ([1], [2, 3], [5], [7, 1, 13]):
        assert list(tok.encode_iterable(_chunked(text, sizes))) == tok.encode(text), sizes


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=fragment_texts, sizes=st.lists(st.integers(1, 12), min_size=1, max_size=5))
def test_encode_iterable_any_chunking_property(text, sizes):
    base = gpt2_tokenizer()
    tok = _overlapping_specials_tokenizer()
    assert list(tok.encode_iterable(_chunked(text, sizes))) == tok.encode(text)
    assert list(base.encode_iterable(_chunked(text, sizes))) == base.encode(text)


@functools.lru_cache(maxsize=None)
def _overlapping_specials_tokenizer() -> Tokenizer:
    base = gpt2_tokenizer()
    return Tokenizer(base.vocab, base.merges, [EOT, EOT + EOT, "<|", "endoftext"])


@pytest.mark.slow
def test_encode_iterable_is_lazy_and_bounded():
    tok = gpt2_tokenizer()
    pulled = 0

    def lines(n):
        nonlocal pulled
        for i in range(n):
            pulled += 1
            yield f"line {i % 97} of a long file, with words   and runs\n"

    it = tok.encode_iterable(lines(10**9))  # never materialised
    first = [next(it) for _ in range(20)]
    assert first[:2] == tok.encode("line 0")[:2]
    assert pulled < 10
    # memory does not grow with the number of lines consumed
    peaks = []
    for n in (2_000, 20_000):
        tracemalloc.start()
        count = sum(1 for _ in tok.encode_iterable(lines(n)))
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        assert count > n * 10
    assert peaks[1] < 1.5 * peaks[0] + 200_000, peaks


def test_encode_iterable_accepts_stringio():
    tok = gpt2_tokenizer()
    text = fixture_text("enc_tinystories_sample.txt")
    assert list(tok.encode_iterable(io.StringIO(text))) == tok.encode(text)


def test_encode_iterable_rejects_binary_handle(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("hello world\n", encoding="utf-8")
    with open(path, "rb") as f, pytest.raises(DataError, match="text mode"):
        list(gpt2_tokenizer().encode_iterable(f))
