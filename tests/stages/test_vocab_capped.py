"""A vocabulary smaller than ``tokenizer.vocab_size`` (BPE ran out of pairs to merge on a small
text) is stated and recorded (issue 24): a warning (asked N, got M, why), ``vocab_size_requested``
and ``vocab_size`` in the tokenizer's report.json, its cache artifact.json, the encode meta.json
and both summaries."""
from __future__ import annotations

import json

import pytest

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


# --- issue 25 F8: impossible sizes are refused with the limit; the model follows the real size ---

@pytest.mark.parametrize("value, limit", [("5000000000", "<= 2,147,483,647"), ("-5", ">= 257"), ("100", ">= 257"),
                                          ("256", ">= 257 (256 bytes + 1 special token)")])
def test_impossible_vocab_size_names_the_limit(value, limit, isolated_workspace, capsys):
    for stage in ("tokenizer", "pretrain"):
        assert cli.main([f"stage={stage}", f"tokenizer.vocab_size={value}", *FAST]) == 2
        err = capsys.readouterr().err.strip()
        assert err.splitlines() == [err] and f"tokenizer.vocab_size={value}: expected an integer {limit}" in err
    assert list(isolated_workspace.iterdir()) == []


def test_float_vocab_size_is_one_line(isolated_workspace, capsys):
    assert cli.main(["stage=tokenizer", "tokenizer.vocab_size=5e9", *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and "tokenizer.vocab_size" in err and "int" in err


def test_model_vocab_follows_the_tokenizer_unless_explicit():
    from lmrun.tokenizer.artifacts import follow_tokenizer_vocab

    cfg = cli.compose(["stage=pretrain", "tokenizer.vocab_size=100000"])
    assert cfg.model.vocab_size == 100000  # the presets' ${tokenizer.vocab_size}
    assert follow_tokenizer_vocab(cfg, 20323) == 20323
    assert cfg.model.vocab_size == 20323 and cfg.tokenizer.vocab_size == 100000  # the cache key keeps what was asked
    explicit = cli.compose(["stage=pretrain", "tokenizer.vocab_size=100000", "model.vocab_size=20480"])
    assert follow_tokenizer_vocab(explicit, 20323) == 20480 and explicit.model.vocab_size == 20480
    full = cli.compose(["stage=pretrain", "tokenizer.vocab_size=512"])
    assert follow_tokenizer_vocab(full, 512) == 512


@pytest.mark.slow
def test_pretrain_builds_the_embedding_of_the_real_vocabulary(small_text, isolated_workspace, capsys):
    from tests.stages.test_pretrain_stage import SMALL

    args = [a for a in SMALL if not a.startswith("tokenizer.vocab_size")]
    assert cli.main(["stage=pretrain", *args, "data=text_files", f"data.train={small_text}",
                     "tokenizer.vocab_size=32000", "train.max_steps=1", "train.samples=0"]) == 0
    err = capsys.readouterr().err
    assert "tokenizer.vocab_size=32000, but the vocabulary has" in err
    run = _latest(isolated_workspace, "pretrain")
    import torch

    ckpt = torch.load(sorted((run / "checkpoints").glob("ckpt_*.pt"))[-1], weights_only=True, map_location="cpu")
    got = ckpt["model"]["token_embeddings.weight"].shape[0]
    assert 257 < got < 32000 and ckpt["model_config"]["vocab_size"] == got
