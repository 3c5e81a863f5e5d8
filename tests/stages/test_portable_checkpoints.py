"""Self-contained checkpoints (issue 27): a checkpoint carries its tokenizer files, so a run
directory (or a lone checkpoint file) copied elsewhere with an empty LMRUN_CACHE still works for
generate, evaluate and sft; old checkpoints that point into the cache load while the cache exists
and fail in one line naming the missing file when it does not."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from lmrun import cli
from lmrun.errors import DataError, FormatError
from lmrun.tokenizer.artifacts import TokenizerFiles
from lmrun.train.checkpoint import checkpoint_digest, read_checkpoint
from lmrun.train.loading import (
    checkpoint_facts, checkpoint_tokenizer_files, portable_tokenizer_facts, resolve_checkpoint, tokenizer_facts,
    write_run_tokenizer,
)
from lmrun.tracking.files import file_digest
from tests.align.test_align_stages import COMMON as ALIGN
from tests.stages.test_pretrain_stage import run_pretrain

EOT = "<|endoftext|>"


# ----------------------------------------------------------------------------- unit: the tokenizer entry

def _files(tmp_path: Path) -> TokenizerFiles:
    folder = tmp_path / "cache" / "tokenizer" / "abc"
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text('{"a": 0, "b": 1, "ab": 2}\n')
    (folder / "merges.txt").write_text("#version: 0.2\na b\n")
    identity = {"vocab_digest": file_digest(folder / "vocab.json"), "merges_digest": file_digest(folder / "merges.txt"),
                "special_tokens": [EOT]}
    return TokenizerFiles(folder / "vocab.json", folder / "merges.txt", identity, True, {})


def test_entry_carries_the_files_and_materializes_them(tmp_path):
    files = _files(tmp_path)
    tok = tokenizer_facts(files, [EOT])
    assert tok["files"] == {"vocab.json": files.vocab.read_bytes(), "merges.txt": files.merges.read_bytes()}
    assert "vocab" not in tok and "merges" not in tok
    assert not any(str(tmp_path) in repr(v) for k, v in tok.items() if k != "files")  # no path at all
    shutil.rmtree(tmp_path / "cache")
    # a lone checkpoint: written once to a content-addressed temporary folder
    got = checkpoint_tokenizer_files({"tokenizer": tok}, tmp_path / "lone.pt")
    assert got.vocab.read_bytes() == tok["files"]["vocab.json"] and got.merges.read_bytes() == tok["files"]["merges.txt"]
    assert got.identity == files.identity  # same cache keys as the original files
    assert {"vocab_digest": file_digest(got.vocab), "merges_digest": file_digest(got.merges)}.items() <= got.identity.items()
    assert checkpoint_tokenizer_files({"tokenizer": tok}, tmp_path / "other.pt").vocab == got.vocab
    assert got.load([EOT]).encode(f"abab{EOT}") == [2, 2, 3]
    # a run directory's copy next to the checkpoint is preferred when it holds the same bytes
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    folder = write_run_tokenizer(tok, run)
    assert json.loads((folder / "special_tokens.json").read_text()) == [EOT]
    in_run = checkpoint_tokenizer_files({"tokenizer": tok}, run / "checkpoints" / "ckpt_00000001.pt")
    assert in_run.vocab == (run / "tokenizer" / "vocab.json").absolute()
    (run / "tokenizer" / "merges.txt").write_text("#version: 0.2\n")  # edited by hand: not used
    in_run = checkpoint_tokenizer_files({"tokenizer": tok}, run / "checkpoints" / "ckpt_00000001.pt")
    assert in_run.vocab == got.vocab


def test_old_style_entry_and_its_errors(tmp_path):
    files = _files(tmp_path)
    old = {"vocab": str(files.vocab), "merges": str(files.merges), "special_tokens": [EOT],
           "vocab_digest": files.identity["vocab_digest"], "merges_digest": files.identity["merges_digest"]}
    got = checkpoint_tokenizer_files({"tokenizer": old}, tmp_path / "old.pt")
    assert got.vocab == files.vocab and got.identity == files.identity
    portable = portable_tokenizer_facts(old, tmp_path / "old.pt")
    assert portable["files"]["vocab.json"] == files.vocab.read_bytes() and "vocab" not in portable
    files.merges.unlink()
    with pytest.raises(DataError, match="tokenizer file is gone: .*merges.txt") as e:
        checkpoint_tokenizer_files({"tokenizer": old}, tmp_path / "old.pt")
    assert "\n" not in str(e.value) and str(tmp_path / "old.pt") in str(e.value)
    with pytest.raises(DataError, match="merges.txt"):
        portable_tokenizer_facts(old, tmp_path / "old.pt")
    with pytest.raises(FormatError, match="malformed"):
        checkpoint_tokenizer_files({"tokenizer": {"files": {"vocab.json": "text"}}}, tmp_path / "x.pt")
    with pytest.raises(FormatError, match="neither"):
        checkpoint_tokenizer_files({"tokenizer": {"special_tokens": []}}, tmp_path / "x.pt")


# ----------------------------------------------------------------------------- end to end

def _rewrite_old_style(ckpt: Path, cache: Path) -> Path:
    """Turn a checkpoint into one written before checkpoints carried their tokenizer: absolute
    paths into the cache (the cached tokenizer folder whose files match), checksum renewed."""
    obj = read_checkpoint(ckpt)
    tok = obj["tokenizer"]
    vocab = next(p for p in cache.rglob("vocab.json") if p.read_bytes() == tok["files"]["vocab.json"])
    obj["tokenizer"] = {"vocab": str(vocab), "merges": str(vocab.parent / "merges.txt"),
                        **{k: v for k, v in tok.items() if k != "files"}}
    obj["checksum"] = {"algorithm": "sha256", "digest": checkpoint_digest(obj)}
    torch.save(obj, ckpt)
    return vocab.parent


def _latest(workspace: Path, stage: str) -> Path:
    return sorted((workspace / "runs" / stage).iterdir())[-1]


def _generate(checkpoint) -> int:
    return cli.main(["stage=generate", "logger=none", "progress=false", f"generate.checkpoint={checkpoint}",
                     "generate.prompt=ROMEO:", "generate.temperature=0", "generate.max_new_tokens=4"])


@pytest.mark.slow
def test_copied_run_directory_works_with_an_empty_cache(isolated_workspace, tmp_path, monkeypatch, capsys):
    run_dir = run_pretrain("train.max_steps=4", "train.eval_every=100", "train.samples=0")
    ckpt = resolve_checkpoint(str(run_dir))
    facts = checkpoint_facts(ckpt)
    tok = facts["tokenizer"]
    cache = tmp_path / "cache"
    assert "files" in tok and "vocab" not in tok and "merges" not in tok
    assert str(cache) not in repr({k: v for k, v in tok.items() if k != "files"})  # no path into the cache
    assert (run_dir / "tokenizer" / "vocab.json").read_bytes() == tok["files"]["vocab.json"]
    assert json.loads((run_dir / "tokenizer" / "special_tokens.json").read_text()) == [EOT]

    # another machine: the run directory copied, an empty cache, the old cache gone
    elsewhere = tmp_path / "elsewhere" / "run"
    shutil.copytree(run_dir, elsewhere)
    lone = tmp_path / "elsewhere" / "lone.pt"
    shutil.copy(ckpt, lone)
    shutil.move(cache, tmp_path / "cache.gone")
    monkeypatch.setenv("LMRUN_CACHE", str(tmp_path / "empty_cache"))

    assert _generate(elsewhere) == 0
    rec = json.loads((_latest(isolated_workspace, "generate") / "generations.jsonl").read_text().splitlines()[0])
    assert len(rec["token_ids"]) == 4
    assert _generate(lone) == 0  # a checkpoint file on its own
    assert cli.main(["stage=evaluate", "logger=none", "progress=false", f"evaluate.checkpoint={elsewhere}",
                     "evaluate.max_tokens=2048"]) == 0
    ev = json.loads((_latest(isolated_workspace, "evaluate") / "eval.json").read_text())
    assert ev["val_loss"] > 0
    assert cli.main(["stage=sft", *ALIGN, f"align.model={elsewhere}", "align.task.name=arithmetic", "align.steps=2",
                     "align.eval_every=0"]) == 0
    sft = _latest(isolated_workspace, "sft")
    sft_tok = checkpoint_facts(resolve_checkpoint(str(sft)))["tokenizer"]
    assert sft_tok["files"] == tok["files"] and (sft / "tokenizer" / "merges.txt").is_file()
    assert _generate(sft) == 0  # the aligned policy is portable too

    # an old-style checkpoint: paths into the cache; loads while the cache exists ...
    shutil.move(tmp_path / "cache.gone", cache)
    old = tmp_path / "old" / "ckpt_00000004.pt"
    old.parent.mkdir()
    shutil.copy(ckpt, old)
    cached = _rewrite_old_style(old, cache)
    assert "files" not in checkpoint_facts(old)["tokenizer"]
    assert _generate(old) == 0
    # ... an alignment stage started from it saves a portable policy ...
    assert cli.main(["stage=sft", *ALIGN, f"align.model={old}", "align.task.name=arithmetic", "align.steps=1",
                     "align.eval_every=0"]) == 0
    assert checkpoint_facts(resolve_checkpoint(str(_latest(isolated_workspace, "sft"))))["tokenizer"]["files"] == tok["files"]
    # ... and fails in one line naming the missing file when the cache is gone
    shutil.rmtree(cached)
    capsys.readouterr()
    assert _generate(old) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(cached / "vocab.json") in err and "tokenizer file is gone" in err
