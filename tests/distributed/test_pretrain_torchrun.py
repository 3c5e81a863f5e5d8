"""``pretrain`` under torchrun with 2 CPU processes: one run directory written by rank 0, and the
same validation loss as one process training on the same batches."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SMALL = ["logger=none", "progress=false", "tokenizer.vocab_size=512", "model/size=tiny", "model.context_length=64",
         "train.batch_size=8", "train.eval_tokens=4096", "train.samples=1", "train.sample_tokens=8",
         "train.max_steps=4", "train.log_every=2", "train.checkpoint_every=2",
         "model.dropout=0"]  # dropout masks are drawn per process: only without it is the trajectory the same


def _run(nproc: int, *overrides: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        cmd = [sys.executable, "-m", "lmrun.cli"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "lmrun.cli"]
    runs = Path.cwd() / "runs" / "pretrain"
    before = set(runs.iterdir()) if runs.exists() else set()
    out = subprocess.run([*cmd, "stage=pretrain", *SMALL, *overrides], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    new = set(runs.iterdir()) - before
    assert len(new) == 1, f"{len(new)} run directories for one command: {sorted(p.name for p in new)}"
    run_dir = new.pop()
    return {"dir": run_dir, "summary": json.loads((run_dir / "summary.json").read_text())}


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp_bucketed", pytest.param("zero1", marks=pytest.mark.slow),
                                      pytest.param("fsdp", marks=pytest.mark.slow),
                                      pytest.param("tp", marks=pytest.mark.slow)])
def test_torchrun_pretrain_matches_one_process(strategy):
    one = _run(1)
    two = _run(2, f"distributed.strategy={strategy}")
    s1, s2 = one["summary"], two["summary"]
    assert s2["world_size"] == 2 and s2["strategy"] == strategy
    assert s2["val_loss"] == pytest.approx(s1["val_loss"], abs=1e-5)
    assert s2["final_train_loss"] == pytest.approx(s1["final_train_loss"], abs=1e-5)
    files = {p.name for p in two["dir"].iterdir()}
    assert {"run.json", "metrics.jsonl", "summary.json", "samples.txt", "pretrain.log"} <= files
    assert sorted(p.name for p in (two["dir"] / "checkpoints").iterdir()) == ["ckpt_00000002.pt", "ckpt_00000004.pt"]
    log = (two["dir"] / "pretrain.log").read_text()
    assert "2 processes, distributed.strategy=" + strategy in log
