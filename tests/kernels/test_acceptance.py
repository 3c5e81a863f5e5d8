"""The GPU acceptance script (lmrun.kernels.acceptance) on the CPU: every part runs at tiny sizes
with the Triton kernels interpreted, the correctness rows pass, gpu_acceptance.json/.md have
their structure and are written as the run goes, a failing part is a row and not the end of the
run, it imports nothing of Hydra/OmegaConf/wandb/submitit, and `lmrun stage=benchmark
benchmark=gpu_acceptance` runs it. Timings are skipped on a CPU (no speed targets here)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmrun import cli

REPO = Path(__file__).resolve().parents[2]
FORBIDDEN = ("hydra", "omegaconf", "wandb", "submitit")


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    env.update(TRITON_INTERPRET="1", PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="")
    return env


def test_imports_nothing_of_the_cli_stack():
    code = ("import sys, lmrun.kernels.acceptance, lmrun.model, lmrun.optim, lmrun.train.loss, "
            "lmrun.inference.engine, lmrun.kernels.flash_attention_triton, lmrun.kernels.rmsnorm_triton, "
            "lmrun.tracking.files; "
            f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({FORBIDDEN!r})))")
    out = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_cpu_run_of_every_part(tmp_path):
    """The whole script as a user runs it (python -m, a fresh process, interpreter on); about 30 s,
    kept in the default run so that the GPU check cannot rot."""
    out = subprocess.run([sys.executable, "-m", "lmrun.kernels.acceptance", "--out", str(tmp_path), "--device", "cpu",
                          "--train-seconds", "1"], env=_env(), cwd=tmp_path, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_acceptance.json").read_text())
    assert report["finished"] and report["mode"] == "cpu" and report["triton_interpret"] == "1"
    rows = report["rows"]
    assert {r["part"] for r in rows} == {"env", "flash", "rmsnorm", "train", "inference", "targets"}
    assert all(r["status"] in ("ok", "skipped") for r in rows), [r for r in rows if r["status"] not in ("ok", "skipped")]
    correctness = [r for r in rows if r.get("correctness")]
    # flash_triton: fp32 and bf16 × d 64, 128 × causal or not; RMSNorm Triton: bf16 and fp32
    # + the leaderboard case against SDPA
    triton_rows = [r for r in correctness if r["impl"] == "flash_triton"]
    assert len(triton_rows) == 9 and triton_rows[-1]["name"] == "leaderboard flash_triton == SDPA flash"
    assert {(r["head_dim"], r["causal"], r["dtype"]) for r in triton_rows[:-1]} == {
        (d, c, t) for d in (64, 128) for c in (False, True) for t in ("float32", "bfloat16")}
    assert len([r for r in correctness if r["impl"] == "triton"]) == 2
    assert all(r["status"] == "ok" and r["rel_err"] <= r.get("tol", 1) for r in correctness)
    names = [r["name"] for r in rows]
    for expected in ("leaderboard flash_triton", "leaderboard sdpa_flash", "leaderboard flash_torch"):
        assert expected in names
    assert any(n.startswith("tiny") and "flash_triton eager" in n for n in names)  # the model on the Triton kernel
    assert any("decode b=1" in n and "KV-cached" in n for n in names)
    loss = next(r for r in rows if r["name"].startswith("loss run"))
    assert loss["last_loss"] < loss["first_loss"] - 1.0
    targets = {t["target"]: t for t in report["targets"]}
    assert targets["FA2 Triton correct in every case (1 = yes)"]["met"] is True
    assert targets["training loss falls (first - last, nats)"]["met"] is True
    assert not any("ms" in t["unit"] for t in report["targets"])  # no speed targets on a CPU
    md = (tmp_path / "gpu_acceptance.md").read_text()
    assert md.startswith("# GPU acceptance — CPU") and "| part | check | status | result |" in md
    assert "## Targets" in md and "(unfinished)" not in md
    assert "wrote" in out.stdout


def test_a_failing_part_is_a_row_and_the_json_grows_as_it_goes(tmp_path, monkeypatch, interpret):
    from lmrun.kernels import acceptance

    seen = {}

    def broken_flash(self):
        seen["json"] = json.loads((tmp_path / "gpu_acceptance.json").read_text())  # written before this part
        raise RuntimeError("kernel exploded\nsecond line")

    monkeypatch.setattr(acceptance.Acceptance, "part_flash", broken_flash)
    report = acceptance.run_acceptance(tmp_path, budget_s=300, device="cpu", parts=["env", "flash", "rmsnorm"])
    assert not seen["json"]["finished"] and {r["part"] for r in seen["json"]["rows"]} == {"env"}
    flash = [r for r in report["rows"] if r["part"] == "flash"]
    assert flash == [{"part": "flash", "name": "flash", "status": "error",
                      "value": "error: RuntimeError: kernel exploded"}]
    assert [r["status"] for r in report["rows"] if r["part"] == "rmsnorm"] == ["ok"] * 6  # the next part ran
    failed = report["rows"][-1]
    assert failed["name"] == "rows failed or errored" and failed["status"] == "fail" and failed["value"] == "1"
    on_disk = json.loads((tmp_path / "gpu_acceptance.json").read_text())
    assert on_disk["finished"] and on_disk["rows"] == report["rows"]
    assert "| flash | flash | error | error: RuntimeError: kernel exploded |" in (tmp_path / "gpu_acceptance.md").read_text()


def test_budget_spent_skips_the_remaining_parts(tmp_path, interpret):
    from lmrun.kernels.acceptance import run_acceptance

    report = run_acceptance(tmp_path, budget_s=1, device="cpu", parts=["env", "rmsnorm"])
    assert [(r["part"], r["status"]) for r in report["rows"][:2]] == [("env", "skipped"), ("rmsnorm", "skipped")]
    assert "time budget spent" in report["rows"][0]["value"]


def test_unknown_part_is_an_error(tmp_path):
    from lmrun.kernels.acceptance import run_acceptance

    with pytest.raises(ValueError, match="part 'gpu'"):
        run_acceptance(tmp_path, device="cpu", parts=["gpu"])


def test_the_benchmark_stage_runs_it(isolated_workspace, capsys, interpret):
    assert cli.main(["stage=benchmark", "benchmark=gpu_acceptance", "logger=none", "progress=false",
                     "benchmark.parts=[env,rmsnorm]"]) == 0
    (run_dir,) = (Path.cwd() / "runs" / "benchmark").iterdir()
    report = json.loads((run_dir / "gpu_acceptance.json").read_text())
    assert report["finished"] and {r["part"] for r in report["rows"]} == {"env", "rmsnorm", "targets"}
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["kind"] == "gpu_acceptance" and summary["failed"] == 0 and summary["rows"] == len(report["rows"])
    assert "# GPU acceptance" in capsys.readouterr().out


def test_bad_parts_are_a_one_line_error(isolated_workspace, capsys):
    assert cli.main(["stage=benchmark", "benchmark=gpu_acceptance", "logger=none", "benchmark.parts=[gpu]"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "benchmark.parts=['gpu']: expected a non-empty list of env, flash" in err[0], err


def test_hard_limit_stops_the_process_and_keeps_the_rows(tmp_path):
    out = subprocess.run([sys.executable, "-m", "lmrun.kernels.acceptance", "--out", str(tmp_path), "--device", "cpu",
                          "--parts", "env,train", "--train-seconds", "600", "--hard-limit-s", "20"], env=_env(),
                         cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 124, out.stdout[-2000:] + out.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_acceptance.json").read_text())
    assert not report["finished"] and report["rows"][0]["part"] == "env"  # the loss run (600 s) was cut short
    assert not any(r["name"].startswith("loss run") for r in report["rows"])
    assert "Stopped by the hard limit of 20 s." in (tmp_path / "gpu_acceptance.md").read_text()


@pytest.mark.gpu
@pytest.mark.slow
def test_on_a_gpu_kernels_are_correct_and_timed(tmp_path):
    """On a CUDA machine (skipped elsewhere): the environment and kernel parts at full size, in a
    fresh process without the interpreter; every correctness row passes and the targets have numbers
    (whether they are met is the report's business, not a unit test's)."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    env = {k: v for k, v in _env().items() if k not in ("TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES")}
    out = subprocess.run([sys.executable, "-m", "lmrun.kernels.acceptance", "--out", str(tmp_path),
                          "--parts", "env,flash,rmsnorm", "--budget-s", "240"], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=400)
    report = json.loads((tmp_path / "gpu_acceptance.json").read_text())
    assert report["mode"] == "gpu" and report["finished"], out.stderr[-3000:]
    assert [r for r in report["rows"] if r.get("correctness") and r["status"] != "ok"] == []
    assert all(t["value"] is not None for t in report["targets"]), report["targets"]
