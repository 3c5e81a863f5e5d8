"""`lmrun stage=pretrain` end to end on the embedded corpus: it learns (validation loss below the
unigram entropy), writes its outputs, resumes exactly, and handles non-finite losses."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from lmrun import cli

SMALL = ["logger=none", "progress=false", "tokenizer.vocab_size=512", "model/size=tiny", "model.context_length=64",
         "train.batch_size=8", "train.eval_tokens=4096", "train.samples=1", "train.sample_tokens=16"]


def run_pretrain(*overrides: str, expect: int = 0) -> Path:
    runs = Path.cwd() / "runs" / "pretrain"
    before = set(runs.iterdir()) if runs.exists() else set()
    assert cli.main(["stage=pretrain", *SMALL, *overrides]) == expect
    new = set(runs.iterdir()) - before
    return new.pop() if new else None


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def unigram_entropy(tokens: np.ndarray) -> float:
    counts = np.bincount(tokens.astype(np.int64))
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


@pytest.mark.slow
def test_pretrain_learns_and_writes_outputs(isolated_workspace):
    run_dir = run_pretrain("train.max_steps=150", "train.eval_every=50", "train.log_every=25",
                           "optimizer.lr=3e-3", "train.checkpoint_every=100")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 150 and summary["tokens"] == 150 * 8 * 64
    # the model beats the best context-free predictor of the data: the unigram distribution
    train = np.memmap(_tokens(run_dir) / "train.bin", dtype=np.uint16, mode="r")
    assert summary["val_loss"] < unigram_entropy(np.asarray(train)) - 0.3
    assert summary["val_bpb"] == pytest.approx(summary["val_loss"] / math.log(2) / _val_bytes_per_token(run_dir), rel=1e-6)
    rows = metrics(run_dir)
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [25, 50, 75, 100, 125, 150]
    assert all(k in train_rows[0] for k in ("lr", "grad_norm", "tokens_per_s", "memory_mb"))
    assert train_rows[-1]["loss"] < train_rows[0]["loss"]
    assert [r["step"] for r in rows if "val_bpb" in r] == [50, 100, 150]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["ckpt_00000100.pt", "ckpt_00000150.pt"]
    assert (run_dir / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert "--- sample 0" in (run_dir / "samples.txt").read_text()


def _tokens(run_dir: Path) -> Path:
    ckpt = torch.load(sorted((run_dir / "checkpoints").iterdir())[-1], weights_only=True)
    return Path(ckpt["extra"]["tokens_dir"] if "extra" in ckpt else ckpt["tokens_dir"])


def _val_bytes_per_token(run_dir: Path) -> float:
    return json.loads((_tokens(run_dir) / "meta.json").read_text())["splits"]["val"]["bytes_per_token"]


@pytest.mark.slow
def test_resume_continues_the_same_curve(isolated_workspace):
    common = ["train.max_steps=12", "train.log_every=1", "train.eval_every=100", "train.checkpoint_every=6",
              "train.keep_last=5", "train.samples=0"]
    full = run_pretrain(*common)
    full_losses = {r["step"]: r["loss"] for r in metrics(full) if "loss" in r}
    assert sorted(full_losses) == list(range(1, 13))
    # an interrupted copy: what the run directory held right after the checkpoint at step 6
    cut = isolated_workspace / "interrupted"
    shutil.copytree(full, cut)
    (cut / "checkpoints" / "ckpt_00000012.pt").unlink()
    kept = [line for line in (cut / "metrics.jsonl").read_text().splitlines() if json.loads(line)["step"] <= 6]
    (cut / "metrics.jsonl").write_text("\n".join(kept) + "\n")
    (cut / "summary.json").unlink()
    assert cli.main(["stage=pretrain", *SMALL, *common, f"hydra.run.dir={cut}"]) == 0
    resumed = {r["step"]: r["loss"] for r in metrics(cut) if "loss" in r}
    assert sorted(resumed) == list(range(1, 13))
    assert [resumed[s] for s in range(7, 13)] == [full_losses[s] for s in range(7, 13)]
    info = json.loads((cut / "run.json").read_text())
    assert info["restarts"] == 1 and info["status"] == "completed"
    assert json.loads((cut / "summary.json").read_text())["resumed"] is True


@pytest.mark.parametrize("mode", ["stop", "skip_step"])
@pytest.mark.slow
def test_non_finite_loss(mode, isolated_workspace, monkeypatch, capsys):
    import lmrun.train.trainer as trainer

    real = trainer.cross_entropy_with_z
    calls = {"n": 0}

    def poisoned(logits, targets, z_weight, *args, **kwargs):
        calls["n"] += 1
        ce, z = real(logits, targets, z_weight, *args, **kwargs)
        return (ce * float("nan"), z) if calls["n"] == 5 else (ce, z)

    real_fused = trainer.linear_cross_entropy

    def poisoned_fused(hidden, weight, targets, *args, **kwargs):  # the default path (train.fused_loss)
        calls["n"] += 1
        loss, ce, z = real_fused(hidden, weight, targets, *args, **kwargs)
        return (loss * float("nan"), ce * float("nan"), z) if calls["n"] == 5 else (loss, ce, z)

    monkeypatch.setattr(trainer, "cross_entropy_with_z", poisoned)
    monkeypatch.setattr(trainer, "linear_cross_entropy", poisoned_fused)
    common = ["train.max_steps=8", "train.log_every=1", "train.eval_every=100", "train.checkpoint_every=2",
              "train.samples=0", f"train.on_nan={mode}"]
    if mode == "stop":
        run_dir = run_pretrain(*common, expect=1)
        info = json.loads((run_dir / "run.json").read_text())
        assert info["status"] == "failed" and "non-finite loss at step 5" in info["error"]
        assert "ckpt_00000004.pt" in info["error"]
        assert "non-finite loss at step 5" in capsys.readouterr().err
        assert sorted(p.name for p in (run_dir / "checkpoints").iterdir())[-1] == "ckpt_00000004.pt"
    else:
        run_dir = run_pretrain(*common)
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["skipped_steps"] == 1 and summary["steps"] == 8 and math.isfinite(summary["val_loss"])


@pytest.mark.slow
def test_evaluate_stage_reproduces_the_final_validation_loss(isolated_workspace, tmp_path, capsys):
    # sliding-window validation (train.eval_stride / evaluate.stride): the same number both ways
    run_dir = run_pretrain("train.max_steps=20", "train.eval_every=100", "train.samples=0", "train.eval_tokens=null",
                           "train.eval_stride=32")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert cli.main(["stage=evaluate", f"evaluate.checkpoint={run_dir}", "dry_run=true"]) == 0
    assert "ckpt_00000020.pt" in capsys.readouterr().out and not (isolated_workspace / "runs" / "evaluate").exists()
    assert cli.main(["stage=evaluate", "logger=none", "progress=false", f"evaluate.checkpoint={run_dir}",
                     "evaluate.stride=32"]) == 0
    (eval_dir,) = (isolated_workspace / "runs" / "evaluate").iterdir()
    result = json.loads((eval_dir / "eval.json").read_text())
    assert result["step"] == 20 and result["stride"] == 32
    assert result["val_loss"] == pytest.approx(summary["val_loss"], rel=1e-6)
    assert result["val_bpb"] == pytest.approx(summary["val_bpb"], rel=1e-6)
    assert cli.main(["stage=evaluate", "logger=none", f"evaluate.checkpoint={run_dir}", "evaluate.stride=65"]) == 2
    assert "evaluate.stride=65: expected null or an integer in [1, 64]" in capsys.readouterr().err
    # weight-only int8: what quantization costs, measured (small, not zero)
    assert cli.main(["stage=evaluate", "logger=none", "progress=false", f"evaluate.checkpoint={run_dir}",
                     "evaluate.int8=true", "evaluate.stride=32"]) == 0
    int8_dir = max((isolated_workspace / "runs" / "evaluate").iterdir())
    q = json.loads((int8_dir / "eval.json").read_text())
    assert q["int8"] is True and q["val_loss"] != result["val_loss"]
    assert q["val_loss"] == pytest.approx(result["val_loss"], rel=0.01)
    # another text with the checkpoint's tokenizer, and a bad checkpoint path
    other = tmp_path / "other.txt"
    other.write_text("To be, or not to be, that is the question.\n" * 200)
    assert cli.main(["stage=evaluate", "logger=none", "progress=false", f"evaluate.checkpoint={run_dir}",
                     "data=text_files", f"data.train={other}", "evaluate.split=both"]) == 0
    o = json.loads((max((isolated_workspace / "runs" / "evaluate").iterdir()) / "eval.json").read_text())
    assert o["stride"] == 64 and o["train_loss"] > 0 and o["train_tokens"] > o["val_tokens"]  # non-overlapping
    assert cli.main(["stage=evaluate", "logger=none", f"evaluate.checkpoint={tmp_path / 'nope'}"]) == 2
    assert "evaluate.checkpoint=" in capsys.readouterr().err


@pytest.mark.slow
def test_token_budget_accumulation_checkpointing_z_loss_noise_scale(isolated_workspace):
    run_dir = run_pretrain("train.max_steps=null", "train.max_tokens=8192", "train.grad_accum_steps=2",
                           "train.activation_checkpointing=true", "train.z_loss=1e-4", "train.noise_scale=true",
                           "train.log_every=4", "train.eval_every=100", "train.samples=0")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 16 and summary["tokens"] == 8192  # 8 sequences x 64 tokens per step
    rows = [r for r in metrics(run_dir) if "loss" in r]
    assert all(r["z_loss"] > 0 for r in rows)
    assert any(math.isfinite(r.get("noise_scale_tokens") or math.nan) for r in rows)


@pytest.mark.slow
def test_time_budget(isolated_workspace):
    run_dir = run_pretrain("train.max_steps=null", "train.max_time=2", "train.log_every=5", "train.eval_every=1000",
                           "train.samples=0")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert 2.0 <= summary["train_seconds"] < 10.0 and summary["steps"] >= 2


@pytest.mark.slow
def test_fused_loss_follows_the_unfused_curve(isolated_workspace):
    """train.fused_loss (LM head + loss chunk by chunk) trains the same model as the unfused path:
    same losses step by step (up to float32 summation order), z-loss and accumulation included."""
    common = ("train.max_steps=8", "train.log_every=1", "train.eval_every=100", "train.samples=0",
              "train.z_loss=1e-3", "train.grad_accum_steps=2", "train.keep_heap_memory=false")
    fused = {r["step"]: r for r in metrics(run_pretrain(*common)) if "loss" in r}
    plain = {r["step"]: r for r in metrics(run_pretrain(*common, "train.fused_loss=false")) if "loss" in r}
    assert sorted(fused) == sorted(plain) == list(range(1, 9))
    for step in fused:
        assert fused[step]["loss"] == pytest.approx(plain[step]["loss"], abs=2e-4)
        assert fused[step]["z_loss"] == pytest.approx(plain[step]["z_loss"], rel=1e-3)


HEAP_PROBE = """
import resource, torch
from lmrun.train.trainer import keep_heap_memory

def faults(n=5):  # minor page faults of n allocate-touch-free rounds of 32 MiB
    x = torch.ones(8 << 20); del x
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        x = torch.ones(8 << 20); del x
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0

assert keep_heap_memory(False)  # glibc's static defaults: 32 MiB is mapped and unmapped each time
default = faults()
assert keep_heap_memory(True)
print(default, faults())
"""


@pytest.mark.slow
def test_keep_heap_memory_stops_page_faults_on_reused_activations():
    """glibc maps and unmaps a large allocation on each use (page faults every step);
    keep_heap_memory(True) reuses heap memory instead. In a fresh process (heap state matters)."""
    import platform
    import subprocess
    import sys

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc only")
    out = subprocess.run([sys.executable, "-c", HEAP_PROBE], capture_output=True, text=True, check=True).stdout
    default, kept = map(int, out.split())
    assert kept * 5 < default, (default, kept)
