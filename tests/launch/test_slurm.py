"""lmrun on a real Slurm cluster: the one-node cluster of slurm/start.sh (CI starts it).

Skipped when no cluster answers, unless LMRUN_REQUIRE_SLURM=1 (CI), where that is a failure.
Jobs run single-threaded (cluster.setup exports OMP_NUM_THREADS=1) so that their losses equal
this process's (conftest sets torch to one thread)."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from lmrun import cli
from lmrun.launch import sweep as sweeps

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

SLURM = ["hydra/launcher=slurm", "launch.poll_s=0.5", "cluster.setup=['export OMP_NUM_THREADS=1']"]
TOK = ["stage=tokenizer", "logger=none", "progress=false", "tokenizer.vocab_size=300"]
TINY = ["stage=pretrain", "logger=none", "progress=false", "tokenizer.vocab_size=300", "model/size=tiny",
        "model.context_length=32", "train.batch_size=4", "train.eval_tokens=2048", "train.samples=0",
        "train.log_every=10", "train.eval_every=100000", "train.checkpoint_every=100000"]


def _cluster_up() -> bool:
    if not shutil.which("sinfo"):
        return False
    out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20)
    return out.returncode == 0 and any(s.startswith(("idle", "mixed", "alloc")) for s in out.stdout.split())


@pytest.fixture(scope="module", autouse=True)
def cluster():
    if not _cluster_up():
        if os.environ.get("LMRUN_REQUIRE_SLURM") == "1":
            pytest.fail("no Slurm cluster answers (slurm/start.sh starts one)")
        pytest.skip("no Slurm cluster (start one with slurm/start.sh)")


@pytest.fixture(autouse=True)
def _outcomes():
    sweeps.take_outcomes()
    yield
    sweeps.take_outcomes()


def wait_gone(job_ids: list[str], timeout: float = 240) -> None:
    t0 = time.time()
    while sweeps.scheduler_states(job_ids):
        assert time.time() - t0 < timeout, f"jobs {job_ids} still queued after {timeout} s"
        time.sleep(0.5)


def test_tokenizer_and_pretrain_jobs_complete(capsys):
    assert cli.main([*TOK, *SLURM, "sweep=multiruns/tok"]) == 0
    assert cli.main([*TINY, *SLURM, "train.max_steps=20", "sweep=multiruns/pre"]) == 0
    err = capsys.readouterr().err
    assert err.count("1 node(s) x 1 task(s), 0 GPU(s)/node") == 2 and err.count("sweep: 1 job(s): 1 completed") == 2
    tok, pre = Path("multiruns/tok/0"), Path("multiruns/pre/0")
    assert json.loads((tok / "run.json").read_text())["slurm"]["job_id"]
    assert (tok / "vocab.json").exists() and (tok / "merges.txt").exists()
    assert json.loads((pre / "summary.json").read_text())["steps"] == 20
    assert json.loads((pre / "run.json").read_text())["status"] == "completed"


def test_a_two_value_sweep_is_one_array_and_skip_done_works(capsys):
    assert cli.main(["-m", *TOK, *SLURM, "tokenizer.vocab_size=300,270", "launch.wait=false", "sweep=multiruns/arr"]) == 0
    err = capsys.readouterr().err
    array = re.search(r"submitted 2 job\(s\) to slurm as (\d+)", err).group(1)
    assert f"job 0: {array}_0" in err and f"job 1: {array}_1" in err and "not waiting" in err
    manifest = json.loads(Path("multiruns/arr/sweep.json").read_text())
    assert [manifest["jobs"][n]["job_id"] for n in "01"] == [f"{array}_0", f"{array}_1"]
    wait_gone([f"{array}_0", f"{array}_1"])
    assert [r["state"] for r in sweeps.job_rows(Path("multiruns/arr"))] == ["completed", "completed"]
    assert cli.main(["-m", *TOK, *SLURM, "tokenizer.vocab_size=300,270", "sweep=multiruns/arr"]) == 0
    err = capsys.readouterr().err
    assert "submitted" not in err and "2 job(s) already completed" in err and "2 skipped" in err


def test_a_failed_job_is_reported_as_failed(capsys):
    code = cli.main(["-m", *TINY, *SLURM, "train.max_steps=10", "optimizer.lr=1e12", "sweep=multiruns/fail"])
    err = capsys.readouterr().err
    assert code == 1 and "sweep: 1 job(s): 1 failed" in err and "non-finite" in err


def test_a_preempted_job_requeues_and_ends_with_the_uninterrupted_loss(capsys):
    args = [*TINY, "train.max_steps=600"]
    assert cli.main([*args, f"hydra.run.dir={Path('runs/reference').absolute()}"]) == 0
    reference = json.loads(Path("runs/reference/summary.json").read_text())
    assert cli.main([*args, *SLURM, "launch.wait=false", "sweep=multiruns/preempt"]) == 0
    job_id = re.search(r"job 0: (\S+)", capsys.readouterr().err).group(1)
    run = Path("multiruns/preempt/0")
    t0 = time.time()
    while not (run / "metrics.jsonl").exists() or len((run / "metrics.jsonl").read_text().splitlines()) < 10:
        assert time.time() - t0 < 120, "the job did not start training"
        time.sleep(0.2)
    # what Slurm sends before a time limit or on preemption (submitit's --signal=USR2@...)
    subprocess.run(["scancel", f"--signal={signal.Signals(signal.SIGUSR2).name.removeprefix('SIG')}", job_id],
                   check=True)
    wait_gone([job_id], timeout=300)
    info = json.loads((run / "run.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    assert info["status"] == "completed" and info["restarts"] == 1 and info["slurm"]["restart_count"] == "1"
    assert summary["resumed"] is True and summary["steps"] == 600
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert len(ckpts) == 2 and ckpts[-1] == "ckpt_00000600.pt"  # the preemption checkpoint, then the final one
    assert summary["final_train_loss"] == reference["final_train_loss"]
    assert summary["val_loss"] == reference["val_loss"]


def test_collect_on_two_variants_by_three_seeds(capsys):
    assert cli.main(["-m", *TINY, *SLURM, "train.max_steps=20", "model.d_model=32,48", "seed=0,1,2",
                     "sweep=multiruns/ablation"]) == 0
    assert "sweep: 6 job(s): 6 completed" in capsys.readouterr().err
    assert cli.main(["stage=collect", "sweep=multiruns/ablation", "logger=none", "collect.compare=model.d_model"]) == 0
    out = capsys.readouterr().out
    (run,) = Path("runs/collect").iterdir()
    rows = (run / "results.csv").read_text().splitlines()
    assert [r.split(",")[:2] for r in rows[1:]] == [["32", "3"], ["48", "3"]]
    assert "| model.d_model | n | val_loss (±95% CI)" in out and "p (Welch)" in out


def test_a_two_task_job_trains_data_parallel_like_one_process(capsys):
    """Two Slurm tasks (gloo, one CPU each) with lmrun's bucketed DDP follow the single-process
    trajectory; only rank 0 writes the run directory."""
    args = [*TINY, "train.batch_size=8", "train.max_steps=30", "model.dropout=0"]  # masks differ per process
    assert cli.main([*args, f"hydra.run.dir={Path('runs/single').absolute()}"]) == 0
    single = json.loads(Path("runs/single/summary.json").read_text())
    assert cli.main([*args, *SLURM, "stage.resources.tasks_per_node=2", "stage.resources.gpus_per_node=0",
                     "distributed.strategy=ddp_bucketed", "sweep=multiruns/ddp"]) == 0
    assert "1 node(s) x 2 task(s)" in capsys.readouterr().err
    run = Path("multiruns/ddp/0")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["strategy"] == "ddp_bucketed"
    assert summary["final_train_loss"] == pytest.approx(single["final_train_loss"], abs=1e-5)
    assert summary["val_loss"] == pytest.approx(single["val_loss"], abs=1e-5)
    assert len([p for p in run.iterdir() if p.suffix == ".log"]) == 1
