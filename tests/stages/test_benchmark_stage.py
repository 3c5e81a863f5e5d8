"""`lmrun stage=benchmark` on CPU: the attention, rmsnorm and model grids write their tables
(CSV, Markdown) and plot, speed-ups are against the baseline of the same run, Triton
implementations are skipped with a note, failures and out-of-memory are rows, not crashes; bad
settings are one-line errors."""
from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import pytest
import torch

from lmrun import cli
from lmrun.kernels.benchmark import Case, add_speedups, measure, time_fn

FAST = ["logger=none", "progress=false", "benchmark.warmup_ms=1", "benchmark.rep_ms=5", "benchmark.min_reps=3"]


def run_benchmark(*overrides: str) -> Path:
    assert cli.main(["stage=benchmark", *FAST, *overrides]) == 0
    (run_dir,) = (Path.cwd() / "runs" / "benchmark").iterdir()
    return run_dir


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_attention_benchmark_writes_tables_and_plot(isolated_workspace, capsys):
    run_dir = run_benchmark("benchmark=attention", "benchmark.seq_lens=[32,48]", "benchmark.head_dims=[16]",
                            "benchmark.impls=[naive,sdpa,flash_torch,flash_triton]", "benchmark.num_heads=2",
                            "benchmark.threads=1")
    rows = read_csv(run_dir / "benchmark.csv")
    # 2 lengths x 3 passes x 4 impls
    assert len(rows) == 24
    assert {(r["seq_len"], r["pass"]) for r in rows} == {(n, p) for n in ("32", "48")
                                                          for p in ("forward", "backward", "forward_backward")}
    for r in rows:
        if r["impl"] == "flash_triton":
            assert r["status"] == "skipped" and "CUDA only" in r["note"] and r["median_ms"] == ""
            continue
        assert r["status"] == "ok", r
        assert float(r["p20_ms"]) <= float(r["median_ms"]) <= float(r["p80_ms"]) and int(r["reps"]) >= 3
        base = next(b for b in rows if b["impl"] == "naive" and b["seq_len"] == r["seq_len"] and b["pass"] == r["pass"])
        assert float(r["speedup"]) == pytest.approx(float(base["median_ms"]) / float(r["median_ms"]), rel=1e-3)
    md = (run_dir / "benchmark.md").read_text()
    assert "| seq_len | head_dim | dtype | pass | naive | sdpa | flash_torch | flash_triton |" in md
    assert "(1.00×)" in md and "CUDA only" in md
    assert md.strip() in capsys.readouterr().out
    assert (run_dir / "benchmark.png").read_bytes()[:4] == b"\x89PNG"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["cases"], summary["ok"], summary["skipped"], summary["errors"]) == (24, 18, 6, 0)
    assert summary["geomean_speedup"]["naive"] == 1.0


@pytest.mark.slow
def test_rmsnorm_benchmark(isolated_workspace):
    run_dir = run_benchmark("benchmark=rmsnorm", "benchmark.rows=64", "benchmark.d_models=[32,96]",
                            "benchmark.impls=[torch,functional,triton]", "benchmark.passes=[forward_backward]",
                            "benchmark.plot=false")
    rows = read_csv(run_dir / "benchmark.csv")
    assert [(r["d_model"], r["impl"], r["status"]) for r in rows] == [
        ("32", "torch", "ok"), ("32", "functional", "ok"), ("32", "triton", "skipped"),
        ("96", "torch", "ok"), ("96", "functional", "ok"), ("96", "triton", "skipped")]
    assert not (run_dir / "benchmark.png").exists()


