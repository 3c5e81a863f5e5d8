"""A vocabulary smaller than ``tokenizer.vocab_size`` (BPE ran out of pairs to merge on a small
text) is stated and recorded (issue 24): a warning (asked N, got M, why), ``vocab_size_requested``
and ``vocab_size`` in the tokenizer's report.json, its cache artifact.json, the encode meta.json
and both summaries."""
from __future__ import annotations

import json

from lmrun import cli

FAST = ["logger=none", "progress=false"]


def _latest(work, stage):
    return sorted((work / "runs" / stage).iterdir())[-1]


def test_capped_vocabulary_is_warned_and_recorded(small_text, isolated_workspace, cache_dir, capsys):
    common = ["data=text_files", f"data.train={small_text}", "tokenizer.vocab_size=32000", *FAST]
    assert cli.main(["stage=tokenizer", *common]) == 0
    err = capsys.readouterr().err
    run = _latest(isolated_workspace, "tokenizer")
    report = json.loads((run / "report.json").read_text())
    got = report["vocab_size"]
    assert report["vocab_size_requested"] == 32000 and 257 < got < 32000
    assert "ran out of pairs to merge" in report["vocab_capped"]
    assert f"tokenizer.vocab_size=32000, but the vocabulary has {got} tokens" in err and "ran out of pairs" in err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["vocab_size_requested"] == 32000 and summary["vocab_size"] == got
    assert "vocab_capped" in (run / "report.md").read_text()
    (artifact,) = (cache_dir / "tokenizer").glob("*/artifact.json")
    result = json.loads(artifact.read_text())["result"]
    assert result["vocab_size_requested"] == 32000 and result["vocab_size"] == got and result["vocab_capped"]

    # a tokenizer cached before these fields existed: encode states and records them all the same
    manifest = json.loads(artifact.read_text())
    for k in ("vocab_size_requested", "vocab_capped"):
        manifest["result"].pop(k)
    artifact.write_text(json.dumps(manifest))
    assert cli.main(["stage=encode", *common]) == 0
    err = capsys.readouterr().err
    assert f"tokenizer.vocab_size=32000, but the vocabulary has {got} tokens" in err
    run = _latest(isolated_workspace, "encode")
    meta = json.loads((run / "meta.json").read_text())
    assert meta["vocab_size_requested"] == 32000 and meta["vocab_size"] == got
    assert "ran out of pairs" in meta["vocab_capped"]
    (cached_meta,) = (cache_dir / "tokens").glob("*/meta.json")
    assert json.loads(cached_meta.read_text())["vocab_size_requested"] == 32000
    summary = json.loads((run / "summary.json").read_text())
    assert summary["vocab_size_requested"] == 32000 and summary["vocab_size"] == got


def test_full_vocabulary_has_no_warning(small_text, isolated_workspace, capsys):
    assert cli.main(["stage=tokenizer", "data=text_files", f"data.train={small_text}", "tokenizer.vocab_size=400",
                     *FAST]) == 0
    report = json.loads((_latest(isolated_workspace, "tokenizer") / "report.json").read_text())
    assert report["vocab_size"] == report["vocab_size_requested"] == 400 and "vocab_capped" not in report
    assert "but the vocabulary has" not in capsys.readouterr().err
