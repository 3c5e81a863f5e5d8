"""BPE training (lmrun.tokenizer.bpe, lmrun.tokenizer.pretokenize, the C merge loop) against a
naive reference (tests/tokenizer/reference_bpe.py) on small real texts."""
from __future__ import annotations

import logging
import sys
from functools import lru_cache
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmrun.errors import ConfigError, DataError, LmrunError
from lmrun.tokenizer import bpe
from lmrun.tokenizer.bpe import train_bpe, train_bpe_from_counts
from lmrun.tokenizer.formats import check_consistent, load_merges, load_vocab, save_merges, save_vocab
from lmrun.tokenizer.pretokenize import count_pretokens, find_chunk_boundaries

from .reference_bpe import naive_pretoken_counts, naive_train_bpe, naive_train_from_counts

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures"
SHAKESPEARE = REPO / "lmrun" / "data" / "corpora" / "tinyshakespeare.txt"
EOT = "<|endoftext|>"

try:
    import lmrun.tokenizer._bpe  # noqa: F401

    HAVE_C = True
except ImportError:
    HAVE_C = False

BACKENDS = [pytest.param("c", marks=pytest.mark.skipif(not HAVE_C, reason="C extension not built")), "python"]

# (fixture file, special tokens, vocab sizes): small slices of real text (see fixtures/SOURCES.md)
CASES = {
    "shakespeare": ("enc_tinyshakespeare_head.txt", [], [257, 300, 600]),
    "corpus_en": ("enc_corpus_en_head.txt", [], [300, 700]),
    "german_utf8": ("enc_german.txt", [], [280, 1000]),  # 1000: runs out of pairs first
    "wikitext_utf8": ("enc_wikitext2_valid_slice.txt", [], [400]),
    "tinystories_eot": ("enc_tinystories_sample.txt", [EOT], [300, 600]),
    "tinystories_no_special": ("enc_tinystories_sample.txt", [], [400]),
    "tinystories_prefix_special": ("enc_tinystories_sample.txt", ["<|end", EOT, "Ben"], [400]),
}
PARAMS = [(name, v) for name, (_, _, sizes) in CASES.items() for v in sizes]


@lru_cache(maxsize=None)
def reference(name: str, vocab_size: int):
    fname, specials, _ = CASES[name]
    text = (FIXTURES / fname).read_text(encoding="utf-8")
    return naive_train_bpe(text, vocab_size, specials)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,vocab_size", PARAMS)
def test_matches_naive_reference(name, vocab_size, backend):
    fname, specials, _ = CASES[name]
    vocab, merges = train_bpe(FIXTURES / fname, vocab_size, specials, num_workers=1, backend=backend)
    ref_vocab, ref_merges = reference(name, vocab_size)
    assert merges == ref_merges
    assert vocab == ref_vocab
    assert len(vocab) <= vocab_size


def test_matches_naive_reference_with_worker_pool():
    vocab, merges = train_bpe(FIXTURES / "enc_tinystories_sample.txt", 600, [EOT], num_workers=2)
    assert (vocab, merges) == reference("tinystories_eot", 600)


@pytest.mark.skipif(not HAVE_C, reason="C extension not built")
def test_c_and_python_backends_agree_on_bigger_text():
    counts = count_pretokens(SHAKESPEARE, [], num_workers=2)
    c = train_bpe_from_counts(counts, 3000, [EOT], backend="c")
    py = train_bpe_from_counts(counts, 3000, [EOT], backend="python")
    assert len(c[0]) == 3000
    assert c == py


# Random words over tiny alphabets hit ties, repeated tokens ("aaaa") and words that run out
# of pairs; multi-byte characters give merges of partial UTF-8 sequences.
words = st.text(alphabet=st.sampled_from(["a", "b", " ", "é", "\n"]), min_size=1, max_size=12)


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(words, st.integers(1, 30), min_size=1, max_size=8), st.integers(256, 320))
def test_random_counts_match_reference(word_counts, vocab_size):
    counts = {w.encode("utf-8"): c for w, c in word_counts.items()}
    ref = naive_train_from_counts(counts, vocab_size, [])
    for backend in ["c", "python"] if HAVE_C else ["python"]:
        assert train_bpe_from_counts(counts, vocab_size, [], backend=backend) == ref


