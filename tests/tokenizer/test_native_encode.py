"""The native (C) encoder: same ids as the pure-Python encoder and as tiktoken, on random Unicode
and on adversarial text; the pure-Python fallback without the extension; bulk encoding with it.

The references are built from the same vocabulary and merges (see test_parity.py): tiktoken
from ``Tokenizer.to_tiktoken()``, the pure-Python encoder from the same Tokenizer with its
native encoder switched off.
"""
from __future__ import annotations

import copy
import functools
import pickle
import random
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmrun.errors import DataError
from lmrun.tokenizer import native
from lmrun.tokenizer.bulk import encode_file
from lmrun.tokenizer.pretokenize import PRETOKEN_RE
from lmrun.tokenizer.tokenizer import Tokenizer
from tests.tokenizer.test_parity import KINDS, _assigned, _tokenizer, parity_texts, tiktoken_of
from tests.tokenizer.test_tokenizer import EOT, TEXT_FILES, fixture_text, gpt2_tokenizer

needs_native = pytest.mark.skipif(
    not native.available(), reason="native encoder unavailable (lmrun.tokenizer._encode not built, or LMRUN_NATIVE_ENCODE=0)")


def pure(tok: Tokenizer) -> Tokenizer:
    """The same tokenizer with the pure-Python encoder (what runs without a C compiler)."""
    t = copy.copy(tok)
    t._native = None
    t._cache = {}
    return t


@functools.lru_cache(maxsize=None)
def pure_of(kind: str) -> Tokenizer:
    return pure(_tokenizer(kind))


def check_all(kind: str, text: str) -> list[int]:
    """native == pure Python == tiktoken on ``text``; returns the ids."""
    tok = _tokenizer(kind)
    ids = tok.encode(text)
    assert pure_of(kind).encode(text) == ids
    assert tiktoken_of(kind).encode(text, allowed_special="all") == ids
    return ids


# ----------------------------------------------------------------------------- properties

@needs_native
@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=parity_texts)
def test_native_equals_python_and_tiktoken_property(kind, text):
    assert _tokenizer(kind)._native is not None
    check_all(kind, text)


_pretok_alphabet = st.one_of(st.sampled_from(" \t\n\r\x0b\x0c\x1c\x85\xa0\u2003\u3000aZ9'slvdtre.!é日٣½\u0301🙂"),
                             _assigned)


@needs_native
@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet=_pretok_alphabet, max_size=80))
def test_native_pretokenizer_equals_gpt2_regex(text):
    from lmrun.tokenizer import _encode

    assert _encode.scan(text) == len(_encode.pretokenize(text))
    assert _encode.pretokenize(text) == PRETOKEN_RE.findall(text)


@needs_native
@pytest.mark.slow
def test_native_equals_tiktoken_on_every_code_point():
    """All 1,112,064 non-surrogate code points, assigned or not: the native classes are
    tiktoken's (Unicode 16), so this holds even where the ``regex`` module (Unicode 17) differs."""
    chars = [chr(c) for c in range(0x110000) if not 0xD800 <= c < 0xE000]
    text = "\n".join(f"{ch}'s {ch}{ch}1 a{ch} {ch}" for ch in chars)
    assert gpt2_tokenizer().encode(text) == tiktoken_of("gpt2").encode(text, allowed_special="all")


# ----------------------------------------------------------------------------- adversarial text

def _adversarial() -> list[str]:
    rnd = random.Random(0)
    invalid = bytes(rnd.randrange(256) for _ in range(20000)).decode("utf-8", errors="replace")
    return [
        " " * 5000, " " * 5000 + "x", "x" + " " * 4999 + "\n", "\n" * 3000, "\t \t" * 1000 + "end", " \u00a0" * 2000,
        "7" * 5000, " 1234567890" * 500, "1" * 3000 + "a" * 3000 + "1" * 3000,
        "!" * 5000, "?!." * 2000, "'s" * 2000, "''" * 2000 + "s", " '" * 2000, "--==++" * 800,
        "🙂" * 3000, "👩‍👩‍👧‍👦" * 500, "🏳️‍🌈 🇺🇳 👍🏽👍🏿" * 300,
        "日本語のテキスト、句読点。中文字符串测试" * 300, "한국어 텍스트" * 500,
        "e\u0301" * 2000, "a" + "\u0308\u0323\u0301" * 1500, "\u0915\u094d\u0937" * 1000,
        invalid, "\ufffd" * 3000,
        EOT * 50, f"a{EOT}b{EOT}{EOT}c", f" {EOT} " * 100, f"word{EOT}word", f"'s{EOT}'ll", f"<|{EOT}|>",
        "<|endoftext" * 100, f"{EOT[:5]}{EOT}{EOT[5:]}", f"日本{EOT}語", f"🙂{EOT}🙂",
        "x\ud800y \udfff \ud83d\ude00",  # lone surrogates and a surrogate pair: replaced as tiktoken does
        "\x00\x01\x02\x7f\x1c\x1d\x1e\x1f", "\r\n" * 2000,
    ]


