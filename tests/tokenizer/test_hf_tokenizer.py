"""Hugging Face tokenizer folders (lmrun.tokenizer.hf): transformers' AutoTokenizer, loading the
folder offline, gives exactly lmrun's ids on real and adversarial text; the reader gets lmrun's
vocab, merges and special tokens back."""
from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path

import pytest
import tokenizers
from transformers import AutoTokenizer

from lmrun.errors import FormatError
from lmrun.tokenizer.hf import HF_TOKENIZER_FILES, build_hf_tokenizer, load_hf_tokenizer, save_hf_tokenizer
from lmrun.tokenizer.pretokenize import GPT2_PATTERN
from lmrun.tokenizer.tokenizer import Tokenizer
from tests.tokenizer.test_parity import ADVERSARIAL, SHARED, _tokenizer, all_texts
from tests.tokenizer.test_tokenizer import EOT, gpt2_tokenizer, small_tokenizer

REPO = Path(__file__).resolve().parents[2]
KINDS = ["gpt2", "small", "trained", "shuffled"]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@functools.lru_cache(maxsize=None)
def hf_folder(kind: str) -> Path:
    tok = _tokenizer(kind)
    out = Path(tempfile.mkdtemp(prefix="lmrun-hf-")) / "tok"
    save_hf_tokenizer(tok.vocab, tok.merges, tok.special_tokens, out)
    return out


@functools.lru_cache(maxsize=None)
def auto(kind: str):
    return AutoTokenizer.from_pretrained(str(hf_folder(kind)), local_files_only=True)


def test_folder_contents_and_special_token_roles():
    out = hf_folder("small")
    assert {p.name for p in out.iterdir()} == set(HF_TOKENIZER_FILES)
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert cfg["eos_token"] == cfg["bos_token"] == cfg["pad_token"] == EOT
    roles = json.loads((out / "special_tokens_map.json").read_text())
    assert roles == {"bos_token": EOT, "eos_token": EOT, "pad_token": EOT}
    hf = auto("small")
    tok = small_tokenizer()
    assert hf.eos_token_id == hf.bos_token_id == hf.pad_token_id == tok.special_ids[EOT] == 2256
    assert len(hf) == tok.vocab_size
    # no BOS/EOS added by encoding, as lmrun
    assert hf("hello world")["input_ids"] == tok.encode("hello world")
    # tokenizer.json holds lmrun's regex, then the byte-level mapping
    doc = json.loads((out / "tokenizer.json").read_text())
    assert doc["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] == GPT2_PATTERN
    assert doc["decoder"]["type"] == "ByteLevel" and doc["normalizer"] is None


@pytest.mark.parametrize("kind", KINDS)
def test_auto_tokenizer_ids_equal_lmrun_on_texts(kind):
    tok, hf = _tokenizer(kind), auto(kind)
    for text in all_texts():
        ids = tok.encode(text)
        assert hf.encode(text, add_special_tokens=False) == ids, text[:80]
        assert hf.decode(ids) == tok.decode(ids), text[:80]


def test_examples_corpus_and_special_tokens_inside_text():
    tok, hf = gpt2_tokenizer(), auto("gpt2")
    text = (REPO / "examples" / "corpus_en.txt").read_text(encoding="utf-8")
    text = text[:20000] + EOT + text[20000:40000] + f" {EOT}{EOT}\n" + text[40000:60000]
    ids = tok.encode(text)
    assert ids.count(50256) == 3
    assert hf.encode(text, add_special_tokens=False) == ids
    assert hf.decode(ids) == text


def test_special_tokens_not_in_vocab_overlapping_and_non_ascii(tmp_path):
    base = small_tokenizer()
    vocab = {i: b for i, b in base.vocab.items() if b != EOT.encode()}
    specials = [EOT, "<|pad|>", EOT + EOT, "<|é 🙂|>", "<tok with space>"]
    tok = Tokenizer(vocab, base.merges, specials)
    save_hf_tokenizer(vocab, base.merges, specials, tmp_path, model_max_length=256)
    hf = AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    assert hf.model_max_length == 256
    assert [hf.convert_tokens_to_ids(s) for s in specials] == [tok.special_ids[s] for s in specials]
    text = f"x{EOT}{EOT}{EOT}<|pad|> y <|é 🙂|>é<tok with space> <tok with space>\n{EOT}"
    ids = tok.encode(text)
    assert hf.encode(text, add_special_tokens=False) == ids
    assert hf.decode(ids) == text
    assert hf.decode(ids, skip_special_tokens=True) == "x y é \n"
    # the same with the special tokens already in the vocab (as train_bpe writes it)
    save_hf_tokenizer(tok.vocab, base.merges, specials, tmp_path / "b")
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "b"), local_files_only=True)
    assert hf.encode(text, add_special_tokens=False) == ids and hf.decode(ids) == text


def test_a_special_token_that_is_a_regular_token_keeps_its_id(tmp_path):
    base = small_tokenizer()
    vocab = {i: b for i, b in base.vocab.items() if b != EOT.encode()}
    tok = Tokenizer(vocab, base.merges, ["the"])
    assert tok.special_ids["the"] == tok._token_id[b"the"]
    save_hf_tokenizer(vocab, base.merges, ["the"], tmp_path)
    hf = AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    text = "in the end, the other theatre"
    assert hf.encode(text, add_special_tokens=False) == tok.encode(text)
    # HF's vocab holds one string per id: a special token whose text differs from its token's
    # byte-level form (" the" is "Ġthe") cannot share the id
    with pytest.raises(FormatError, match="byte-level form 'Ġthe'"):
        save_hf_tokenizer(vocab, base.merges, [" the"], tmp_path / "b")


