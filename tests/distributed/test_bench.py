"""benchmark=collectives and benchmark=ddp through the CLI on tiny grids (2 local processes)."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest

from lmrun import cli


def _rows(kind: str, *overrides: str) -> list[dict]:
    assert cli.main(["stage=benchmark", f"benchmark={kind}", "logger=none", "benchmark.plot=false",
                     "benchmark.min_reps=2", *overrides]) == 0
    run = next((Path.cwd() / "runs" / "benchmark").iterdir())
    return list(csv.DictReader(open(run / "benchmark.csv")))


@pytest.mark.slow
def test_collectives_table_has_every_op_and_size():
    rows = _rows("collectives", "benchmark.sizes_mb=[0.01,0.1]")
    assert {(r["impl"], r["size_mb"]) for r in rows} == {(o, s) for o in ("all_reduce", "all_gather", "reduce_scatter")
                                                          for s in ("0.01", "0.1")}
    assert all(float(r["median_ms"]) > 0 and float(r["bus_gbps"]) > 0 for r in rows)
    base = next(r for r in rows if r["impl"] == "all_reduce" and r["size_mb"] == "0.1")
    assert float(base["speedup"]) == 1.0


@pytest.mark.slow
def test_ddp_benchmark_reports_comm_share_and_sharded_memory():
    rows = _rows("ddp", "benchmark.sizes=[tiny]", "benchmark.batch_size=4", "benchmark.context_length=32",
                 "benchmark.impls=[local,ddp_bucketed,zero1,fsdp,torch_ddp]")
    by = {r["impl"]: r for r in rows}
    assert by["local"]["comm_share"] == "" and 0 <= float(by["ddp_bucketed"]["comm_share"]) < 1
    full = float(by["ddp_bucketed"]["optimizer_state_mb"])
    assert abs(float(by["zero1"]["optimizer_state_mb"]) - full / 2) < 0.1 * full / 2
    assert float(by["fsdp"]["params_mb"]) < 0.51 * float(by["ddp_bucketed"]["params_mb"])