def test_vocab_layout_and_specials_never_merged():
    specials = [EOT, "<|pad|>"]
    vocab, merges = train_bpe(FIXTURES / "enc_tinystories_sample.txt", 500, specials, num_workers=1)
    assert [vocab[0], vocab[1]] == [s.encode() for s in specials]
    assert all(vocab[2 + b] == bytes([b]) for b in range(256))
    assert sorted(vocab) == list(range(len(vocab))) and len(vocab) == 500
    # the rest: one new token per merge, in merge order
    assert [vocab[258 + i] for i in range(len(merges))] == [a + b for a, b in merges]
    # the special token is cut out of the text: none of its pieces is ever merged
    assert not [m for m in merges if b"<" in m[0] + m[1] or b"endof" in m[0] + m[1]]
    check_consistent(vocab, merges)


def test_special_token_text_is_ordinary_text_without_specials():
    vocab, merges = train_bpe(FIXTURES / "enc_tinystories_sample.txt", 600, [], num_workers=1)
    assert (b"<", b"|") in merges and (b"e", b"ndoftext") in merges


def test_save_and_load_roundtrip(tmp_path):
    vocab, merges = train_bpe(FIXTURES / "enc_german.txt", 400, [EOT], num_workers=1)
    save_vocab(vocab, tmp_path / "vocab.json")
    save_merges(merges, tmp_path / "merges.txt")
    assert load_vocab(tmp_path / "vocab.json") == vocab
    assert load_merges(tmp_path / "merges.txt") == merges


# ---------------------------------------------------------------- pre-token counting / chunking


@pytest.mark.parametrize("fname,specials", [
    ("enc_tinyshakespeare_head.txt", []),
    ("enc_german.txt", []),
    ("enc_wikitext2_valid_slice.txt", []),
    ("enc_tinystories_sample.txt", [EOT]),
    ("enc_tinystories_sample.txt", ["<|end", EOT]),
])
@pytest.mark.parametrize("chunk_bytes", [40, 700, 1 << 24])
@pytest.mark.parametrize("num_workers", [1, 2])
def test_chunking_does_not_change_counts(fname, specials, chunk_bytes, num_workers):
    path = FIXTURES / fname
    expected = naive_pretoken_counts(path.read_text(encoding="utf-8"), specials)
    assert count_pretokens(path, specials, num_workers=num_workers, chunk_bytes=chunk_bytes) == expected


def test_chunk_boundaries_are_safe_cuts():
    path = FIXTURES / "enc_tinystories_sample.txt"
    data = path.read_bytes()
    b = find_chunk_boundaries(path, 200, [EOT.encode()])
    assert b[0] == 0 and b[-1] == len(data) and b == sorted(set(b))
    assert len(b) > 5
    assert all(data.startswith(EOT.encode(), p) for p in b[1:-1])

    path = FIXTURES / "enc_tinyshakespeare_head.txt"
    data = path.read_bytes()
    b = find_chunk_boundaries(path, 500, [])
    assert len(b) > 20
    for p in b[1:-1]:
        assert data[p - 1 : p] == b"\n" and data[p - 2 : p - 1].isalnum() and data[p : p + 1].isalnum()


def test_chunk_without_any_safe_cut_is_merged(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes("ß ü. ".encode() * 300)  # no special token, no newline
    assert find_chunk_boundaries(path, 64, [EOT.encode()]) == [0, path.stat().st_size]


def test_overlapping_special_tokens_are_not_split(tmp_path):
    # "|a|><|b" overlaps "<|a|>" and "<|b|>": a cut at the start of "<|b|>" is wrong in
    # "x |a|><|b|>" (the longer token is matched there first) and at "|a|><|b" in "x <|a|>..."
    path = tmp_path / "t.txt"
    text = "word <|a|><|b|> more text\nword |a|><|b|> more\n" * 100
    path.write_text(text)
    specials = ["<|a|>", "|a|><|b", "<|b|>"]
    expected = naive_pretoken_counts(text, specials)
    for chunk in range(5, 60):
        assert count_pretokens(path, specials, num_workers=1, chunk_bytes=chunk) == expected


# Text built from pieces that stress the cut rules: whitespace kinds (incl. the separators
# U+001C..U+001F that str.isspace() calls whitespace but the regex does not), letters and
# digits around newlines, contractions, non-ASCII letters and the special token.
fragments = st.sampled_from(["a", "Z", "7", "\n", " ", "  ", "\t", "\r\n", "\x1c", "\u00a0", "\u3000", "'s", "'",
                             ".", "é", "ß", "٣", "😀", EOT, "<|", "x\ny", "1\n2"])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(fragments, min_size=1, max_size=60), st.integers(1, 40))
