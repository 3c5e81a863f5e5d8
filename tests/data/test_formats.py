"""Data presets for JSONL, Parquet, many files and mixtures, on real text (the embedded
Shakespeare and the shared-corpus fixtures) converted to JSONL / Parquet here."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmrun import cli
from lmrun.data.corpora import DataConfig, prepare_corpus
from lmrun.data.mixture import select_documents
from lmrun.errors import ConfigError, DataError
from lmrun.tracking.cache import ArtifactCache

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures"
EOT = "<|endoftext|>"


def shakespeare_docs(n_bytes: int = 300_000) -> list[str]:
    """Paragraphs (speeches) of the embedded Shakespeare: real documents of 10-3000 bytes."""
    text = (REPO / "lmrun" / "data" / "corpora" / "tinyshakespeare.txt").read_text(encoding="utf-8")[:n_bytes]
    return [d for d in text.split("\n\n") if d.strip()]


def wiki_docs() -> list[str]:
    """Paragraphs of the WikiText-2 slice and sentences of corpus.en (fixtures)."""
    lines = (FIXTURES / "enc_wikitext2_valid_slice.txt").read_text(encoding="utf-8").splitlines()
    lines += (FIXTURES / "enc_corpus_en_head.txt").read_text(encoding="utf-8").splitlines()
    return [x for x in lines if x.strip()]


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({"id": i, "title": f"document {i}", field: d}) + "\n")
    return path


def write_parquet(path: Path, docs: list[str], column: str = "text", row_group_size: int = 100) -> Path:
    pq.write_table(pa.table({"id": list(range(len(docs))), column: docs}), path, row_group_size=row_group_size)
    return path


def joined(docs: list[str]) -> str:
    return "".join(d + EOT for d in docs)


def corpus_text(c) -> str:
    return c.train.read_text(encoding="utf-8") + c.val.read_text(encoding="utf-8")


# ------------------------------------------------------------------------------------------ formats
def test_jsonl_shards_in_a_directory_keep_documents_and_split_between_them(tmp_path):
    docs = shakespeare_docs()
    shards = tmp_path / "shards"
    shards.mkdir()
    write_jsonl(shards / "part-000.jsonl", docs[:400])
    write_jsonl(shards / "part-001.jsonl", docs[400:])
    (shards / "README.md").write_text("not a shard")  # ignored: not *.jsonl
    c = prepare_corpus(DataConfig(name="jsonl", format="jsonl", train=str(shards)), ArtifactCache(tmp_path / "c"))
    assert corpus_text(c) == joined(docs)  # every document, in order, each followed by the separator
    train = c.train.read_text(encoding="utf-8")
    assert train.endswith(EOT) and 0.88 < len(train) / len(joined(docs)) < 0.92
    assert c.info["sources"][0]["documents"] == len(docs) and c.info["skipped_records"] == 0
    assert [s["path"] for s in c.sources] == [str(shards / "part-000.jsonl"), str(shards / "part-001.jsonl")]
    # a glob and a list name the same files: the same cache entry
    for spec in (str(shards / "part-*.jsonl"), [str(shards / "part-000.jsonl"), str(shards / "part-001.jsonl")]):
        again = prepare_corpus(DataConfig(name="jsonl", format="jsonl", train=spec), ArtifactCache(tmp_path / "c"))
        assert again.train == c.train


def test_jsonl_field_is_configurable(tmp_path):
    src = FIXTURES / "align_gsm8k_train_head.jsonl"  # real GSM8K records: question, answer
    questions = [json.loads(x)["question"] for x in src.read_text().splitlines() if x.strip()]
    c = prepare_corpus(DataConfig(name="jsonl", format="jsonl", train=str(src), val=str(src), field="question"),
                       ArtifactCache(tmp_path / "c"))
    assert c.train.read_text() == joined(questions) and c.val.read_text() == joined(questions)
    with pytest.raises(DataError, match=rf"{src} line 1: no field 'text' \(fields: question, answer\)"):
        prepare_corpus(DataConfig(name="jsonl", format="jsonl", train=str(src)), ArtifactCache(tmp_path / "c"))


def test_parquet_column_gives_the_same_text_as_jsonl(tmp_path):
    docs = shakespeare_docs(200_000)
    pq_file = write_parquet(tmp_path / "s.parquet", docs, column="content")
    jl_file = write_jsonl(tmp_path / "s.jsonl", docs)
    a = prepare_corpus(DataConfig(name="parquet", format="parquet", train=str(pq_file), column="content"),
                       ArtifactCache(tmp_path / "c"))
    b = prepare_corpus(DataConfig(name="jsonl", format="jsonl", train=str(jl_file)), ArtifactCache(tmp_path / "c"))
    assert a.train.read_bytes() == b.train.read_bytes() and a.val.read_bytes() == b.val.read_bytes()
    assert a.train != b.train  # different inputs, different cache entries
    assert corpus_text(a) == joined(docs)


def test_text_directory_each_file_ends_a_document(tmp_path):
    d = tmp_path / "books"
    d.mkdir()
    (d / "a.txt").write_text("first book\nline two\n")
    (d / "b.txt").write_text(f"second book{EOT}third document\n")
    (d / "c.txt").write_text("fourth\n")
    c = prepare_corpus(DataConfig(name="text_files", format="text", train=str(d), val_fraction=0.2),
                       ArtifactCache(tmp_path / "c"))
    assert corpus_text(c) == joined(["first book\nline two\n", "second book", "third document\n", "fourth\n"])
    assert c.val.read_text() == "fourth\n" + EOT


def test_cache_key_covers_every_input(tmp_path):
    docs = shakespeare_docs(50_000)
    f = write_jsonl(tmp_path / "a.jsonl", docs)
    cache = ArtifactCache(tmp_path / "c")

    def key(**kw):
        return prepare_corpus(DataConfig(name="jsonl", format="jsonl", train=str(f), **kw), cache, dry_run=True).train

    base = key()
    assert key() == base
    assert key(field="title") != base and key(val_fraction=0.2) != base and key(on_bad_record="skip") != base
    write_jsonl(f, docs[:-1])  # the content changed
    assert key() != base


def test_dry_run_writes_nothing(tmp_path):
    f = write_jsonl(tmp_path / "a.jsonl", shakespeare_docs(20_000))
    prepare_corpus(DataConfig(name="jsonl", format="jsonl", train=str(f)), ArtifactCache(tmp_path / "c"), dry_run=True)
    assert not (tmp_path / "c").exists()


# ------------------------------------------------------------------------------------------ bad input
def _bad_jsonl(tmp_path, line: bytes) -> Path:
    good = [json.dumps({"text": d}).encode() for d in shakespeare_docs(20_000)]
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(good[:2] + [line] + good[2:]) + b"\n")
    return path


@pytest.mark.parametrize("line, reason", [
    (b'{"text": "unterminated', r"line 3: not JSON \(Unterminated string"),
    (b'{"body": "x"}', r"line 3: no field 'text'"),
    (b'{"text": 17}', r"line 3: field 'text' is a JSON int, not a string"),
    (b'{"text": "caf\xe9"}', r"line 3: not valid UTF-8"),
    (b'{"text": "\\ud800"}', r"line 3: field 'text' is not valid UTF-8"),
    (b'["text"]', r"line 3: a JSON list"),
])
def test_bad_jsonl_line_is_one_line_error_or_skipped(tmp_path, line, reason):
    path = _bad_jsonl(tmp_path, line)
    cfg = DataConfig(name="jsonl", format="jsonl", train=str(path))
    with pytest.raises(DataError, match=rf"^data.train: {path} {reason}.*data.on_bad_record=skip") as e:
        prepare_corpus(cfg, ArtifactCache(tmp_path / "c"), dry_run=True)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "c").exists()
    cfg.on_bad_record = "skip"
    c = prepare_corpus(cfg, ArtifactCache(tmp_path / "c"))
    assert c.info["skipped_records"] == 1
    assert corpus_text(c) == joined(shakespeare_docs(20_000))


def test_bad_parquet_inputs_name_file_and_row(tmp_path):
    docs = shakespeare_docs(20_000)
    f = write_parquet(tmp_path / "a.parquet", docs)
    with pytest.raises(DataError, match=rf"{f}: no column 'content' \(columns: id, text\); set data.column"):
        prepare_corpus(DataConfig(name="parquet", format="parquet", train=str(f), column="content"),
                       ArtifactCache(tmp_path / "c"))
    empty = write_parquet(tmp_path / "empty.parquet", [])
    with pytest.raises(DataError, match=rf"{empty}: empty shard"):
        prepare_corpus(DataConfig(name="parquet", format="parquet", train=[str(f), str(empty)]),
                       ArtifactCache(tmp_path / "c"))
    raw = [d.encode() for d in docs]
    raw[4] = b"caf\xe9"
    nul = list(raw)
    binary = tmp_path / "binary.parquet"
    pq.write_table(pa.table({"text": pa.array(nul, pa.binary())}), binary)
    with pytest.raises(DataError, match=rf"{binary} row 5: column 'text' is not valid UTF-8"):
        prepare_corpus(DataConfig(name="parquet", format="parquet", train=str(binary)), ArtifactCache(tmp_path / "c"))
    nulls = tmp_path / "nulls.parquet"
    pq.write_table(pa.table({"text": docs[:3] + [None] + docs[3:]}), nulls)
    with pytest.raises(DataError, match=rf"{nulls} row 4: column 'text' is null"):
        prepare_corpus(DataConfig(name="parquet", format="parquet", train=str(nulls)), ArtifactCache(tmp_path / "c"))
    # skipped: the shard without documents, the bad rows; counted
    c = prepare_corpus(DataConfig(name="parquet", format="parquet", train=[str(f), str(empty), str(binary), str(nulls)],
                                  on_bad_record="skip"), ArtifactCache(tmp_path / "c"))
    assert c.info["skipped_records"] == 3
    assert corpus_text(c) == joined(docs + [d for i, d in enumerate(docs) if i != 4] + docs)


def test_bad_text_line_and_missing_inputs(tmp_path):
    d = tmp_path / "t"
    d.mkdir()
    (d / "a.txt").write_text("good line\n" * 20)
    (d / "b.txt").write_bytes(b"good\nbad \xff line\n")
    with pytest.raises(DataError, match=rf"{d / 'b.txt'} line 2: not valid UTF-8"):
        prepare_corpus(DataConfig(name="text_files", train=str(d)), ArtifactCache(tmp_path / "c"))
    with pytest.raises(DataError, match="no file matches the pattern"):
        prepare_corpus(DataConfig(name="jsonl", format="jsonl", train=str(tmp_path / "*.jsonl")),
                       ArtifactCache(tmp_path / "c"))
    with pytest.raises(DataError, match=r"holds no file ending in \.jsonl"):
        prepare_corpus(DataConfig(name="jsonl", format="jsonl", train=str(d)), ArtifactCache(tmp_path / "c"))
    with pytest.raises(ConfigError, match="data.mixture.web.wieght"):
        prepare_corpus(DataConfig(name="mixture", mixture={"web": {"train": str(d), "wieght": 1}}),
                       ArtifactCache(tmp_path / "c"))


def test_cli_bad_record_is_one_line_and_writes_nothing(tmp_path, isolated_workspace, cache_dir, capsys):
    path = _bad_jsonl(tmp_path, b"not json at all")
    assert cli.main(["stage=encode", "data=jsonl", f"data.train={path}", "tokenizer=bytes"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{path} line 3: not JSON" in err
    assert not any(cache_dir.rglob("*")) if cache_dir.exists() else True
    assert not any(p.is_file() for p in isolated_workspace.rglob("*"))


# ------------------------------------------------------------------------------------------ mixtures
def test_select_documents_repeats_and_truncates_deterministically():
    rng = np.random.default_rng(0)
    big, small = rng.integers(50, 150, 1000), rng.integers(50, 150, 50)
    picks = select_documents([big, small], [0.5, 0.5], seed=3)
    total = big.sum() + small.sum()
    got = [big[picks[0]].sum(), small[picks[1]].sum()]
    assert abs(got[0] - total / 2) <= 75 and abs(got[1] - total / 2) <= 75
    assert len(set(picks[0].tolist())) == len(picks[0]) < 1000  # truncated: a subset, no repeats
    assert np.bincount(picks[1], minlength=50).min() >= int(total / 2 // small.sum())  # repeated whole passes
    again = select_documents([big, small], [0.5, 0.5], seed=3)
    assert all((a == b).all() for a, b in zip(picks, again))
    other = select_documents([big, small], [0.5, 0.5], seed=4)
    assert not (picks[0] == other[0][: len(picks[0])]).all()


@pytest.fixture
def gpt2_dir(tmp_path) -> Path:
    d = tmp_path / "gpt2"
    d.mkdir()
    for name in ("vocab.json", "merges.txt"):
        (d / name).write_bytes(gzip.decompress((FIXTURES / f"enc_gpt2_{name}.gz").read_bytes()))
    return d


def test_mixture_token_shares_within_one_percent(tmp_path, isolated_workspace, cache_dir, gpt2_dir):
    from lmrun.tokenizer.tokenizer import Tokenizer

    plays, wiki = shakespeare_docs(300_000), wiki_docs()
    write_jsonl(tmp_path / "plays.jsonl", plays)
    write_parquet(tmp_path / "wiki.parquet", wiki, column="content")
    argv = ["stage=encode", "data=mixture", f"tokenizer.path={gpt2_dir}", "logger=none", "progress=false",
            f"+data.mixture.plays={{train: {tmp_path / 'plays.jsonl'}, weight: 0.7}}",
            f"+data.mixture.wiki={{train: {tmp_path / 'wiki.parquet'}, format: parquet, column: content, weight: 0.3}}"]
    assert cli.main(argv) == 0
    meta_path, = cache_dir.glob("tokens/*/meta.json")
    meta = json.loads(meta_path.read_text())
    shares = {s["name"]: s for s in meta["mixture"]["sources"]}
    assert abs(shares["plays"]["train"]["share"] - 0.7) < 0.01 and abs(shares["wiki"]["train"]["share"] - 0.3) < 0.01
    assert abs(shares["plays"]["val"]["share"] - 0.7) < 0.01
    assert shares["wiki"]["train"]["passes"] > 1.5 and shares["plays"]["train"]["passes"] < 1  # repeated / subsampled
    assert len(list(cache_dir.glob("corpus/*"))) == 1  # the byte-weighted text is built only to train a tokenizer
    # independently: split train.bin at <|endoftext|>, decode, attribute each document to its source
    tok = Tokenizer.from_files(gpt2_dir / "vocab.json", gpt2_dir / "merges.txt", [EOT])
    ids = np.fromfile(meta_path.parent / "train.bin", dtype=meta["dtype"])
    assert len(ids) == meta["splits"]["train"]["tokens"] and ids[-1] == meta["eot_id"]
    ends = np.flatnonzero(ids == meta["eot_id"]) + 1
    play_set, wiki_set = set(plays), set(wiki)
    counts = {"plays": 0, "wiki": 0}
    for a, b in zip(np.concatenate([[0], ends[:-1]]), ends):
        text = tok.decode(ids[a:b - 1].tolist())
        source = "plays" if text in play_set else "wiki" if text in wiki_set else None
        assert source is not None, text[:80]
        counts[source] += b - a
    assert abs(counts["plays"] / len(ids) - 0.7) < 0.01
    assert counts["plays"] / len(ids) == pytest.approx(shares["plays"]["train"]["share"], abs=1e-6)
    n_bytes = sum(len(d.encode()) + len(EOT) for d in tok.decode(ids.tolist()).split(EOT)[:-1])
    assert meta["splits"]["train"]["bytes"] == n_bytes  # the mixture's bytes: bits per byte of what is trained on
    # the same command again: a cache hit; another seed: another mixture
    assert cli.main(argv) == 0 and len(list(cache_dir.glob("tokens/*/meta.json"))) == 1
    assert cli.main(argv + ["data.seed=1"]) == 0 and len(list(cache_dir.glob("tokens/*/meta.json"))) == 2


def test_mixture_trains_a_tokenizer_on_the_byte_weighted_text(tmp_path, isolated_workspace, cache_dir):
    plays, wiki = shakespeare_docs(60_000), wiki_docs()
    write_jsonl(tmp_path / "plays.jsonl", plays)
    write_jsonl(tmp_path / "wiki.jsonl", wiki)
    argv = ["stage=tokenizer", "data=mixture", "tokenizer.vocab_size=300", "logger=none", "progress=false",
            f"+data.mixture.plays={tmp_path / 'plays.jsonl'}", f"+data.mixture.wiki={tmp_path / 'wiki.jsonl'}"]
    assert cli.main(argv) == 0
    text_dir, = [p.parent for p in cache_dir.glob("corpus/*/artifact.json")
                 if "mixed_text" in json.loads(p.read_text())["material"]]
    train = (text_dir / "train.txt").read_text(encoding="utf-8")
    docs = [d for d in train.split(EOT) if d]
    play_bytes = sum(len(d.encode()) + len(EOT) for d in docs if d in set(plays))
    assert abs(play_bytes / len(train.encode()) - 0.5) < 0.02  # equal weights (bare paths: weight 1 each)
    assert all(d in set(plays) | set(wiki) for d in docs)


def test_encoded_jsonl_keeps_one_end_of_text_per_document(tmp_path, isolated_workspace, cache_dir):
    docs = shakespeare_docs(100_000)
    f = write_jsonl(tmp_path / "plays.jsonl", docs)
    assert cli.main(["stage=encode", "data=jsonl", f"data.train={f}", "tokenizer=bytes", "logger=none",
                     "progress=false"]) == 0
    meta_path, = cache_dir.glob("tokens/*/meta.json")
    meta = json.loads(meta_path.read_text())
    ids = np.concatenate([np.fromfile(meta_path.parent / f"{s}.bin", dtype=meta["dtype"]) for s in ("train", "val")])
    eot = meta["eot_id"]
    assert int((ids == eot).sum()) == len(docs) == meta["data"]["sources"][0]["documents"]
    text = bytes(int(i) - 1 for i in ids if i != eot).decode("utf-8")  # tokenizer=bytes: id = 1 + byte
    assert text == "".join(docs)
