"""`lmrun stage=tokenizer` end to end: outputs, report, cache reuse and rebuild, wandb offline."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmrun import cli
from lmrun.tokenizer.formats import load_merges, load_vocab

FAST = ["logger=none", "progress=false"]


def run_dirs(work: Path) -> list[Path]:
    return sorted((work / "runs" / "tokenizer").iterdir())


def run_tokenizer(*overrides: str) -> dict:
    """Run the stage; return the summary.json of the run directory it created."""
    before = set(run_dirs(Path.cwd())) if (Path.cwd() / "runs" / "tokenizer").exists() else set()
    assert cli.main(["stage=tokenizer", *FAST, *overrides]) == 0
    (new,) = set(run_dirs(Path.cwd())) - before
    return json.loads((new / "summary.json").read_text()) | {"run_dir": new}


def test_default_preset_trains_on_embedded_corpus(isolated_workspace):
    run_tokenizer("tokenizer.vocab_size=1000")
    (run_dir,) = run_dirs(isolated_workspace)
    vocab, merges = load_vocab(run_dir / "vocab.json"), load_merges(run_dir / "merges.txt")
    assert len(vocab) == 1000 and len(merges) == 1000 - 257
    assert vocab[0] == b"<|endoftext|>" and vocab[1 + ord("a")] == b"a"
    report = json.loads((run_dir / "report.json").read_text())
    assert report["data"] == "tinyshakespeare" and report["vocab_size"] == 1000
    assert 2.0 < report["bytes_per_token"] < 4.0  # measured 2.6 at vocab 1000 on the held-out split
    assert report["train_seconds"] > 0 and report["peak_rss_mb"] > 0
    assert all(len(t.encode()) >= len(report["longest_tokens"][-1].encode()) for t in report["longest_tokens"])
    assert (run_dir / "report.md").read_text().startswith("# Tokenizer report")


@pytest.mark.slow
def test_cache_reused_then_rebuilt_on_change(small_text, isolated_workspace, cache_dir):
    common = ["data=text_files", f"data.train={small_text}", "tokenizer.vocab_size=400"]
    first = run_tokenizer(*common)
    second = run_tokenizer(*common)
    assert first["cached"] is False and second["cached"] is True
    assert (first["run_dir"] / "merges.txt").read_bytes() == (second["run_dir"] / "merges.txt").read_bytes()
    # forced rebuild
    assert run_tokenizer(*common, "cache.rebuild=true")["cached"] is False
    assert run_tokenizer(*common)["cached"] is True
    # changed input -> a new cache entry
    small_text.write_text(small_text.read_text() + "\nA new line of text that changes the corpus.\n")
    assert run_tokenizer(*common)["cached"] is False
    assert len(list((cache_dir / "tokenizer").iterdir())) == 2
    # changed config -> a new cache entry
    run_tokenizer(*common[:-1], "tokenizer.vocab_size=401")
    assert len(list((cache_dir / "tokenizer").iterdir())) == 3


def test_wandb_offline_inside_run_dir(small_text, isolated_workspace):
    assert cli.main(["stage=tokenizer", "logger=wandb", "progress=false", "data=text_files",
                     f"data.train={small_text}", "tokenizer.vocab_size=300"]) == 0
    (run_dir,) = run_dirs(isolated_workspace)
    info = json.loads((run_dir / "run.json").read_text())
    assert info["wandb_run_id"]
    offline = list((run_dir / "wandb").glob(f"offline-run-*-{info['wandb_run_id']}"))
    assert len(offline) == 1


def test_bytes_tokenizer_and_comparison_table(isolated_workspace):
    summary = run_tokenizer("tokenizer=bytes", "tokenizer.compare=true")
    report = json.loads((summary["run_dir"] / "report.json").read_text())
    assert report["vocab_size"] == 257 and report["num_merges"] == 0 and report["bytes_per_token"] == 1.0
    rows = {r["unit"]: r for r in report["comparison"]}
    assert list(rows) == ["characters", "bytes", "words", "bytes (this tokenizer)"]
    assert rows["bytes (this tokenizer)"]["tokens"] == rows["bytes"]["tokens"]
    assert rows["bytes"]["bytes_per_token"] == 1.0 and rows["bytes"]["vocab_size"] == 257
    assert rows["characters"]["bytes_per_token"] == 1.0  # Shakespeare is ASCII: one byte per character
    assert rows["words"]["bytes_per_token"] > 3.0 and rows["words"]["unknown_rate"] > 0
    assert "## Compression on the validation split" in (summary["run_dir"] / "report.md").read_text()


def test_bpe_comparison_orders_units(isolated_workspace):
    summary = run_tokenizer("tokenizer.vocab_size=2000", "tokenizer.compare=true")
    rows = json.loads((summary["run_dir"] / "report.json").read_text())["comparison"]
    bpt = {r["unit"].split(" ")[0]: r["bytes_per_token"] for r in rows}
    # measured: characters 1.0 < bpe 2.7 < words 3.6
    assert bpt["bytes"] == bpt["characters"] == 1.0 < bpt["bpe"] < bpt["words"]
