"""`lmrun stage=encode`: token arrays equal the tokenizer's ids, both backends agree, the
cache is reused, and an interrupted run leaves no partial artifact."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lmrun import cli
from lmrun.tokenizer.bulk import encode_file, token_dtype
from lmrun.tokenizer.tokenizer import Tokenizer

FAST = ["logger=none", "progress=false", "tokenizer.vocab_size=500"]


def run_encode(*overrides: str) -> dict:
    runs = Path.cwd() / "runs" / "encode"
    before = set(runs.iterdir()) if runs.exists() else set()
    assert cli.main(["stage=encode", *FAST, *overrides]) == 0
    (new,) = set(runs.iterdir()) - before
    return json.loads((new / "summary.json").read_text()) | {"meta": json.loads((new / "meta.json").read_text())}


@pytest.fixture
def docs_file(tmp_path) -> Path:
    src = Path(cli.CONF_DIR).parent / "lmrun" / "data" / "corpora" / "tinyshakespeare.txt"
    paragraphs = src.read_text(encoding="utf-8")[:80_000].split("\n\n")
    path = tmp_path / "docs.txt"
    path.write_text("<|endoftext|>".join(paragraphs), encoding="utf-8")
    return path


@pytest.mark.slow
def test_arrays_equal_tokenizer_ids_and_backends_agree(docs_file):
    common = ["data=text_files", f"data.train={docs_file}"]
    first = run_encode(*common, "tokenizer.backend=tiktoken")
    tokens_dir = Path(first["tokens_dir"])
    meta = json.loads((tokens_dir / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["eot_id"] == 0
    tok = Tokenizer.from_files(meta["tokenizer"]["vocab"], meta["tokenizer"]["merges"], ["<|endoftext|>"])
    for split in ("train", "val"):
        ids = np.memmap(tokens_dir / f"{split}.bin", dtype=meta["dtype"], mode="r")
        assert len(ids) == meta["splits"][split]["tokens"] == first[f"{split}_tokens"]
    train_text = Path(meta["sources"][0]["path"]).read_text(encoding="utf-8")
    all_ids = np.concatenate([np.fromfile(tokens_dir / f"{s}.bin", dtype=meta["dtype"]) for s in ("train", "val")])
    assert all_ids.tolist() == tok.encode(train_text)  # train + val = the whole file, cut at a document boundary
    assert int((all_ids == 0).sum()) == train_text.count("<|endoftext|>")
    tiktoken_bytes = (tokens_dir / "train.bin").read_bytes()
    second = run_encode(*common, "tokenizer.backend=native", "cache.rebuild=true")
    assert second["tokens_dir"] == first["tokens_dir"] and second["cached"] is False
    assert (tokens_dir / "train.bin").read_bytes() == tiktoken_bytes
    assert run_encode(*common)["cached"] is True


@pytest.mark.slow
def test_default_corpus_and_given_tokenizer_path(isolated_workspace):
    assert cli.main(["stage=tokenizer", *FAST]) == 0
    (tok_run,) = (isolated_workspace / "runs" / "tokenizer").iterdir()
    summary = run_encode(f"tokenizer.path={tok_run}")
    assert summary["train_tokens"] > 100_000 and 1.5 < summary["val_bytes_per_token"] < 2.5  # 1.86 measured at vocab 500
    assert summary["meta"]["tokenizer"]["vocab"] == str(tok_run / "vocab.json")


@pytest.mark.slow
def test_gpt2_files_as_given_tokenizer(docs_file, tmp_path):
    import gzip

    folder = tmp_path / "gpt2"
    folder.mkdir()
    fixtures = Path(__file__).resolve().parent.parent / "fixtures"
    for name in ("gpt2_vocab.json", "gpt2_merges.txt"):
        (folder / name).write_bytes(gzip.decompress((fixtures / f"enc_{name}.gz").read_bytes()))
    summary = run_encode("data=text_files", f"data.train={docs_file}", f"tokenizer.path={folder}")
    meta = summary["meta"]
    assert meta["vocab_size"] == 50257 and meta["dtype"] == "uint16" and meta["eot_id"] == 50256
    tok = Tokenizer.from_files(folder / "gpt2_vocab.json", folder / "gpt2_merges.txt", ["<|endoftext|>"])
    ids = np.fromfile(Path(summary["tokens_dir"]) / "train.bin", dtype=np.uint16)
    train_text = Path(meta["sources"][0]["path"]).read_text(encoding="utf-8")
    assert ids.tolist() == tok.encode(train_text)[: len(ids)]
    assert cli.main(["stage=encode", *FAST, f"tokenizer.path={tmp_path / 'nope'}"]) == 2


def test_chunked_parallel_encoding_is_exact(docs_file, tmp_path):
    tok = Tokenizer({i: bytes([i]) for i in range(256)}, [], ["<|endoftext|>"])
    whole = tok.encode(docs_file.read_text(encoding="utf-8"))
    for workers, chunk in ((1, 1 << 30), (2, 4096), (1, 777)):
        out = tmp_path / f"out-{workers}-{chunk}.bin"
        stats = encode_file(docs_file, tok, out, backend="native", num_workers=workers, chunk_bytes=chunk)
        assert np.fromfile(out, dtype=stats["dtype"]).tolist() == whole
        assert not list(tmp_path.glob("*.part*"))


def test_token_dtype():
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32


def test_interrupted_encode_leaves_no_artifact(docs_file, cache_dir, monkeypatch):
    import lmrun.tokenizer.bulk as bulk

    calls = []

    def interrupted(*args, **kwargs):
        calls.append(args)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return encode_file(*args, **kwargs)

    monkeypatch.setattr(bulk, "encode_file", interrupted)  # get_or_encode_tokens imports it on use
    assert cli.main(["stage=encode", *FAST, "data=text_files", f"data.train={docs_file}"]) == 130  # Ctrl-C: one line
    assert list((cache_dir / "tokens").iterdir()) == []
    (run_dir,) = (Path.cwd() / "runs" / "encode").iterdir()
    assert json.loads((run_dir / "run.json").read_text())["status"] == "interrupted"


def test_tiktoken_backend_falls_back_on_a_million_spaces(tmp_path):
    """Issue 25 F9: tiktoken's regex raises "Max stack size exceeded for backtracking" on a
    1M-space line; that chunk is encoded natively, with the same ids."""
    pytest.importorskip("tiktoken")
    from lmrun.tokenizer.bpe import train_bpe

    src = Path(cli.CONF_DIR).parent / "lmrun" / "data" / "corpora" / "tinyshakespeare.txt"
    train = tmp_path / "train.txt"
    train.write_text(src.read_text(encoding="utf-8")[:50_000], encoding="utf-8")
    vocab, merges = train_bpe(train, 400, ["<|endoftext|>"])
    tok = Tokenizer(vocab, merges, ["<|endoftext|>"])
    text = "First line.\n" + " " * 1_000_000 + "\nafter the spaces<|endoftext|>next document\n"
    with pytest.raises(ValueError, match="stack"):  # what tiktoken alone does (the bug)
        tok.to_tiktoken().encode(text, allowed_special="all")
    path = tmp_path / "spaces.txt"
    path.write_text(text, encoding="utf-8")
    out = tmp_path / "spaces.bin"
    stats = encode_file(path, tok, out, backend="tiktoken", num_workers=1, chunk_bytes=1 << 16)
    ids = np.fromfile(out, dtype=token_dtype(max(tok.vocab) + 1)).tolist()
    assert ids == tok.encode(text) and stats["tokens"] == len(ids)
    assert stats["native_fallback_chunks"] >= 1
    assert "native_fallback_chunks" not in encode_file(path, tok, tmp_path / "n.bin", backend="native", num_workers=1)
