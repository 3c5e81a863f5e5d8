"""The submitit local launcher (``hydra/launcher=submitit_local``: jobs as local subprocesses)
and the sweep manifest that every launcher writes, the basic in-process one included."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmrun import cli
from lmrun.launch import sweep as sweeps
from lmrun.launch.resources import job_resources, submitit_parameters


@pytest.fixture(autouse=True)
def _clear_outcomes():
    sweeps.take_outcomes()
    yield
    sweeps.take_outcomes()


def test_local_executor_accepts_the_parameters_lmrun_gives_it(tmp_path):
    import submitit

    cfg = cli.compose(["stage=tokenizer", "cluster.setup=['export OMP_NUM_THREADS=1']"])
    params = submitit_parameters(job_resources(cfg), "local", cfg.launch)
    executor = submitit.AutoExecutor(folder=str(tmp_path / "%j"), cluster="local")
    executor.update_parameters(name="t", **params)  # raised NameError on local_signal_delay_s (submitit 1.5.4)
    assert params["local_setup"] == ["export OMP_NUM_THREADS=1"] and params["timeout_min"] == 60


@pytest.mark.slow
def test_submitit_local_runs_the_job_and_lists_it_in_the_manifest(small_text, capsys):
    args = ["-m", "stage=tokenizer", "hydra/launcher=submitit_local", "tokenizer.vocab_size=300", "data=text_files",
            f"data.train={small_text}", "logger=none", "progress=false", "launch.poll_s=0.2"]
    assert cli.main(args) == 0
    err = capsys.readouterr().err
    assert "submitted 1 job(s) to local" in err and "sweep: 1 job(s): 1 completed" in err
    (sweep,) = Path("multiruns/tokenizer").iterdir()
    manifest = json.loads((sweep / "sweep.json").read_text())
    assert manifest["executor"] == "local" and manifest["sweep_dir"] == str(sweep.absolute())
    job = manifest["jobs"]["0"]
    assert job["state"] == "completed" and job["executor"] == "local" and job["job_id"]
    assert "tokenizer.vocab_size=300" in job["overrides"]
    assert json.loads((sweep / "0" / "run.json").read_text())["status"] == "completed"
    assert json.loads((sweep / "0" / "summary.json").read_text())["vocab_size"] == 300
    # the same command again finds the completed job and does not submit it
    assert cli.main(args) == 0
    assert "sweep: 1 job(s): 1 skipped" in capsys.readouterr().err
    assert json.loads((sweep / "sweep.json").read_text())["jobs"]["0"]["state"] == "skipped"


@pytest.mark.slow
def test_basic_launcher_writes_the_same_manifest(small_text, capsys):
    assert cli.main(["-m", "stage=tokenizer", "data=text_files", f"data.train={small_text}", "logger=none",
                     "progress=false", "tokenizer.vocab_size=300,270"]) == 0
    (sweep,) = Path("multiruns/tokenizer").iterdir()
    manifest = json.loads((sweep / "sweep.json").read_text())
    assert manifest["executor"] == "basic" and manifest["sweep_dir"] == str(sweep.absolute())
    assert manifest["commands"][0].startswith("lmrun -m stage=tokenizer")
    assert sorted(manifest["jobs"]) == ["0", "1"]
    assert [manifest["jobs"][n]["state"] for n in "01"] == ["completed", "completed"]
    assert "tokenizer.vocab_size=270" in manifest["jobs"]["1"]["overrides"]
    assert all(j["executor"] == "basic" and j["job_id"] is None and j["started"] <= j["finished"]
               for j in manifest["jobs"].values())
    # one format: collect's reader and the manifest's job rows agree with the run records
    assert [r["state"] for r in sweeps.job_rows(sweep)] == ["completed", "completed"]
    capsys.readouterr()
    assert cli.main(["stage=collect", f"sweep={sweep}", "logger=none", "progress=false"]) == 0
    assert "collected 2 job(s)" in capsys.readouterr().err
