"""stage=curate end to end: readers, shards in processes, skip on rerun, Slurm-style phases, errors."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import EXAMPLE_PAGES, FIXTURES, REPO

from lmrun.cli import main
from lmrun.curation.readers import list_input_files, read_documents, shard_files
from lmrun.errors import DataError

WARC = FIXTURES / "cur_iana_sample.warc.gz"


def test_read_warc_keeps_html_responses_only():
    docs = list(read_documents(WARC, "warc"))
    urls = [d["url"] for d in docs]
    assert urls == ["http://www.iana.org/", "http://www.iana.org/about", "http://www.iana.org/domains/root/servers",
                    "http://www.iana.org/domains/int"]  # no image, no 302 redirect, no requests
    assert all(d["html"].lstrip().lower().startswith(b"<!doctype") for d in docs)


def test_read_text_and_jsonl(tmp_path):
    t = tmp_path / "a.txt"
    t.write_text("one<|endoftext|>two\n<|endoftext|>\n<|endoftext|>three", encoding="utf-8")
    assert [d["text"] for d in read_documents(t, "text")] == ["one", "two", "three"]
    j = tmp_path / "b.jsonl"
    j.write_text('{"id": "x", "text": "hello"}\n\n{"text": "world", "url": "u"}\n', encoding="utf-8")
    docs = list(read_documents(j, "jsonl"))
    assert [(d["id"], d["text"], d["url"]) for d in docs] == [("x", "hello", None), ("b.jsonl:3", "world", "u")]
    j.write_text('{"text": 1}\n', encoding="utf-8")
    with pytest.raises(DataError, match="b.jsonl:1"):
        list(read_documents(j, "jsonl"))


def test_read_gzipped_html_file(tmp_path):
    import gzip

    page = b"<html><body><p>Compressed page, as Debian ships its larger docs pages.</p></body></html>"
    gz = tmp_path / "changelog.html.gz"
    gz.write_bytes(gzip.compress(page))
    files = list_input_files([str(tmp_path)])
    assert files == [(gz, "html")]
    (doc,) = read_documents(gz, "html")
    assert doc["html"] == page
    (tmp_path / "bad.html.gz").write_bytes(b"<html>not gzip</html>")
    with pytest.raises(DataError, match="not a gzip file"):
        list(read_documents(tmp_path / "bad.html.gz", "html"))


def test_list_and_shard_files(tmp_path):
    for i, size in enumerate([5000, 100, 3000, 2000]):
        (tmp_path / f"p{i}.html").write_bytes(b"x" * size)
    (tmp_path / "style.css").write_text("body{}")
    files = list_input_files([str(tmp_path)])
    assert [p.name for p, _ in files] == ["p0.html", "p1.html", "p2.html", "p3.html"]
    assert {f for _, f in files} == {"html"}
    shards = shard_files(files, 2)
    assert [[p.name for p, _ in s] for s in shards] == [["p0.html", "p1.html"], ["p2.html", "p3.html"]]
    assert shard_files(files, 2) == shards and len(shard_files(files, 6)[5]) == 0
    with pytest.raises(DataError, match="nothing found"):
        list_input_files([str(tmp_path / "missing.warc")])


def _corpus(tmp_path) -> list[str]:
    """Three inputs: the WARC sample, Python docs HTML, and a JSONL of real prose with a near
    duplicate of a document of another shard and a German document."""
    html_dir = tmp_path / "html"
    html_dir.mkdir()
    shutil.copy(EXAMPLE_PAGES / "getpass.html", html_dir / "getpass.html")
    shutil.copy(EXAMPLE_PAGES / "moby.html", html_dir / "moby.html")
    prose = (FIXTURES / "enc_corpus_en_head.txt").read_text(encoding="utf-8").split()
    a = " ".join(prose[:400])
    b = " ".join(prose[400:800])
    near = a.replace(" the ", " The ", 3) + " Contact: jane.doe@example.org, +44 20 7946 0958."
    docs = [{"text": a}, {"text": b}, {"text": (FIXTURES / "enc_german.txt").read_text(encoding="utf-8") * 3}]
    (tmp_path / "one.jsonl").write_text("\n".join(json.dumps(d) for d in docs) + "\n", encoding="utf-8")
    (tmp_path / "two.jsonl").write_text(json.dumps({"text": near}) + "\n", encoding="utf-8")
    return [str(WARC), str(html_dir), str(tmp_path / "one.jsonl"), str(tmp_path / "two.jsonl")]


def _inputs(paths: list[str]) -> str:
    return "curate.inputs=[" + ",".join(paths) + "]"


@pytest.mark.slow
def test_curate_end_to_end_sharded_and_skip_on_rerun(tmp_path, capsys):
    out = tmp_path / "cur"
    args = ["stage=curate", _inputs(_corpus(tmp_path)), "curate.num_shards=3", "curate.num_workers=2",
            f"curate.output_dir={out}", "logger=none"]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    steps = {s["step"]: s for s in report["steps"]}
    assert report["read"]["docs"] == 4 + 2 + 3 + 1
    assert steps["langid"]["removed"].get("language_de") == 1
    assert steps["minhash_dedup"]["removed"] == {"near_duplicate": 1}
    assert report["dedup"]["minhash"]["clusters"] == 1
    assert steps["pii"]["counts"]["emails"] >= 1
    for s in report["steps"]:  # each step starts with what the previous one kept
        assert s["docs_out"] <= s["docs_in"]
    order = [s["step"] for s in report["steps"]]
    assert all(a["docs_out"] == b["docs_in"] for a, b in zip(report["steps"], report["steps"][1:])), order
    clean = (out / "clean.txt").read_text(encoding="utf-8")
    assert clean.count("<|endoftext|>") == report["clean"]["docs"] - 1
    assert "jane.doe@example.org" not in clean
    assert "|||EMAIL_ADDRESS|||" in (out / "clean.txt").read_text() or steps["minhash_dedup"]["removed"]
    jsonl = [json.loads(x) for p in sorted((out / "clean").glob("*.jsonl")) for x in p.read_text().splitlines()]
    assert len(jsonl) == report["clean"]["docs"] and all(d["language"] == "en" for d in jsonl)
    for name in ("report.md", "report.png", "samples/gopher.jsonl"):
        assert (out / name).is_file()
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("shards/*/docs.jsonl")}
    assert len(mtimes) == 3
    capsys.readouterr()
    assert main(args) == 0  # rerun: completed shards skipped, same clean output
    assert {p: p.stat().st_mtime_ns for p in out.glob("shards/*/docs.jsonl")} == mtimes
    assert (out / "clean.txt").read_text(encoding="utf-8") == clean
    # the clean text is a data preset for the tokenizer
    assert main(["stage=tokenizer", "data=text_files", f"data.train={out / 'clean.txt'}", "tokenizer.vocab_size=300", "data.val_fraction=0.5",
                 "logger=none"]) == 0


@pytest.mark.slow
def test_curate_slurm_style_phases(tmp_path):
    """One job per shard (as a Slurm array would run them), then the dedup job."""
    out = tmp_path / "cur"
    base = ["stage=curate", _inputs(_corpus(tmp_path)), "curate.num_shards=2", f"curate.output_dir={out}",
            "logger=none", "curate.num_workers=1"]
    assert main(base + ["curate.phase=dedup"]) == 1  # shards not done yet: a clear failure
    assert main(base + ["curate.phase=filter", "curate.shard_index=1"]) == 0
    assert (out / "shards/00001/shard.json").is_file() and not (out / "shards/00000").exists()
    assert main(base + ["curate.phase=filter", "curate.shard_index=0"]) == 0
    assert main(base + ["curate.phase=dedup"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["shards"] == 2 and report["clean"]["docs"] >= 3


@pytest.mark.parametrize("override, message", [
    ("curate.steps=[extract,bogus]", "curate.steps='bogus'"),
    ("curate.shard_index=3", "curate.shard_index=3"),
    ("curate.dedup.num_bands=7", "curate.dedup.num_bands=7"),
    ("curate.langid.backend=fasttext", "curate.langid.model_path"),
    ("curate.steps=[extract,quality]", "curate.quality.model_path"),
    ("curate.gopher.min_alpha_words_ratio=1.5", "curate.gopher.min_alpha_words_ratio=1.5"),
    ("curate.bogus=1", "curate.bogus: unknown key"),
])
def test_config_errors_are_one_line(override, message, capsys):
    assert main(["stage=curate", f"curate.inputs=[{WARC}]", override]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not Path("runs").exists()


def test_missing_inputs_and_dry_run(capsys):
    assert main(["stage=curate"]) == 2
    assert "curate.inputs" in capsys.readouterr().err
    assert main(["stage=curate", "curate.inputs=[/nonexistent/x.warc.gz]"]) == 2
    assert "nothing found" in capsys.readouterr().err
    assert main(["stage=curate", f"curate.inputs=[{WARC}]", "dry_run=true", "curate.num_shards=2"]) == 0
    out = capsys.readouterr().out
    assert "dry run" in out and "shards" in out and "inputs" in out and "outputs" in out
    assert not Path("runs").exists() and list(Path(".").rglob("*")) == []


def test_quality_training_step(tmp_path):
    """Train the quality classifier (WikiText positives vs crawl-extracted negatives) and use it."""
    wiki = FIXTURES / "enc_wikitext2_valid_slice.txt"
    plays = REPO / "lmrun/data/corpora/tinyshakespeare.txt"
    out = tmp_path / "cur"
    assert main(["stage=curate", f"curate.inputs=[{wiki}]", f"curate.output_dir={out}", "logger=none",
                 "curate.quality.train=true", f"curate.quality.positives=[{wiki}]", f"curate.quality.negatives=[{plays}]",
                 "curate.steps=[extract,quality]", "curate.quality.num_buckets=65536"]) == 0
    assert (out / "quality_model.npz").is_file()
    run_dir = next(Path("runs/curate").iterdir())
    stats = json.loads((run_dir / "quality_training.json").read_text())
    assert stats["heldout_accuracy"] >= 0.8
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["quality_docs_out"] == 1  # the Wikipedia text itself is kept as "wiki"
