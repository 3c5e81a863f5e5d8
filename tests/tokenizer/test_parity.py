"""Parity of our encoder with tiktoken and HuggingFace ``tokenizers`` given the same vocab/merges.

tiktoken's own "gpt2" encoding needs a download, so the references are built from our files:
``Tokenizer.to_tiktoken()`` and a ``tokenizer.json`` written by ``Tokenizer.to_hf()``. Both are
independent implementations of the merging (tiktoken: Rust, rank of the merged bytes; HF: Rust,
rank of the pair), so agreement checks our merge loop, pre-tokenizer and special-token split.
"""
from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import pytest
import tiktoken
import tokenizers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmrun.errors import FormatError
from lmrun.tokenizer.bpe import train_bpe
from lmrun.tokenizer.tokenizer import Tokenizer
from tests.tokenizer.test_tokenizer import (
    EOT, FIXTURES, FRAGMENTS, TEXT_FILES, fixture_text, gpt2_tokenizer, small_tokenizer,
)

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"

# Random text for the parity properties: code points assigned by Unicode 14 (Python 3.11's
# unicodedata; hypothesis filters categories with it). Characters assigned later are letters to
# the ``regex`` module (Unicode 17 tables) but not to tiktoken's or HF's regex engines (older
# tables), e.g. U+323B0 (CJK Extension J), so pre-tokenization differs on them by design.
_assigned = st.characters(exclude_categories=("Cs", "Cn"))
parity_texts = st.one_of(
    st.text(alphabet=_assigned),
    st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(alphabet=_assigned, max_size=8)), max_size=30).map("".join),
)

ADVERSARIAL = [
    "", " ", "  ", "\n", "\n\n\n", "   \n\n   x", "a  b   c    d", "trailing spaces   ", "   leading",
    "\r\n", "line\r\nline\r\n\r\n", "\t\tindent\t", "\u00a0\u2003\u3000 \u00a0x", "\x0b\x0c\x1c\x1d\x1e\x1f\x85",
    "'s 'S 'll 'LL 'Ll 've 're 'd 'm 't", "it's I'm we'll they've you're he'd can't", "''s '''ll ' s",
    "x's", "X'S", "'sss", "'llama", "1 12 123 1234 12345 123456", "3.14159 -2.5e10 1,000,000 ٣٤٥ ½ Ⅻ ⁴",
    "abc123def 4real", "HTTP/1.1 200 OK", "https://example.com/a?b=c&d=e#f", "foo@bar.com", "$$$ %%% ^^^",
    "!!!???...", "—–-", "“smart” ‘quotes’", "👩‍👩‍👧 🙂👍🏽", "e\u0301 a\u0308\u0323 \u200d\u200c", "\ufeffBOM",
    "日本語のテキスト、句読点。", "Ελληνικά και English", "עברית العربية हिन्दी 한국어", "Ñandú ß ﬁ Straße",
    "\U0001d400\U0001d401 \U00010348", "\ufffd\ufffd", "x" * 1000, " " * 1000, "ab" * 700, "🙂" * 100,
    EOT, EOT + EOT, f"a{EOT}b", f" {EOT} ", f"{EOT}\n\n{EOT}", f"word{EOT}word", f"'s{EOT}'ll", f"<|{EOT}|>",
    "<|endoftext", "endoftext|>", "<|endoftext|", "\x00\x01\x02\x7f",
]


def all_texts() -> list[str]:
    return ADVERSARIAL + [fixture_text(n) for n in TEXT_FILES]


@functools.lru_cache(maxsize=None)
def tiktoken_of(kind: str) -> tiktoken.Encoding:
    return _tokenizer(kind).to_tiktoken()


@functools.lru_cache(maxsize=None)
def hf_of(kind: str) -> tokenizers.Tokenizer:
    path = Path(tempfile.mkdtemp(prefix="lmrun-enc-hf-")) / "tokenizer.json"
    _tokenizer(kind).to_hf(path)
    return tokenizers.Tokenizer.from_file(str(path))


@functools.lru_cache(maxsize=None)
def trained_tokenizer() -> Tokenizer:
    """Trained by our own ``train_bpe`` (1,000 tokens; <|endoftext|> at id 0, bytes at 1..256,
    then merges in order) on the Shakespeare fixture."""
    vocab, merges = train_bpe(FIXTURES / "enc_tinyshakespeare_head.txt", 1000, [EOT], num_workers=1)
    return Tokenizer(vocab, merges, [EOT])


