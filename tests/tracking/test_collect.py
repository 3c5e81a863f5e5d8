"""Sweep tables: seed statistics against SciPy/NumPy, Welch's test, grouping, the stage."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats

from lmrun.errors import DataError
from lmrun.tracking import collect as tables


def test_seed_statistics_match_numpy_and_scipy():
    vals = [3.51, 3.47, 3.55, 3.49]
    st = tables.seed_statistics(vals, 0.95)
    lo, hi = stats.t.interval(0.95, len(vals) - 1, loc=np.mean(vals), scale=stats.sem(vals))
    assert st["n"] == 4 and st["mean"] == pytest.approx(np.mean(vals))
    assert st["std"] == pytest.approx(np.std(vals, ddof=1))
    assert (st["ci_low"], st["ci_high"]) == (pytest.approx(lo), pytest.approx(hi))
    one = tables.seed_statistics([2.0])
    assert one["mean"] == 2.0 and math.isnan(one["std"]) and math.isnan(one["ci_low"])
    assert tables.seed_statistics([float("nan"), 1.0, 3.0])["n"] == 2


def _jobs():
    rng = np.random.default_rng(0)
    jobs = []
    for i, (model, seed) in enumerate((m, s) for m in ("a", "b") for s in range(3)):
        loss = (3.0 if model == "a" else 3.5) + 0.01 * rng.standard_normal()
        jobs.append({"num": i, "params": {"model": model, "seed": str(seed), "stage": "pretrain"}, "state": "completed",
                     "summary": {"val_loss": loss, "steps": 10, "note": "x"}, "dir": f"/s/{i}"})
    jobs.append({"num": 6, "params": {"model": "b", "seed": "3", "stage": "pretrain"}, "state": "failed",
                 "summary": {}, "dir": "/s/6"})
    return jobs


def test_grouping_by_everything_but_the_seed_and_welch_between_variants():
    jobs = _jobs()
    keys = tables.swept_keys(jobs)
    assert keys == ["model", "seed"]
    assert tables.numeric_metrics(jobs) == ["val_loss"]
    groups = tables.group_table(jobs, keys, ["val_loss"])
    assert [(g["model"], g["n"]) for g in groups] == [("a", 3), ("b", 3)]  # the failed job is left out
    a = [j["summary"]["val_loss"] for j in jobs[:3]]
    assert groups[0]["val_loss_mean"] == pytest.approx(np.mean(a))
    rows = tables.welch_tests(jobs, "model", keys, ["val_loss"])
    b = [j["summary"]["val_loss"] for j in jobs[3:6]]
    assert len(rows) == 1 and rows[0]["p (Welch)"] == pytest.approx(stats.ttest_ind(a, b, equal_var=False).pvalue)
    assert rows[0]["B - A"] == pytest.approx(np.mean(b) - np.mean(a)) and rows[0]["p (Welch)"] < 1e-4
    with pytest.raises(DataError, match="collect.compare=lr: not a swept key"):
        tables.welch_tests(jobs, "lr", keys, ["val_loss"])
    md = tables.to_markdown(tables.summarize_groups(groups, ["val_loss"], 0.95))
    assert md.splitlines()[0] == "| model | n | val_loss (±95% CI) |" and " ± " in md


def test_load_sweep_reads_manifest_and_run_dirs(tmp_path):
    for num, status in ((0, "completed"), (1, "failed")):
        d = tmp_path / str(num)
        d.mkdir()
        (d / "run.json").write_text(json.dumps({"status": status, "overrides": [f"seed={num}", "launch.wait=false"]}))
        (d / "summary.json").write_text(json.dumps({"val_loss": 1.0 + num}))
    jobs = tables.load_sweep(tmp_path)
    assert [(j["num"], j["state"], j["params"]) for j in jobs] == [(0, "completed", {"seed": "0"}),
                                                                  (1, "failed", {"seed": "1"})]
    assert jobs[0]["summary"] == {"val_loss": 1.0} and jobs[1]["summary"] == {}
    with pytest.raises(DataError, match="no jobs found"):
        tables.load_sweep(tmp_path / "0")
    with pytest.raises(DataError, match="no such directory"):
        tables.load_sweep(tmp_path / "nope")
