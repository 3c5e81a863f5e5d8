"""stage=curate with several shard processes under the default ``logger=wandb`` (issue 24): the
workers do not inherit the parent's wandb run (a forked worker did, and wandb raised ForkedError),
and the stage reports its progress (files, documents, shards, elapsed, ETA)."""
from __future__ import annotations

import json
import shutil

from tests.conftest import FIXTURES

from lmrun.cli import main
from lmrun.curation import pipeline

WARC = FIXTURES / "cur_iana_sample.warc.gz"


def test_curate_shard_processes_with_wandb_logger(tmp_path, capsys, monkeypatch):
    inputs = []
    for name in ("a", "b"):  # two files: two shards with work, so a pool of two processes
        shutil.copy(WARC, tmp_path / f"{name}.warc.gz")
        inputs.append(str(tmp_path / f"{name}.warc.gz"))

    def warm_up(self):  # runs in every shard worker that inherits this process's state (fork)
        import wandb

        assert wandb.run is None, "a shard worker inherited the parent's wandb run"
        return 0.0

    monkeypatch.setattr(pipeline.DocPipeline, "_warm_up", warm_up)
    out = tmp_path / "cur"
    # the default logger (wandb; WANDB_MODE=offline in tests), not logger=none
    assert main(["stage=curate", f"curate.inputs=[{','.join(inputs)}]", "curate.num_shards=3",
                 "curate.num_workers=2", f"curate.output_dir={out}", "progress=false"]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and "ForkedError" not in err
    report = json.loads((out / "report.json").read_text())
    assert report["read"]["docs"] == 8 and report["shards"] == 3
    manifests = [json.loads(p.read_text()) for p in sorted(out.glob("shards/*/shard.json"))]
    assert len({m["pid"] for m in manifests if m["read"]["docs"]}) >= 1
    assert "running 3 shard(s) with 2 process(es)" in err
    # progress: a first line at once, a last one with every file, document and shard counted
    assert "curate: filter: 0/2 files" in err
    assert "curate: filter: 2/2 files (100%)" in err and "docs 8, kept 8, shards 3/3" in err and "ETA" in err
    assert "dedup: writing clean shards: 8/8 documents (100%)" in err
    run_dir = next((tmp_path / "work" / "runs" / "curate").iterdir())
    assert (run_dir / "wandb").is_dir()  # the run was logged to wandb


def test_run_shards_reports_progress_in_process(tmp_path):
    """One process: the reports reach the callback directly, and add up to the manifest."""
    from omegaconf import OmegaConf

    from lmrun.cli import compose
    from lmrun.stages.curate import _curate_dict

    cfg = compose(["stage=curate", f"curate.inputs=[{WARC}]", "logger=none"])
    cc = _curate_dict(cfg)
    cc["quality"]["resolved_model_path"] = None
    reports, done = [], []
    args = [(cc, [(str(WARC), "warc")], str(tmp_path / "00000"), 0), (cc, [], str(tmp_path / "00001"), 1)]
    manifests = pipeline.run_shards(args, 1, on_report=reports.append, on_done=done.append)
    assert [m["shard"] for m in manifests] == [0, 1] and done == manifests
    assert sum(r[1] for r in reports if r[0] == 0) == manifests[0]["read"]["docs"] == 4
    assert sum(r[3] for r in reports) == 1  # one file finished
    assert OmegaConf.is_config(cfg)
