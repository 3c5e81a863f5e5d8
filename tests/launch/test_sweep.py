"""Sweep directories, manifests, job identity and states."""
from __future__ import annotations

import json

from lmrun.launch import sweep as sweeps


def test_job_identity_ignores_how_and_where_a_job_runs():
    a = ["model=gpt2", "seed=1", "cluster=h100", "launch.wait=false", "stage.resources.gpus_per_node=2",
         "hydra/launcher=slurm", "sweep.dir=x"]
    assert sweeps.job_identity(a) == ["model=gpt2", "seed=1"]
    assert sweeps.job_identity(["seed=1", "model=gpt2"]) == sweeps.job_identity(a)


def test_default_sweep_dir_is_deterministic_and_depends_on_the_jobs():
    jobs = [["stage=pretrain", "seed=0"], ["stage=pretrain", "seed=1"]]
    d1 = sweeps.default_sweep_dir("multiruns", "pretrain", None, jobs)
    assert d1 == sweeps.default_sweep_dir("multiruns", "pretrain", None, [j + ["launch.wait=false"] for j in jobs])
    assert d1.parent.as_posix() == "multiruns/pretrain" and d1.name.startswith("sweep-")
    assert d1 != sweeps.default_sweep_dir("multiruns", "pretrain", None, jobs[:1])
    assert sweeps.default_sweep_dir("multiruns", "pretrain", "ablate_norm", jobs).name.startswith("ablate_norm-")


def test_archive_attempt_moves_everything_but_earlier_attempts(tmp_path):
    run = tmp_path / "3"
    (run / ".submitit").mkdir(parents=True)
    (run / "run.json").write_text("{}")
    (run / "metrics.jsonl").write_text("x")
    first = sweeps.archive_attempt(run)
    (run / "run.json").write_text("{}")
    second = sweeps.archive_attempt(run)
    assert first == run / "attempts" / "0" and second == run / "attempts" / "1"
    assert sorted(p.name for p in run.iterdir()) == [".submitit", "attempts"]
    assert (first / "metrics.jsonl").read_text() == "x"


def test_job_rows_read_states_from_run_records(tmp_path, monkeypatch):
    monkeypatch.setattr(sweeps, "scheduler_states", lambda ids: {"7_1": "RUNNING"})
    for num, status in ((0, "completed"), (1, "running"), (2, "failed"), (3, "running")):
        (tmp_path / str(num)).mkdir()
        (tmp_path / str(num) / "run.json").write_text(json.dumps({"status": status}))
    jobs = {str(n): {"overrides": [f"seed={n}"], "job_id": f"7_{n}", "executor": "slurm", "state": "submitted"}
            for n in range(5)}
    sweeps.save_manifest(tmp_path, {"jobs": jobs})
    states = [r["state"] for r in sweeps.job_rows(tmp_path)]
    # 3 left the queue without a final record (killed): lost; 4 never started and is gone: lost
    assert states == ["completed", "running", "failed", "lost", "lost"]
    monkeypatch.setattr(sweeps, "scheduler_states", lambda ids: None)  # squeue unavailable: no guessing
    assert [r["state"] for r in sweeps.job_rows(tmp_path)] == ["completed", "running", "failed", "running", "submitted"]


def test_outcome_report_lists_what_did_not_complete():
    sweeps.record_outcome(1, ["seed=1"], "failed", "/s/1", "model.d_model=7: expected ...", "9_1")
    sweeps.record_outcome(0, ["seed=0"], "completed", "/s/0")
    out = sweeps.take_outcomes()
    assert [o["num"] for o in out] == [0, 1] and sweeps.take_outcomes() == []
    text = sweeps.format_outcomes(out)
    assert text.splitlines()[0] == "sweep: 2 job(s): 1 completed, 1 failed"
    assert "job 1 (9_1) FAILED: seed=1 -> /s/1: model.d_model=7" in text