@pytest.mark.slow
def test_model_benchmark_reports_tokens_per_second_and_mfu(isolated_workspace):
    run_dir = run_benchmark("benchmark=model", "benchmark.sizes=[tiny]", "benchmark.compile=[false]",
                            "benchmark.dtypes=[fp32,bf16]", "benchmark.batch_size=2", "benchmark.context_length=32",
                            "benchmark.peak_flops=1e12", "tokenizer.vocab_size=300", "benchmark.profile=true")
    rows = read_csv(run_dir / "benchmark.csv")
    assert [(r["impl"], r["pass"]) for r in rows] == [(v, p) for v in ("fp32", "bf16")
                                                      for p in ("forward", "forward_backward", "step")]
    for r in rows:
        assert r["status"] == "ok", r
        tps = float(r["tokens_per_s"])
        assert tps == pytest.approx(64 / (float(r["median_ms"]) / 1000), rel=1e-3)
        assert float(r["mfu"]) == pytest.approx(float(r["flops_per_token"]) * tps / 1e12, rel=1e-3)
    fwd, step = rows[0], rows[2]
    assert int(step["flops_per_token"]) == 3 * int(fwd["flops_per_token"])
    md = (run_dir / "benchmark.md").read_text()
    assert "Tokens per second." in md and "MFU" in md
    assert sorted(p.name for p in (run_dir / "profile").iterdir()) == ["bf16_forward.trace.json",
                                                                      "fp32_forward.trace.json"]


def test_failures_and_oom_are_rows_not_crashes():
    def oom():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80 GiB")

    def broken():
        raise RuntimeError("no kernel for this dtype\nmore detail")

    cpu = torch.device("cpu")
    rows = [measure(Case({"n": 1}, "a", "forward", fn=lambda: torch.ones(4).sum()), cpu, 0, 1, 2),
            measure(Case({"n": 1}, "b", "forward", fn=oom), cpu, 0, 1, 2),
            measure(Case({"n": 1}, "c", "forward", fn=broken), cpu, 0, 1, 2)]
    assert [r["status"] for r in rows] == ["ok", "oom", "error"]
    assert rows[2]["note"] == "RuntimeError: no kernel for this dtype"
    add_speedups(rows, "a", ["n"])
    assert rows[0]["speedup"] == 1.0 and rows[1]["speedup"] is None


def test_cpu_timer_measures_what_it_runs():
    t = time_fn(lambda: time.sleep(0.002), torch.device("cpu"), warmup_ms=0, rep_ms=10, min_reps=4)
    assert t.reps >= 4 and 2.0 <= t.p20_ms <= t.median_ms <= t.p80_ms


@pytest.mark.parametrize("overrides, message", [
    (["benchmark.impls=[naive,flash]"], "benchmark.impls=['naive', 'flash']: expected a non-empty list of naive,"),
    (["benchmark.baseline=sdpa_math"], "benchmark.baseline='sdpa_math': expected one of benchmark.impls"),
    (["benchmark=model", "benchmark.passes=[backward]"], "benchmark.passes=['backward']: expected a non-empty list of "
                                                         "forward, forward_backward, step"),
    (["benchmark=model", "benchmark.sizes=[huge]"], "benchmark.sizes: 'huge' is not a model size preset"),
    (["benchmark=model", "benchmark.baseline=bf16+compile", "benchmark.compile=[false]"],
     "benchmark.baseline='bf16+compile': expected one of the variants fp32, bf16"),
    (["benchmark.seq_lens=[]"], "benchmark.seq_lens=[]: expected a non-empty list of integers >= 1"),
    (["benchmark.threads=0"], "benchmark.threads=0: expected null or an integer >= 1"),
])
def test_bad_settings_are_one_line_errors(isolated_workspace, capsys, overrides, message):
    assert cli.main(["stage=benchmark", "logger=none", *overrides]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"lmrun: error: {message}"), err
    assert not (Path.cwd() / "runs").exists()


def test_inference_benchmark_writes_tables_and_plot(isolated_workspace, capsys):
    run_dir = run_benchmark("benchmark=inference", "benchmark.batch_sizes=[1,2]", "benchmark.new_tokens=6",
                            "benchmark.speculative_ks=[2]", "benchmark.min_reps=1", "benchmark.threads=1")
    rows = read_csv(run_dir / "benchmark.csv")
    decode = {(r["impl"], r["batch"]) for r in rows if r["pass"] == "decode"}
    # uncached / cached / int8 at both batch sizes, speculative at batch 1 only
    assert decode == {(i, b) for i in ("uncached", "cached", "cached_int8") for b in ("1", "2")} | {("spec_k2", "1")}
    assert all(float(r["speedup"]) == 1.0 for r in rows if r["impl"] == "uncached")
    assert (run_dir / "benchmark.png").stat().st_size > 0 and "spec_k2" in capsys.readouterr().out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["decode_speedup_cached"] > 0 and 0 <= summary["mean_acceptance"] <= 1
