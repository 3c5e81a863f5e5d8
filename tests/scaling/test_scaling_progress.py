"""The scaling stage is never silent for long: the approach-3 grid fit, every bootstrap and each
planned pretrain run report progress (done/total, elapsed, ETA) while they run (the stage's own
log is checked in test_fits.test_scaling_stage_on_a_file_writes_tables_and_plots)."""
from __future__ import annotations

import logging
import sys

from lmrun.scaling import fits
from lmrun.scaling.planner import _run_reporting
from lmrun.tracking import progress
from tests.scaling.test_fits import synthetic


def _messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records]


def test_grid_fit_and_bootstrap_report_progress(monkeypatch, caplog):
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    monkeypatch.setattr(fits, "INIT_GRID", {"a": [0.0, 5.0, 10.0], "b": [5.0], "e": [0.0], "alpha": [0.5],
                                            "beta": [0.5]})
    runs = synthetic(budget_list=(1e17, 1e18, 1e19), sizes=5)
    with caplog.at_level(logging.INFO):
        fits.bootstrap(runs, "3", [1e21], n_boot=20, progress=True)
    lines = _messages(caplog)
    assert "approach 3: fitting 15 runs" in lines
    assert "approach 3 fit: 0/3 starts (0%), elapsed 0.0s, ETA ?, 0 starts/s" in lines
    fit_lines = [x for x in lines if x.startswith("approach 3 fit: ")]
    assert [x.split(" starts")[0] for x in fit_lines] == [f"approach 3 fit: {i}/3" for i in (0, 1, 2, 3, 3)]
    assert fit_lines[-1].startswith("approach 3 fit: 3/3 starts (100%), elapsed ") and "best_objective" in fit_lines[-1]
    boot = [x for x in lines if x.startswith("approach 3 bootstrap: ")]
    assert boot[0].startswith("approach 3 bootstrap: 0/20 resamples (0%)")
    assert any(x.startswith("approach 3 bootstrap: 5/20 resamples (25%), elapsed ") and ", ETA " in x
               and "resamples/s" in x for x in boot)
    assert boot[-1].startswith("approach 3 bootstrap: 20/20 resamples (100%)")

    caplog.clear()  # the library default is silent
    with caplog.at_level(logging.INFO):
        fits.bootstrap(runs, "2", [1e21], n_boot=20)
    assert not [x for x in _messages(caplog) if "resamples" in x or "fitting" in x]


def test_a_planned_run_reports_while_it_trains(monkeypatch, caplog):
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.3)
    child = ("import sys, time\n"
             "for i in range(6):\n"
             "    print(f'[07:00:0{i}][INFO] train: {i}/6 steps, ETA 1s', file=sys.stderr, flush=True)\n"
             "    time.sleep(0.25)\n"
             "sys.exit(3)\n")
    with caplog.at_level(logging.INFO):
        code, tail = _run_reporting([sys.executable, "-c", child], None)
    assert code == 3 and tail[-1] == "[07:00:05][INFO] train: 5/6 steps, ETA 1s"
    beats = [x for x in _messages(caplog) if x.startswith("plan run: elapsed ")]
    # the child's latest line, without its timestamp (a loaded machine may beat before its first line)
    assert any("; train: " in x and "/6 steps, ETA 1s" in x for x in beats)
    assert not any("[INFO]" in x for x in beats)