def test_random_text_chunking_matches_single_pass(tmp_path, parts, chunk_bytes):
    text = "".join(parts)
    path = tmp_path / "r.txt"
    path.write_text(text, encoding="utf-8")
    for specials in ([], [EOT]):
        expected = naive_pretoken_counts(text, specials)
        assert count_pretokens(path, specials, num_workers=1, chunk_bytes=chunk_bytes) == expected


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("num_workers", [1, 2])
def test_invalid_utf8_names_file_and_absolute_offset(tmp_path, num_workers):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"abc\n" * 1000 + b"caf\xff\n" + b"xyz\n" * 1000)
    with pytest.raises(DataError) as e:
        count_pretokens(path, [], num_workers=num_workers, chunk_bytes=256)
    msg = str(e.value)
    assert str(path) in msg and "4003" in msg and "\n" not in msg


def test_missing_and_empty_files_raise_data_error(tmp_path):
    with pytest.raises(DataError, match="not found"):
        train_bpe(tmp_path / "nope.txt", 300)
    with pytest.raises(DataError, match="not found"):
        find_chunk_boundaries(tmp_path / "nope.txt", 100, [])
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(DataError, match="empty"):
        train_bpe(tmp_path / "empty.txt", 300)


def test_vocab_size_too_small_raises_config_error():
    with pytest.raises(ConfigError) as e:
        train_bpe(FIXTURES / "enc_german.txt", 256, [EOT])
    msg = str(e.value)
    assert "vocab_size" in msg and "256" in msg and "257" in msg
    with pytest.raises(ConfigError):
        train_bpe_from_counts({b"ab": 1}, 100, [])
    with pytest.raises(ConfigError, match="backend"):
        train_bpe_from_counts({b"ab": 1}, 300, [], backend="rust")


def test_vocab_size_exactly_minimum_gives_no_merges():
    vocab, merges = train_bpe(FIXTURES / "enc_german.txt", 257, [EOT], num_workers=1)
    assert merges == [] and len(vocab) == 257


def test_c_backend_missing(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "lmrun.tokenizer._bpe", None)  # import now fails
    with pytest.raises(LmrunError, match="not built"):
        train_bpe_from_counts({b"abab": 2}, 300, [], backend="c")
    monkeypatch.setattr(bpe, "_warned_no_c", False)
    with caplog.at_level(logging.WARNING):
        vocab, merges = train_bpe_from_counts({b"abab": 2}, 300, [], backend="auto")
        train_bpe_from_counts({b"abab": 2}, 300, [], backend="auto")
    assert merges == [(b"a", b"b"), (b"ab", b"ab")]
    assert len([r for r in caplog.records if "C extension" in r.getMessage()]) == 1


@pytest.mark.skipif(not HAVE_C, reason="C extension not built")
def test_c_extension_rejects_malformed_input():
    from array import array

    from lmrun.tokenizer import _bpe

    assert _bpe.train(b"abab", array("q", [0, 4]), array("q", [3]), 5) == [(97, 98, 256), (256, 256, 257)]
    with pytest.raises(ValueError):
        _bpe.train(b"abab", array("q", [0, 5]), array("q", [3]), 5)  # past the end
    with pytest.raises(ValueError):
        _bpe.train(b"abab", array("q", [0, 4]), array("q", [0]), 5)  # count 0
    with pytest.raises(ValueError):
        _bpe.train(b"abab", array("q", [0, 2, 4]), array("q", [3]), 5)  # lengths disagree
    with pytest.raises(ValueError):
        _bpe.train(b"abab", array("q", [0, 4]), array("q", [3]), -1)


def test_no_merge_ever_reproduces_an_existing_token():
    # With left-to-right merging a token's bytes always split the same way, so the
    # token-identity-by-bytes rule never fires: every merge adds exactly one token.
    vocab, merges = train_bpe(SHAKESPEARE, 2000, [EOT], num_workers=2)
    assert len(merges) == len(vocab) - 257
    assert len(set(vocab.values())) == len(vocab)
