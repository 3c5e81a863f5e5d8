"""Sweeps through the CLI with Hydra's in-process launcher: deterministic sweep directories,
skip-done, failed jobs reported (the others still run), collect, dry runs, and the
preemption path (checkpoint at a step boundary, resume in the same directory)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmrun import cli
from lmrun.launch import preemption

TOK = ["stage=tokenizer", "logger=none", "progress=false"]
TINY = ["stage=pretrain", "logger=none", "progress=false", "tokenizer.vocab_size=300", "model/size=tiny",
        "model.context_length=32", "train.batch_size=4", "train.eval_tokens=2048", "train.samples=0",
        "train.log_every=5", "train.eval_every=1000"]


def sweep_dirs() -> list[Path]:
    return sorted(Path("multiruns").glob("*/*"))


def status(d: Path) -> str:
    return json.loads((d / "run.json").read_text())["status"]


@pytest.mark.slow
def test_rerunning_a_sweep_skips_completed_jobs(capsys):
    assert cli.main(["-m", *TOK, "tokenizer.vocab_size=300,270"]) == 0
    (sweep,) = sweep_dirs()
    assert sweep.parent.name == "tokenizer" and sweep.name.startswith("sweep-")
    first = [json.loads((sweep / n / "run.json").read_text())["started"] for n in "01"]
    assert "sweep: 2 job(s): 2 completed" in capsys.readouterr().err
    assert cli.main(["-m", *TOK, "tokenizer.vocab_size=300,270"]) == 0
    assert sweep_dirs() == [sweep]
    assert "sweep: 2 job(s): 2 skipped" in capsys.readouterr().err
    assert [json.loads((sweep / n / "run.json").read_text())["started"] for n in "01"] == first
    # skip_done=false runs them again; the earlier attempt is kept under attempts/
    assert cli.main(["-m", *TOK, "tokenizer.vocab_size=300,270", "sweep.skip_done=false"]) == 0
    assert (sweep / "0" / "attempts" / "0" / "run.json").exists() and status(sweep / "0") == "completed"


def test_a_failed_job_is_reported_and_the_others_run(capsys):
    code = cli.main(["-m", *TINY, "train.max_steps=10", "optimizer.lr=1e12,3e-3", "model.d_model=32",
                     "sweep=multiruns/nan_sweep"])
    err = capsys.readouterr().err
    assert code == 1
    sweep = Path("multiruns/nan_sweep")
    assert status(sweep / "0") == "failed" and status(sweep / "1") == "completed"
    assert "sweep: 2 job(s): 1 completed, 1 failed" in err
    assert "job 0 FAILED: stage=pretrain" in err and "non-finite" in err
    jobs = json.loads((sweep / "sweep.json").read_text())["jobs"]  # the basic launcher's manifest
    assert (jobs["0"]["state"], jobs["1"]["state"]) == ("failed", "completed")
    # rerun: the completed job is skipped, the failed one runs again (and fails again)
    assert cli.main(["-m", *TINY, "train.max_steps=10", "optimizer.lr=1e12,3e-3", "model.d_model=32",
                     "sweep=multiruns/nan_sweep"]) == 1
    assert "1 failed, 1 skipped" in capsys.readouterr().err
    # pretrain resumes in its directory (from its last checkpoint, if any) rather than starting over
    assert json.loads((sweep / "0" / "run.json").read_text())["restarts"] == 1


def test_dry_run_of_a_sweep_lists_jobs_dirs_and_resources(capsys):
    assert cli.main(["-m", *TOK, "tokenizer.vocab_size=300,270", "hydra/launcher=slurm", "cluster=h100",
                     "dry_run=true"]) == 0
    out = capsys.readouterr().out
    assert "2 job(s) in" in out and "launcher LmrunSlurmLauncher" in out
    assert out.count("action: run") == 2 and "/0\n" in out and "/1\n" in out
    assert "gpus_per_node: 0" in out and "partition: gpu" in out
    assert not Path("multiruns").exists()


@pytest.mark.slow
def test_collect_groups_seeds_and_compares_variants(capsys):
    assert cli.main(["-m", *TINY, "train.max_steps=20", "model.d_model=32,48", "seed=0,1",
                     "sweep=multiruns/ablation"]) == 0
    capsys.readouterr()
    assert cli.main(["stage=collect", "sweep=multiruns/ablation", "dry_run=true"]) == 0
    out = capsys.readouterr().out
    assert "jobs: 4" in out and "completed: 4" in out and "- model.d_model" in out and not Path("runs").exists()
    assert cli.main(["stage=collect", "sweep=multiruns/ablation", "logger=none", "collect.compare=model.d_model",
                     "collect.plot=model.d_model"]) == 0
    out = capsys.readouterr().out
    (run,) = Path("runs/collect").iterdir()
    results = (run / "results.csv").read_text().splitlines()
    assert results[0].startswith("model.d_model,n,val_loss_mean,val_loss_std,val_loss_ci_low,val_loss_ci_high")
    assert [r.split(",")[:2] for r in results[1:]] == [["32", "2"], ["48", "2"]]
    assert "## compare" in out and "p (Welch)" in (run / "compare.md").read_text()
    assert (run / "plot_val_loss.png").read_bytes()[:4] == b"\x89PNG"
    assert len((run / "jobs.csv").read_text().splitlines()) == 5


def test_collect_needs_a_sweep(capsys):
    assert cli.main(["stage=collect", "logger=none"]) == 2
    assert "sweep.dir=None: expected the sweep directory" in capsys.readouterr().err
    assert cli.main(["stage=collect", "sweep=nowhere", "logger=none"]) == 2
    assert "sweep=nowhere: no such directory" in capsys.readouterr().err


@pytest.mark.slow
def test_preempted_training_saves_and_resumes_to_the_same_result(monkeypatch):
    run_dir = Path("runs/preempt").absolute()
    ref_dir = Path("runs/reference").absolute()
    args = [*TINY, "train.max_steps=40", "train.checkpoint_every=1000"]
    assert cli.main([*args, f"hydra.run.dir={ref_dir}"]) == 0
    calls = {"n": 0}

    def requested():  # the signal "arrives" during step 17
        calls["n"] += 1
        return calls["n"] >= 17

    monkeypatch.setattr(preemption, "requested", requested)
    assert cli.main([*args, f"hydra.run.dir={run_dir}"]) != 0
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "preempted" and "preempted at step 17" in info["error"]
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["ckpt_00000017.pt"]
    monkeypatch.undo()
    assert cli.main([*args, f"hydra.run.dir={run_dir}"]) == 0
    done = json.loads((run_dir / "summary.json").read_text())
    ref = json.loads((ref_dir / "summary.json").read_text())
    assert done["resumed"] is True and done["steps"] == 40
    assert done["final_train_loss"] == ref["final_train_loss"] and done["val_loss"] == ref["val_loss"]


@pytest.fixture(autouse=True)
def _clear_outcomes():
    from lmrun.launch.sweep import take_outcomes

    take_outcomes()
    yield
    take_outcomes()