def _tokenizer(kind: str) -> Tokenizer:
    return {"gpt2": gpt2_tokenizer, "small": small_tokenizer, "trained": trained_tokenizer,
            "shuffled": lambda: small_tokenizer(2000, shuffle_ids=True)}[kind]()


KINDS = ["gpt2", "small", "trained", "shuffled"]


# ----------------------------------------------------------------------------- tiktoken

def test_gpt2_export_uses_our_ids_as_ranks():
    enc = tiktoken_of("gpt2")
    assert type(enc) is tiktoken.Encoding  # ids grow with merge order: no renumbering needed
    assert enc.encode("hello world") == [31373, 995]
    assert enc.encode(EOT, allowed_special="all") == [50256]
    assert enc.n_vocab == 50257 and enc.eot_token == 50256
    # the 256 byte tokens keep GPT-2's ids (bytes_to_unicode order, not byte order)
    tok = gpt2_tokenizer()
    assert enc.encode_single_token(b"!") == tok._token_id[b"!"] == 0
    assert enc.encode_single_token(b" ") == tok._token_id[b" "] == 220


@pytest.mark.parametrize("kind", KINDS)
def test_tiktoken_parity_on_texts(kind):
    tok, enc = _tokenizer(kind), tiktoken_of(kind)
    for text in all_texts():
        ids = tok.encode(text)
        assert enc.encode(text, allowed_special="all") == ids, text[:80]
        assert enc.decode(ids) == text


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=parity_texts)
def test_tiktoken_parity_property(kind, text):
    assert tiktoken_of(kind).encode(text, allowed_special="all") == _tokenizer(kind).encode(text)


def test_trained_tokenizer_export_keeps_ids():
    tok, enc = trained_tokenizer(), tiktoken_of("trained")
    assert type(enc) is tiktoken.Encoding  # train_bpe's ids follow merge order
    assert tok.special_ids == {EOT: 0} and enc.eot_token == 0
    assert enc.encode_single_token(b"a") == tok._token_id[b"a"] == 1 + ord("a")
    text = fixture_text("enc_tinyshakespeare_head.txt")
    assert len(tok.encode(text)) < len(text) / 2  # trained on it: compresses it


def test_shuffled_ids_are_mapped_back():
    tok, enc = _tokenizer("shuffled"), tiktoken_of("shuffled")
    assert type(enc) is not tiktoken.Encoding and isinstance(enc, tiktoken.Encoding)
    text = fixture_text("enc_tinystories_sample.txt")
    ids = tok.encode(text)
    assert enc.encode(text, allowed_special="all") == ids
    assert enc.encode_ordinary("hello world") == tok.encode("hello world")
    assert list(enc.encode_to_numpy("hello world")) == tok.encode("hello world")
    assert enc.encode_batch(["a b", "c d"]) == [tok.encode("a b"), tok.encode("c d")]
    assert enc.decode(ids) == text and enc.decode_bytes(ids) == text.encode("utf-8")
    assert enc.decode_batch([ids[:5], ids[5:9]]) == [tok.decode(ids[:5]), tok.decode(ids[5:9])]
    i = tok._token_id[b" the"]
    assert enc.encode_single_token(" the") == i and enc.decode_single_token_bytes(i) == b" the"
    assert enc.eot_token == tok.special_ids[EOT] and enc.max_token_value == tok.vocab_size - 1
    # the ids really are not in merge order, so renumbering was needed
    mids = [tok._token_id[a + b] for a, b in tok.merges]
    assert mids != sorted(mids)


def test_to_tiktoken_needs_all_bytes():
    tok = Tokenizer({0: b"a", 1: b"b", 2: b"ab"}, [(b"a", b"b")])
    with pytest.raises(FormatError, match="one-byte token"):
        tok.to_tiktoken()


# ----------------------------------------------------------------------------- HuggingFace tokenizers

@pytest.mark.parametrize("kind", KINDS)
def test_hf_parity_on_texts(kind):
    tok, hf = _tokenizer(kind), hf_of(kind)
    for text in all_texts():
        assert hf.encode(text).ids == tok.encode(text), text[:80]


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=parity_texts)
def test_hf_parity_property(kind, text):
    assert hf_of(kind).encode(text).ids == _tokenizer(kind).encode(text)


