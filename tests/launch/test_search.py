"""Hyperparameter search with the Optuna sweeper (``hparams_search=main_job``): pre-flight on one
sample of the space, trials that return ``sweep.objective``, the best trial reported and recorded,
reruns that skip completed trials."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from lmrun import cli
from lmrun.launch import sweep as sweeps

SEARCH = ["-m", "hparams_search=main_job", "hydra.sweeper.n_trials=2", "logger=none", "progress=false"]
TINY = ["tokenizer.vocab_size=300", "model/size=tiny", "model.context_length=32", "train.batch_size=4",
        "train.max_steps=3", "train.eval_tokens=1024", "train.log_every=5"]


@pytest.fixture(autouse=True)
def _clear_outcomes():
    sweeps.take_outcomes()
    yield
    sweeps.take_outcomes()


def files_under(path: Path) -> list[Path]:
    return list(path.rglob("*")) if path.exists() else []


def test_the_preset_searches_lr_and_weight_decay_of_the_main_job():
    cfg = cli.compose(["hparams_search=main_job"], with_hydra=True)
    assert cfg.stage.name == "pretrain" and cfg.sweep.objective == "val_bpb"
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "minimize"
    assert set(sweeper.params) == {"optimizer.lr", "optimizer.weight_decay"}
    assert sweeper.sampler.seed is not None and sweeper.n_trials <= 10
    assert cfg.hydra.launcher._target_.endswith("LmrunBasicLauncher")


def test_dry_run_checks_one_sample_and_writes_nothing(isolated_workspace, capsys):
    assert cli.main(["-m", "hparams_search=main_job", "dry_run=true"]) == 0
    captured = capsys.readouterr()
    assert "checking one sample of the search space before launching 8 trial(s) (OptunaSweeper)" in captured.err
    out = captured.out
    assert "8 trial(s) chosen by OptunaSweeper in" in out and "/multiruns/pretrain/main_job-" in out
    assert "objective: val_bpb (minimize)" in out
    assert "search space: optimizer.lr=tag(log, interval(1e-3, 1e-2)) optimizer.weight_decay=interval(0.0, 0.5)" in out
    assert "sample: optimizer.lr=0.001 optimizer.weight_decay=0.0" in out and "stage: pretrain" in out
    assert files_under(isolated_workspace) == []


@pytest.mark.parametrize("overrides, expected", [
    (["optimizer.lr=interval(-1.0, 1e-2)"], "lmrun: error: optimizer.lr=-1.0"),  # the sample is validated
    (["sweep.objective=null"], "lmrun: error: sweep.objective=None: hydra/sweeper OptunaSweeper optimizes"),
    (["hydra/launcher=submitit_local", "launch.wait=false"], "lmrun: error: launch.wait=false: OptunaSweeper chooses"),
])
def test_search_mistakes_are_one_line(overrides, expected, isolated_workspace, capsys):
    assert cli.main(["-m", "hparams_search=main_job", *overrides, "dry_run=true"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(expected), err
    assert files_under(isolated_workspace) == []


@pytest.mark.slow
def test_search_runs_trials_reports_the_best_and_resumes(small_text, capsys):
    args = [*SEARCH, *TINY, "data=text_files", f"data.train={small_text}"]
    assert cli.main(args) == 0
    err = capsys.readouterr().err
    assert "sweep: 2 job(s): 2 completed" in err
    (sweep,) = Path("multiruns/pretrain").iterdir()
    assert sweep.name.startswith("main_job-")
    values = {n: json.loads((sweep / n / "summary.json").read_text())["val_bpb"] for n in "01"}
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    best = min(values, key=values.get)
    assert results["best_value"] == pytest.approx(values[best])
    manifest = json.loads((sweep / "sweep.json").read_text())
    assert [manifest["jobs"][n]["state"] for n in "01"] == ["completed", "completed"]
    search = manifest["search"]
    assert search["objective"] == "val_bpb" and search["best_job"] == int(best)
    assert search["best_value"] == pytest.approx(values[best])
    for n in "01":  # trials sample the preset's space
        params = dict(o.split("=", 1) for o in manifest["jobs"][n]["overrides"])
        assert 1e-3 <= float(params["optimizer.lr"]) <= 1e-2 and 0 <= float(params["optimizer.weight_decay"]) <= 0.5
        assert json.loads((sweep / n / "run.json").read_text())["status"] == "completed"
    assert f"lmrun: best val_bpb = {values[best]:.6g} with optimizer.lr=" in err
    assert f"(job {best}: {(sweep / best).absolute()})" in err
    # the same command again: the seeded sampler proposes the same trials, which are skipped
    assert cli.main(args) == 0
    err = capsys.readouterr().err
    assert "sweep: 2 job(s): 2 skipped" in err and f"best val_bpb = {values[best]:.6g}" in err
    assert list(Path("multiruns/pretrain").iterdir()) == [sweep]


@pytest.mark.slow
def test_a_search_whose_trials_all_fail_ends_in_one_line_per_trial(small_text, capsys):
    args = [*SEARCH, *TINY, "hydra.sweeper.n_trials=1", "train.max_steps=1", "sweep.objective=val_bpd",
            "data=text_files", f"data.train={small_text}"]
    assert cli.main(args) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "sweep: 1 job(s): 1 failed" in err
    assert "sweep.objective=val_bpd: not a number in stage pretrain's summary; numeric keys: " in err
    assert "val_bpb" in err and "lmrun: no trial completed: no best val_bpd" in err


@pytest.mark.slow
def test_search_through_the_submitit_local_launcher(small_text, capsys):
    # the launcher reads each finished job's objective from its run directory for the sweeper
    args = [*SEARCH, *TINY, "hydra.sweeper.n_trials=1", "train.max_steps=1", "hydra/launcher=submitit_local",
            "launch.poll_s=0.2", "data=text_files", f"data.train={small_text}"]
    assert cli.main(args) == 0
    err = capsys.readouterr().err
    assert "submitted 1 job(s) to local" in err and "lmrun: best val_bpb = " in err
    (sweep,) = Path("multiruns/pretrain").iterdir()
    manifest = json.loads((sweep / "sweep.json").read_text())
    value = json.loads((sweep / "0" / "summary.json").read_text())["val_bpb"]
    assert manifest["executor"] == "local" and manifest["jobs"]["0"]["state"] == "completed"
    assert manifest["search"]["best_job"] == 0 and manifest["search"]["best_value"] == pytest.approx(value)