@needs_native
@pytest.mark.parametrize("kind", ["gpt2", "trained", "shuffled"])
def test_adversarial_texts(kind):
    for text in _adversarial():
        check_all(kind, text)


@needs_native
def test_adversarial_texts_concatenated():
    check_all("gpt2", "\n".join(_adversarial()))


@needs_native
@pytest.mark.slow
def test_ten_megabyte_single_line():
    """10 MB of real text on one line (newlines replaced by spaces), one encode call."""
    base = " ".join(fixture_text(n).replace("\n", " ") for n in TEXT_FILES)
    text = (base * (10_000_000 // len(base.encode()) + 1))
    text = text[:10_000_000]
    assert "\n" not in text
    ids = gpt2_tokenizer().encode(text)
    assert tiktoken_of("gpt2").encode(text, allowed_special="all") == ids
    assert gpt2_tokenizer().decode(ids) == text


@needs_native
@pytest.mark.slow
@pytest.mark.parametrize("text", [" " * 200_000, "a" * 200_000, "7" * 200_000, "ab" * 100_000, "🙂" * 50_000])
def test_long_runs_equal_pure_python(text):
    """Pre-tokens far longer than tiktoken's quadratic merge (or its regex stack) handles:
    the native heap merge against the pure-Python one."""
    tok = gpt2_tokenizer()
    ids = tok.encode(text)
    assert pure(tok).encode(text) == ids
    assert tok.decode(ids) == text


@needs_native
@pytest.mark.slow
def test_million_space_line():
    """tiktoken's regex gives up on this line ('Max stack size exceeded'); against pure Python."""
    for kind in ("gpt2", "trained"):
        tok = _tokenizer(kind)
        text = "a" + " " * 1_000_000 + "b\n" + "\t " * 100_000
        ids = tok.encode(text)
        assert pure_of(kind).encode(text) == ids
        assert tok.decode(ids) == text


# ----------------------------------------------------------------------------- behaviour

@needs_native
def test_real_texts_and_cache_states():
    tok = gpt2_tokenizer()
    for name in TEXT_FILES:
        text = fixture_text(name)
        ids = tiktoken_of("gpt2").encode(text, allowed_special="all")
        tok._native.clear_cache()
        assert tok.encode(text) == ids  # cold
        assert tok._native.cache_len > 0
        assert tok.encode(text) == ids  # warm
        for size in (0, 3):  # no cache; a cache cleared every 3 pre-tokens
            assert Tokenizer(tok.vocab, tok.merges, [EOT], cache_size=size).encode(text) == ids


@needs_native
def test_edge_cases_and_ranges():
    tok = gpt2_tokenizer()
    enc = tok._native
    assert tok.encode("") == [] and tok.encode(EOT) == [50256] and tok.encode(EOT * 3) == [50256] * 3
    for text in ["hello world", "héllo wörld 日本"]:
        ids = tok.encode(text)
        assert enc.encode(text) == ids and enc.encode(text, 0, None, [7]) == [7] + ids
        assert enc.encode(text, 6) == tok.encode(text[6:]) and enc.encode(text, 0, 5) == tok.encode(text[:5])
        assert enc.encode(text, 5, 2) == [] and enc.encode(text, -3, 10**9) == ids
    with pytest.raises(TypeError):
        enc.encode(b"bytes")
    big = Tokenizer(tok.vocab, tok.merges, [EOT], cache_size=10**12)  # capped, not allocated
    assert big.encode("hello world") == tok.encode("hello world")


@needs_native
def test_unordered_merges_native_uses_the_loop_semantics():
    vocab = {i: bytes([i]) for i in range(256)}
    vocab.update({256: b"bc", 257: b"abc", 258: b"abca"})
    tok = Tokenizer(vocab, [(b"b", b"c"), (b"abc", b"a"), (b"a", b"bc")])
    for text in ["abcabc", "abca", "abcabcabc", "aabcbc", "abc" * 100 + "a", ("abca" * 60) + "bc"]:
        assert tok.encode(text) == tok._bpe_loop([tok._byte_id[x] for x in text.encode()])


@needs_native
def test_byte_without_token_raises_data_error():
    vocab = {i: bytes([i]) for i in range(128)}
    tok = Tokenizer(vocab, [])
    assert tok.encode("ab") == [97, 98]
    with pytest.raises(DataError, match="0xc3"):
        tok.encode("é")


@needs_native
def test_encode_to_numpy_and_pickle():
    tok = gpt2_tokenizer()
    text = fixture_text(TEXT_FILES[2])  # TinyStories: documents separated by <|endoftext|>
    ids = tok.encode(text)
    for dtype in (np.uint16, np.uint32):
        arr = native.encode_to_numpy(tok, tok._native, text, dtype)
        assert arr.dtype == dtype and arr.tolist() == ids
    clone = pickle.loads(pickle.dumps(tok))
    assert clone._native is not None and clone.encode(text) == ids


def test_without_the_extension_warns_once_and_gives_the_same_ids(monkeypatch):
    """No C compiler at install: the tokenizer warns once and encodes in pure Python."""
    tok = gpt2_tokenizer()
    text = fixture_text(TEXT_FILES[0]) + EOT + "x\ud800 日本"
    want = tiktoken_of("gpt2").encode(text, allowed_special="all")
    monkeypatch.setattr(native, "_encode", None)
    monkeypatch.setattr(native, "_warned", False)
    with pytest.warns(RuntimeWarning, match="pure-Python encoder"):
        slow = Tokenizer(tok.vocab, tok.merges, [EOT])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = Tokenizer(tok.vocab, tok.merges, [EOT])  # once per process
    assert slow._native is None and again._native is None
    assert slow.encode(text) == want


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("LMRUN_NATIVE_ENCODE", "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tok = Tokenizer(gpt2_tokenizer().vocab, gpt2_tokenizer().merges, [EOT])
    assert tok._native is None
    assert tok.encode("hello world") == gpt2_tokenizer().encode("hello world")


@needs_native
@pytest.mark.parametrize("kind", ["gpt2", "shuffled"])
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=parity_texts, cuts=st.lists(st.integers(0, 200), max_size=8))
def test_encode_iterable_native_equals_python(kind, text, cuts):
    """Streaming (``encode_iterable``, native stable-prefix cut) == pure Python == encode, for
    any cut of the text into chunks (specials and pre-tokens cut across chunks)."""
    bounds = sorted({min(c, len(text)) for c in cuts} | {0, len(text)})
    chunks = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    tok = _tokenizer(kind)
    want = tok.encode(text)
    assert list(tok.encode_iterable(chunks)) == want
    assert list(pure_of(kind).encode_iterable(chunks)) == want


@needs_native
def test_encode_iterable_native_on_adversarial_lines():
    tok = gpt2_tokenizer()
    # not the surrogate pair: cut between chunks, its halves are two lone surrogates (U+FFFD
    # each) to any streaming encoder, pure Python included, not the character they encode
    text = "\n".join(t for t in _adversarial() if "\ud83d" not in t)
    want = tok.encode(text)
    for size in (1, 7, 100, 4096):
        chunks = [text[i:i + size] for i in range(0, len(text), size)]
        assert list(tok.encode_iterable(chunks)) == want
    assert list(tok.encode_iterable(text.splitlines(keepends=True))) == want


@needs_native
def test_encode_stable():
    enc = gpt2_tokenizer()._native
    out = []
    assert enc.encode_stable("hello big world", 0, None, out) == 5 and out == enc.encode("hello")
    assert enc.encode_stable("a b", 0, None, out) == 0 and enc.encode_stable("", 0, None, out) == 0
    assert enc.encode_stable("xx héllo wörld now", 3, None, []) == 8  # character indices
    out = []
    assert enc.encode_stable("\n\n0:", 0, None, out) == 2 and out == [198, 198]  # "\n", "\n": not "\n\n"


# ----------------------------------------------------------------------------- bulk

def _corpus(path: Path, copies: int) -> str:
    text = EOT.join(fixture_text(n) for n in TEXT_FILES) * copies
    path.write_text(text, encoding="utf-8")
    return text


@needs_native
@pytest.mark.parametrize("workers", [1, 2])
def test_bulk_native_equals_encode(tmp_path, workers):
    tok = gpt2_tokenizer()
    text = _corpus(tmp_path / "c.txt", 3)
    stats = encode_file(tmp_path / "c.txt", tok, tmp_path / "c.bin", num_workers=workers, chunk_bytes=20_000)
    got = np.fromfile(tmp_path / "c.bin", dtype=np.uint16)
    assert got.tolist() == tok.encode(text) and stats["tokens"] == len(got) and stats["chunks"] > 2


_PEAK = """
import resource, sys
from lmrun.tokenizer.bulk import encode_file
from tests.tokenizer.test_tokenizer import gpt2_tokenizer
tok = gpt2_tokenizer()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
encode_file(sys.argv[1], tok, sys.argv[2], num_workers=1, chunk_bytes=1 << 20)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""


@needs_native
@pytest.mark.slow
def test_bulk_peak_memory_does_not_grow_with_file_size(tmp_path):
    """Peak RSS growth of encode_file (1 process, 1 MiB chunks) on a 4 MB and a 24 MB file."""
    root = Path(__file__).resolve().parents[2]
    growth = []
    for copies in (1, 6):
        src = tmp_path / f"c{copies}.txt"
        base = EOT.join(fixture_text(n) for n in TEXT_FILES)
        src.write_text(base * (copies * 4_000_000 // len(base.encode()) + 1), encoding="utf-8")
        out = subprocess.run([sys.executable, "-c", _PEAK, str(src), str(tmp_path / "o.bin")], cwd=root,
                             capture_output=True, text=True, check=True)
        growth.append(int(out.stdout.split()[-1]))  # KiB
    assert growth[1] < growth[0] + 16 * 1024, growth


# ----------------------------------------------------------------------------- UTF-8 bytes (bulk path)

def _utf8_ids(tok: Tokenizer, data: bytes, dtype=np.uint32) -> list[int]:
    specials = [(s.encode("utf-8"), i) for s, i in tok.special_ids.items()]
    return native.encode_bytes_to_numpy(native.native_encoder(tok), data, specials, dtype).tolist()


@needs_native
@pytest.mark.parametrize("kind", ["gpt2", "shuffled"])
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=parity_texts)
def test_encode_utf8_equals_encode_property(kind, text):
    """The bytes path (C splits special tokens, no str) gives Tokenizer.encode's ids."""
    tok = _tokenizer(kind)
    assert _utf8_ids(tok, text.encode("utf-8")) == tok.encode(text)


@needs_native
def test_encode_utf8_special_tokens_longest_first_and_adversarial():
    tok = Tokenizer(gpt2_tokenizer().vocab, gpt2_tokenizer().merges, ["<|endoftext|>", "<|end|>", "<|endoftext|><|end|>"])
    for text in ["a<|endoftext|><|end|>b<|end|><|endoftext|>", "<|end", "<|endoftext|", "x<|end|>" * 50, "",
                 " " * 100_000 + "<|end|>" + "9" * 1000, "日本語 😀👍🏽 e\u0301<|endoftext|>\n\n  "]:
        assert _utf8_ids(tok, text.encode()) == tok.encode(text), text[:40]
    assert _utf8_ids(tok, b"hi<|end|>", np.uint16) == tok.encode("hi<|end|>")


@needs_native
@pytest.mark.parametrize("data", [b"abc\xff", b"ab\xe0\x80\x80", b"\xed\xa0\x80", b"x\xf4\x90\x80\x80", b"abc\xe6\x97",
                                  b"\xc0\xaf", b"ok\xe6x", b"12345678\x80"])
def test_encode_utf8_rejects_what_python_rejects(data):
    """Strict UTF-8 (no overlongs, surrogates or code points above U+10FFFF), with the offset,
    end and reason of Python's own decoder."""
    with pytest.raises(UnicodeDecodeError) as py:
        data.decode("utf-8")
    with pytest.raises(UnicodeDecodeError) as ours:
        _utf8_ids(gpt2_tokenizer(), data)
    assert (ours.value.start, ours.value.end, ours.value.reason) == (py.value.start, py.value.end, py.value.reason)


@needs_native
def test_encode_utf8_checks_its_output_buffer():
    enc = native.native_encoder(gpt2_tokenizer())
    with pytest.raises(ValueError, match="2- or 4-byte"):
        enc.encode_utf8(b"hello", np.empty(5, np.uint8))
    with pytest.raises(ValueError, match="room for 1 ids"):
        enc.encode_utf8(b"hello world", np.empty(1, np.uint32))
    with pytest.raises(OverflowError, match="special token id 70000"):
        enc.encode_utf8(b"x", np.empty(1, np.uint16), [(b"<s>", 70_000)])


@needs_native
def test_encode_utf8_threads_each_with_an_encoder():
    """Threads that each own an Encoder run in parallel (the GIL released) with the same ids."""
    import threading

    tok = gpt2_tokenizer()
    data = EOT.join(fixture_text(n) for n in TEXT_FILES).encode()
    want = tok.encode(data.decode())
    got: dict[int, list[int]] = {}

    def work(k: int) -> None:
        got[k] = _utf8_ids(tok, data)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(got[k] == want for k in range(4))


@needs_native
def test_bulk_threads_report_invalid_utf8_with_the_file_offset(tmp_path):
    tok = gpt2_tokenizer()
    src = tmp_path / "bad.txt"
    good = ("word " * 20 + "\n").encode() * 2000
    src.write_bytes(good + b"caf\xe9 au lait\n" + good)
    with pytest.raises(DataError, match=rf"{src}: not valid UTF-8 at byte offset {len(good) + 3} \(invalid continuation"):
        encode_file(src, tok, tmp_path / "bad.bin", num_workers=2, chunk_bytes=20_000)
    assert not (tmp_path / "bad.bin").exists()