def test_hf_file_contents(tmp_path):
    tok = Tokenizer(gpt2_tokenizer().vocab, gpt2_tokenizer().merges, [EOT, "<|pad|>", EOT + EOT])
    tok.to_hf(tmp_path / "tokenizer.json")
    hf = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert hf.get_vocab_size(with_added_tokens=True) == tok.vocab_size == 50259
    assert hf.token_to_id("Ġthe") == tok._token_id[b" the"]
    assert hf.token_to_id("<|pad|>") == 50257
    # specials: added tokens, matched leftmost-longest like ours
    text = f"x{EOT}{EOT}{EOT}<|pad|> y"
    assert hf.encode(text).ids == tok.encode(text) == [87, 50258, 50256, 50257, 331]
    assert hf.decode(tok.encode("hello world, it's 2024"), skip_special_tokens=False) == "hello world, it's 2024"


# ----------------------------------------------------------------------------- full corpora (optional)

@pytest.mark.slow
@pytest.mark.skipif(not (SHARED / "corpora").is_dir(), reason="../shared/data not present")
def test_full_corpus_parity():
    """Every corpus in ../shared/data: our ids == tiktoken's == HF's, for GPT-2 and two small tokenizers."""
    files = sorted(p for p in (SHARED / "corpora").rglob("*") if p.is_file() and p.name != "README")
    assert files
    for kind in ("gpt2", "small", "trained"):
        tok, enc, hf = _tokenizer(kind), tiktoken_of(kind), hf_of(kind)
        for path in files:
            text = path.read_text(encoding="utf-8", errors="replace")
            ids = tok.encode(text)
            assert enc.encode(text, allowed_special="all") == ids, path
            assert hf.encode(text).ids == ids, path
            with open(path, encoding="utf-8", errors="replace", newline="") as f:
                assert list(tok.encode_iterable(f)) == ids, path


# ----------------------------------------------------------------------------- benchmark script

def test_bench_encode_script_runs_and_reports(tmp_path, capsys):
    import json

    from lmrun.tokenizer import bench_encode
    from tests.tokenizer.test_tokenizer import gpt2_files

    vocab, merges = gpt2_files()
    out = tmp_path / "bench.json"
    texts = [FIXTURES / "enc_tinystories_sample.txt", FIXTURES / "enc_german.txt"]
    rc = bench_encode.main(["--vocab", str(vocab), "--merges", str(merges), "--repeats", "1", "--json", str(out)]
                           + [a for t in texts for a in ("--text", str(t))])
    assert rc == 0
    r = json.loads(out.read_text())
    assert r["bytes"] == sum(len(t.read_bytes()) for t in texts)
    assert r["tokens"] == len(gpt2_tokenizer().encode("".join(t.read_text(encoding="utf-8") for t in texts)))
    assert r["ratio_cold"] > 0 and r["ratio_warm"] > 0 and r["tiktoken_mb_s"] > 0
    assert "MB/s" in capsys.readouterr().out
    assert bench_encode.main(["--vocab", str(tmp_path / "nope.json"), "--merges", str(merges)]) == 2


def test_bench_encode_bulk_reports_every_backend_and_worker_count(tmp_path, capsys):
    import json

    from lmrun.tokenizer import bench_encode
    from tests.tokenizer.test_tokenizer import gpt2_files

    vocab, merges = gpt2_files()
    out = tmp_path / "bench.json"
    rc = bench_encode.main(["--vocab", str(vocab), "--merges", str(merges), "--repeats", "1", "--no-python", "--no-hf",
                            "--bulk", "--text", str(FIXTURES / "enc_tinystories_sample.txt"), "--json", str(out)])
    assert rc == 0
    runs = json.loads(out.read_text())["bulk"]["runs"]  # every run's ids were checked identical
    assert [(r["backend"], r["processes"]) for r in runs] == [("native", 1), ("native", 2), ("tiktoken", 1),
                                                              ("tiktoken", 2)]
    assert all(r["mb_per_s"] > 0 and len(r["speedup_rounds"]) == 1 for r in runs)
    assert "native    2 thread(s)" in capsys.readouterr().out


@pytest.mark.slow
def test_every_assigned_code_point_parity():
    """Each code point assigned by Unicode 14, in contexts that pre-tokenization depends on
    (letter/number/other runs, a following contraction, a leading space)."""
    import unicodedata

    chars = [chr(c) for c in range(0x110000) if unicodedata.category(chr(c)) not in ("Cs", "Cn")]
    text = "\n".join(f"{ch}'s {ch}{ch}1 a{ch}" for ch in chars)
    tok = _tokenizer("gpt2")
    ids = tok.encode(text)
    assert tiktoken_of("gpt2").encode(text, allowed_special="all") == ids
    assert hf_of("gpt2").encode(text).ids == ids
