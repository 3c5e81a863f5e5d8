"""Benchmarks state how far their numbers can be trusted (issue 24): each row's spread (p80/p20
across repeats), a warning (log and a "Measurement warnings" section of benchmark.md) when a
spread exceeds 1.5 or the 1-minute load average exceeds the CPU count, and a progress line as
each case starts (case i/N, elapsed, ETA)."""
from __future__ import annotations

import json
from pathlib import Path

from lmrun import cli
from lmrun.kernels import benchmark as kb

FAST = ["logger=none", "progress=false", "benchmark.warmup_ms=1", "benchmark.rep_ms=5", "benchmark.min_reps=3"]


def _row(impl, p20, p80, **kw):
    return {"impl": impl, "pass": "forward", "status": "ok", "median_ms": (p20 + p80) / 2, "p20_ms": p20,
            "p80_ms": p80, "reps": 10, "d_model": 32, **kw}


def test_spread_and_noise_notes():
    steady, noisy = _row("torch", 1.0, 1.2), _row("functional", 1.0, 2.5)
    assert kb.spread(steady) == 1.2 and kb.spread(noisy) == 2.5 and kb.spread({"p20_ms": None}) is None
    idle = [{"load_1min": 0.5, "cpus": 2}]
    assert kb.noise_notes([steady], idle) == []
    (note,) = kb.noise_notes([steady, noisy], idle)
    assert "`functional`" in note and "2.50 > 1.5" in note and "d_model=32" in note
    (note,) = kb.noise_notes([steady], idle + [{"load_1min": 3.5, "cpus": 2}])
    assert "load average reached 3.50 on 2 CPU(s)" in note
    assert kb.noise_notes([steady], [{"load_1min": None, "cpus": 2}]) == []  # no load average on this OS
    load = kb.cpu_load()
    assert load["cpus"] >= 1 and (load["load_1min"] is None or load["load_1min"] >= 0)


def test_benchmark_warns_about_spread_and_load(isolated_workspace, capsys, monkeypatch):
    real_time_fn = kb.time_fn

    def time_fn(fn, device, *args, **kwargs):  # `functional` made noisy: p80 three times p20
        t = real_time_fn(fn, device, *args, **kwargs)
        if time_fn.impl == "functional":
            return kb.Timing(t.median_ms, t.median_ms / 2, t.median_ms * 1.5, t.reps)
        return kb.Timing(t.median_ms, t.median_ms, t.median_ms, t.reps)

    real_measure = kb.measure

    def measure(case, *args, **kwargs):
        time_fn.impl = case.impl
        return real_measure(case, *args, **kwargs)

    monkeypatch.setattr(kb, "time_fn", time_fn)
    monkeypatch.setattr(kb, "measure", measure)
    monkeypatch.setattr(kb, "cpu_load", lambda: {"load_1min": 9.5, "cpus": 2})
    assert cli.main(["stage=benchmark", *FAST, "benchmark=rmsnorm", "benchmark.rows=16", "benchmark.d_models=[32]",
                     "benchmark.impls=[torch,functional,triton]", "benchmark.passes=[forward]",
                     "benchmark.plot=false"]) == 0
    out, err = capsys.readouterr()
    (run_dir,) = (Path.cwd() / "runs" / "benchmark").iterdir()
    md = (run_dir / "benchmark.md").read_text()
    assert "## Measurement warnings" in md and "load average reached 9.50 on 2 CPU(s)" in md
    assert "`functional` forward" in md and "3.00 > 1.5" in md and "`torch` forward d_model" not in md
    assert "| 1.00 | 3.00 (noisy) | skipped |" in md  # the spread table
    assert "load average is 9.50 on 2 CPU(s) before the benchmark" in err
    assert "noisy timing, spread p80/p20 = 3.00" in err
    # progress: a line as each case starts, with elapsed time and ETA over the cases that run
    assert "case 1/3: torch forward rows=16 d_model=32 dtype=fp32 (0/2 cases (0%), elapsed" in err
    assert "case 2/3: functional forward" in err and "ETA" in err
    assert "case 3/3: triton forward rows=16 d_model=32 dtype=fp32: skipped" in err
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["max_spread"] == 3.0 and summary["noisy_cases"] == 1
    assert summary["max_load_1min"] == 9.5 and summary["cpus"] == 2
    assert "spread" in (run_dir / "benchmark.csv").read_text().splitlines()[0]