def test_no_special_tokens_and_overwriting_a_folder(tmp_path):
    base = small_tokenizer(500)
    vocab = {i: b for i, b in base.vocab.items() if b != EOT.encode()}
    tmp_path = tmp_path / "model"
    tmp_path.mkdir()
    (tmp_path / "config.json").write_text("{}")
    save_hf_tokenizer(vocab, base.merges, [EOT], tmp_path)
    save_hf_tokenizer(vocab, base.merges, [], tmp_path)
    assert (tmp_path / "config.json").read_text() == "{}"  # other files are kept
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*HF_TOKENIZER_FILES, "config.json"])
    hf = AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    tok = Tokenizer(vocab, base.merges)
    text = f"a{EOT}b  1234 日本"
    assert hf.encode(text, add_special_tokens=False) == tok.encode(text)
    assert hf.eos_token is None


def test_export_errors(tmp_path):
    with pytest.raises(FormatError, match="both hold"):
        save_hf_tokenizer({0: b"a", 1: b"a"}, [], [], tmp_path / "out")
    with pytest.raises(FormatError, match="not in the vocab"):
        save_hf_tokenizer({0: b"a", 1: b"b"}, [(b"a", b"b")], [], tmp_path / "out")
    # "Ā" is byte 0's printable form, so a special token with that text would collide
    with pytest.raises(FormatError, match="collides"):
        save_hf_tokenizer({0: b"\x00", 1: b"x"}, [], ["x\u0100"[1:]], tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# ----------------------------------------------------------------------------- reader

@pytest.mark.parametrize("kind", ["small", "shuffled"])
def test_reader_round_trip(kind):
    tok = _tokenizer(kind)
    d = load_hf_tokenizer(hf_folder(kind))
    assert d.notes == [] and d.gpt2_compatible and d.pattern == GPT2_PATTERN
    assert d.vocab == tok.vocab and d.merges == tok.merges and d.special_tokens == tok.special_tokens
    back = Tokenizer(d.vocab, d.merges, d.special_tokens)
    assert back.special_ids == tok.special_ids
    for text in ADVERSARIAL:
        assert back.encode(text) == tok.encode(text)


def test_reader_non_ascii_special_and_plain_byte_level_file(tmp_path):
    base = small_tokenizer(300)
    vocab = {i: b for i, b in base.vocab.items() if b != EOT.encode()}
    specials = [EOT, "<|é|>"]
    save_hf_tokenizer(vocab, base.merges, specials, tmp_path / "a")
    d = load_hf_tokenizer(tmp_path / "a" / "tokenizer.json")
    tok = Tokenizer(vocab, base.merges, specials)
    assert d.vocab == tok.vocab and d.special_tokens == specials
    # a tokenizer.json with tokenizers' own ByteLevel regex (GPT-2's files on the Hub look so)
    from tokenizers import pre_tokenizers
    hf = build_hf_tokenizer(tok.vocab, tok.merges, tok.special_tokens)
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.save(str(tmp_path / "plain.json"))
    d = load_hf_tokenizer(tmp_path / "plain.json")
    assert d.notes == [] and d.vocab == tok.vocab and d.merges == tok.merges
    for text in ADVERSARIAL:  # the same ids: tokenizers' GPT-2 regex is lmrun's
        assert hf.encode(text).ids == tok.encode(text), text[:80]


def test_reader_notes_what_lmrun_would_encode_differently(tmp_path):
    from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers
    llama3 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    hf = tokenizers.Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "ab": 2}, merges=[("a", "b")]))
    hf.normalizer = normalizers.NFC()
    hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(llama3), behavior="isolated"),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens(["<|begin_of_text|>"])
    hf.save(str(tmp_path / "tokenizer.json"))
    d = load_hf_tokenizer(tmp_path)
    assert d.pattern == llama3 and not d.gpt2_compatible
    assert any("regex" in n for n in d.notes) and any("NFC" in n for n in d.notes)
    assert d.vocab == {0: b"a", 1: b"b", 2: b"ab", 3: b"<|begin_of_text|>"} and d.merges == [(b"a", b"b")]
    assert d.special_tokens == ["<|begin_of_text|>"]


def test_reader_errors(tmp_path):
    with pytest.raises(FormatError, match="not found"):
        load_hf_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(FormatError, match="not a valid tokenizer.json") as e:
        load_hf_tokenizer(tmp_path)
    assert "\n" not in str(e.value)
    from tokenizers import models, pre_tokenizers
    hf = tokenizers.Tokenizer(models.WordLevel(vocab={"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    hf.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(FormatError, match="not BPE"):
        load_hf_tokenizer(tmp_path)
    hf = tokenizers.Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "ab": 2}, merges=[("a", "b")]))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(FormatError, match="not a byte-level"):
        load_hf_tokenizer(tmp_path)


# ----------------------------------------------------------------------------- full corpora (optional)

@pytest.mark.slow
@pytest.mark.skipif(not (SHARED / "corpora").is_dir(), reason="../shared/data not present")
def test_full_corpus_ids_equal_lmrun():
    files = sorted(p for p in (SHARED / "corpora").rglob("*") if p.is_file() and p.suffix in (".txt", ".en"))
    assert files
    for kind in ("gpt2", "trained"):
        tok, hf = _tokenizer(kind), auto(kind)
        for path in files:
            text = path.read_text(encoding="utf-8", errors="replace")
            ids = tok.encode(text)
            assert hf.encode(text, add_special_tokens=False) == ids, path
            assert hf.decode(ids) == text, path
