from __future__ import annotations

import pytest

from lmrun.data.corpora import DataConfig, prepare_corpus
from lmrun.errors import DataError
from lmrun.tracking.cache import ArtifactCache


def test_embedded_split_is_deterministic_and_exact(tmp_path):
    cfg = DataConfig(name="tinyshakespeare", train="pkg://tinyshakespeare.txt")
    a = prepare_corpus(cfg, ArtifactCache(tmp_path / "c1"))
    b = prepare_corpus(cfg, ArtifactCache(tmp_path / "c2"))
    src = (a.sources[0]["path"])
    whole = open(src, "rb").read()
    train, val = a.train.read_bytes(), a.val.read_bytes()
    assert train + val == whole
    assert train.endswith(b"\n") and 0.88 < len(train) / len(whole) < 0.92
    assert b.train.read_bytes() == train and b.val.read_bytes() == val


def test_split_at_document_separator(tmp_path):
    docs = [f"document number {i} " * 20 for i in range(50)]
    f = tmp_path / "docs.txt"
    f.write_text("<|endoftext|>".join(docs))
    c = prepare_corpus(DataConfig(name="text_files", train=str(f), val_fraction=0.2), ArtifactCache(tmp_path / "c"))
    train, val = c.train.read_text(), c.val.read_text()
    assert train.endswith("<|endoftext|>") and val.startswith("document number")
    assert train + val == f.read_text()


def test_explicit_val_file_is_used_as_is(tmp_path):
    tr, va = tmp_path / "tr.txt", tmp_path / "va.txt"
    tr.write_text("train text\n")
    va.write_text("val text\n")
    c = prepare_corpus(DataConfig(name="text_files", train=str(tr), val=str(va)), ArtifactCache(tmp_path / "c"))
    assert (c.train, c.val) == (tr, va) and [s["role"] for s in c.sources] == ["train", "val"]
    assert not (tmp_path / "c" / "corpus").exists()


def test_unsplittable_file(tmp_path):
    f = tmp_path / "one_line.txt"
    f.write_text("x" * 1000)
    with pytest.raises(DataError, match="cannot split"):
        prepare_corpus(DataConfig(name="text_files", train=str(f)), ArtifactCache(tmp_path / "c"))


def test_dry_run_writes_nothing(tmp_path):
    prepare_corpus(DataConfig(name="tinyshakespeare", train="pkg://tinyshakespeare.txt"), ArtifactCache(tmp_path / "c"),
                   dry_run=True)
    assert not (tmp_path / "c").exists()
