"""The CLI: composition of every preset, one-line errors that write nothing, dry runs,
run directories with provenance, multirun."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from lmrun import cli
from lmrun.configs import check_schema, validate
from lmrun.errors import ConfigError

FAST = ["logger=none", "progress=false", "tokenizer.vocab_size=300"]


def presets() -> list[tuple[str, str]]:
    """(group, option) for every YAML under conf/ except the root config and Hydra's own,
    including nested groups such as model/norm."""
    out = []
    for folder, _, names in os.walk(cli.CONF_DIR, followlinks=True):  # conf/experiment links to experiments/
        group = Path(folder).relative_to(cli.CONF_DIR).as_posix()
        if group != "." and not group.startswith("hydra"):
            out.extend((group, Path(n).stem) for n in names if n.endswith(".yaml"))
    return sorted(out)


EXTRA = {("data", "text_files"): ["data.train=/dev/null"], ("data", "jsonl"): ["data.train=a.jsonl"],
         ("data", "parquet"): ["data.train=a.parquet"],
         ("data", "mixture"): ["+data.mixture.web={train: a.jsonl, weight: 0.7}", "+data.mixture.code=b.jsonl"],
         ("stage", "evaluate"): ["evaluate.checkpoint=ckpt.pt"],
         ("stage", "generate"): ["generate.checkpoint=ckpt.pt", "generate.prompt=x"],
         ("stage", "scaling"): ["scaling.input=runs.json"], ("stage", "collect"): ["sweep.dir=multiruns/x"],
         ("stage", "curate"): ["curate.inputs=[/dev/null]"], ("stage", "export"): ["export.checkpoint=ckpt.pt"],
         **{("stage", s): ["align.model=ckpt.pt", "align.task.name=arithmetic"]
            for s in ("sft", "dpo", "grpo", "expert_iteration")},
         ("experiment", "tinystories_a1"): ["data.train=/dev/null"], ("experiment", "owt_leaderboard"): ["data.train=/dev/null"],
         ("model/attention", "hyena"): ["model/position=none"]}  # Hyena has no queries/keys for the default RoPE


GLOBAL_GROUPS = ("experiment", "debug", "hparams_search")


def files_under(path: Path) -> list[Path]:
    return [p for p in path.rglob("*")] if path.exists() else []


@pytest.mark.parametrize("group,preset", presets())
def test_every_preset_composes_and_validates(group, preset):
    overrides = [f"{group}={preset}"] + EXTRA.get((group, preset), [])
    if group != "stage":
        overrides.append("stage=tokenizer")
    cfg = cli.compose(overrides)
    check_schema(cfg)
    validate(cfg)
    if group in GLOBAL_GROUPS:  # presets packaged _global_: they set keys of other groups
        assert cfg.stage.name in cli.stage_names()
    else:
        assert OmegaConf.select(cfg, group.replace("/", ".")) is not None


def test_presets_found():
    groups = {g for g, _ in presets()}
    assert {"stage", "data", "tokenizer", "logger", "experiment", "debug", "hparams_search"} <= groups


@pytest.mark.parametrize("stage", [s for s in cli.stage_names() if s not in ("evaluate", "collect", "curate", "export", "generate", "scaling", "sft", "dpo",
                                                                  "grpo", "expert_iteration")])  # tested with their inputs
def test_dry_run_every_stage_writes_nothing(stage, isolated_workspace, cache_dir, capsys):
    assert cli.main([f"stage={stage}", "dry_run=true"]) == 0
    out = capsys.readouterr().out
    assert "dry run" in out and "inputs" in out and "outputs" in out
    assert files_under(isolated_workspace) == []
    assert files_under(cache_dir) == []


@pytest.mark.parametrize(
    "overrides,expected",
    [
        (["stage=tokenizer", "tokenizer.vocab_sizee=300"], r"tokenizer\.vocab_sizee: unknown key; allowed keys here: .*vocab_size"),
        (["stage=tokenizer", "+tokenizer.foo=1"], r"tokenizer\.foo: unknown key"),
        (["stage=tokenizer", "tokenizer.vocab_size=abc"], r"tokenizer\.vocab_size='abc': .*expected int"),
        (["stage=tokenizer", "tokenizer.vocab_size=100"], r"tokenizer\.vocab_size=100: expected an integer >= 257"),
        (["stage=tokenizer", "data=nope"], r"data=nope: no such option; available: jsonl, mixture, parquet, text_files, tinyshakespeare"),
        (["stage=nope"], r"stage=nope: no such option; available: benchmark, collect, curate, dpo, encode, evaluate, expert_iteration, export, generate, grpo, pretrain, scaling, sft, tokenizer"),
        (["stage=evaluate"], r"evaluate\.checkpoint=None: expected a checkpoint file or a pretrain run directory"),
        ([], r"stage"),
        (["stage=tokenizer", "data=text_files"], r"data\.train=None: expected a file, directory, glob or list of text files \(required with data=text_files\)"),
        (["stage=tokenizer", "data=text_files", "data.train=/no/such/file.txt"], r"data\.train: file not found: /no/such/file\.txt"),
        (["stage=tokenizer", "tokenizer.train_backend=rust"], r"tokenizer\.train_backend='rust': expected one of auto, c, python"),
        (["stage=tokenizer", "logger=nope"], r"logger=nope: no such option"),
        (["stage=tokenizer", "data.val_fraction=1.5"], r"data\.val_fraction=1\.5: expected a number in \(0, 1\)"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(overrides, expected, isolated_workspace, cache_dir, capsys):
    assert cli.main(overrides) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("lmrun: error: ")
    assert re.search(expected, err), err
    assert files_under(isolated_workspace) == []
    assert files_under(cache_dir) == []


def test_empty_and_non_utf8_files(tmp_path, isolated_workspace, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"hello world\n" * 100 + b"caf\xe9\n")
    assert cli.main(["stage=tokenizer", "data=text_files", f"data.train={empty}"]) == 2
    assert f"data.train: file is empty: {empty}" in capsys.readouterr().err
    assert cli.main(["stage=tokenizer", "data=text_files", f"data.train={bad}"]) == 2
    err = capsys.readouterr().err
    assert f"data.train: not valid UTF-8 at byte 1203: {bad}" in err
    assert files_under(isolated_workspace) == []


@pytest.mark.slow
def test_single_run_directory_and_provenance(small_text, isolated_workspace):
    assert cli.main(["stage=tokenizer", "data=text_files", f"data.train={small_text}", "seed=7", *FAST]) == 0
    (run_dir,) = (isolated_workspace / "runs" / "tokenizer").iterdir()
    info = json.loads((run_dir / "run.json").read_text())
    assert re.fullmatch(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d-[0-9a-f]{8}", run_dir.name)
    assert run_dir.name.endswith(info["config_hash"])
    assert info["status"] == "completed" and info["stage"] == "tokenizer" and info["seed"] == 7
    assert "seed=7" in info["overrides"] and info["argv"]
    assert {"lmrun", "hydra-core", "omegaconf", "numpy", "regex"} <= set(info["packages"])
    assert info["host"] and info["python"] and info["started"] and info["finished"]
    assert isinstance(info["slurm"], dict)
    if (cli.CONF_DIR.parent / ".git").exists():
        assert re.fullmatch(r"[0-9a-f]{40}", info["git"]["commit"]) and isinstance(info["git"]["dirty"], bool)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["vocab_size"] == 300
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert metrics and metrics[-1]["vocab_size"] == 300
    assert (run_dir / ".hydra" / "config.yaml").is_file() and (run_dir / "tokenizer.log").is_file()
    # the same config again: a new directory, never the old one
    assert cli.main(["stage=tokenizer", "data=text_files", f"data.train={small_text}", "seed=7", *FAST]) == 0
    assert len(list((isolated_workspace / "runs" / "tokenizer").iterdir())) == 2


@pytest.mark.slow
def test_multirun_sweep(small_text, isolated_workspace):
    assert cli.main(["-m", "stage=tokenizer", "data=text_files", f"data.train={small_text}",
                     "logger=none", "progress=false", "tokenizer.vocab_size=300,320"]) == 0
    (sweep,) = (isolated_workspace / "multiruns" / "tokenizer").iterdir()
    sizes = sorted(json.loads((sweep / str(i) / "summary.json").read_text())["vocab_size"] for i in (0, 1))
    assert sizes == [300, 320]


@pytest.mark.slow
def test_multirun_validates_every_job_first(small_text, isolated_workspace, capsys):
    rc = cli.main(["-m", "stage=tokenizer", "data=text_files", f"data.train={small_text}", "logger=none",
                   "tokenizer.vocab_size=300,100"])
    assert rc == 2 and "tokenizer.vocab_size=100" in capsys.readouterr().err
    assert files_under(isolated_workspace) == []


def test_cfg_job_prints_config(capsys):
    assert cli.main(["stage=tokenizer", "--cfg", "job"]) == 0
    out = capsys.readouterr().out
    assert "vocab_size: 1024" in out and "name: tokenizer" in out


@pytest.mark.slow
def test_help_lists_stages_and_groups(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "== Stages ==" in out and "  pretrain   train a Transformer LM" in out
    assert "stage: benchmark, collect, curate, dpo, encode, evaluate, expert_iteration, export, generate, grpo, pretrain, scaling, sft, tokenizer" in out and "data: jsonl, mixture, parquet, text_files, tinyshakespeare" in out and "logger: none, wandb" in out


def test_load_stage_rejects_unregistered():
    with pytest.raises(ConfigError):
        cli.load_stage("pretrain_not_built")


@pytest.mark.slow
def test_experiment_preset_sweep_is_expanded_and_checked(capsys, isolated_workspace):
    assert cli.main(["-m", "experiment=tokenizer_vocab_sweep", "dry_run=true"]) == 0
    out = capsys.readouterr().out
    sizes = re.findall(r"tokenizer\.vocab_size=(\d+)", out)
    assert sizes == ["512", "1024", "2048", "4096", "8192", "16384"]
    # the command line wins over the preset's sweep for the same key
    assert cli.main(["-m", "experiment=tokenizer_vocab_sweep", "tokenizer.vocab_size=300,100", "dry_run=true"]) == 2
    assert "tokenizer.vocab_size=100: expected an integer >= 257" in capsys.readouterr().err
    assert files_under(isolated_workspace) == []


# --- your own configs: --config-dir and hydra.searchpath -------------------------------------------
@pytest.fixture
def my_conf(tmp_path) -> Path:
    """A user's config directory: a model preset extending lmrun's and two experiment presets."""
    conf = tmp_path / "my_conf"
    (conf / "model").mkdir(parents=True)
    (conf / "experiment").mkdir()
    (conf / "model" / "my_model.yaml").write_text(
        "defaults:\n  - swiglu_rope\n  - _self_\nname: my_model\ncontext_length: 64\nn_kv_heads: 2\n")
    (conf / "experiment" / "my_tokenizer.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /stage: tokenizer\ntokenizer:\n  vocab_size: 333\n")
    (conf / "experiment" / "my_sweep.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /stage: tokenizer\n"
        "hydra:\n  sweeper:\n    params:\n      tokenizer.vocab_size: 300,320\n")
    return conf


@pytest.mark.slow
@pytest.mark.parametrize("how", ["config_dir", "searchpath"])
def test_your_own_presets_from_a_config_dir_or_search_path(how, my_conf, isolated_workspace, capsys):
    extra = ["--config-dir", str(my_conf)] if how == "config_dir" else [f"hydra.searchpath=[file://{my_conf}]"]
    assert cli.main([*extra, "stage=pretrain", "model=my_model", "dry_run=true"]) == 0
    out = capsys.readouterr().out
    assert "my_model/cpu: d_model 128, 3 layers, 4 heads" in out and "context 64" in out
    assert cli.main(["--cfg", "job", *extra, "stage=pretrain", "model=my_model"]) == 0
    assert "n_kv_heads: 2" in capsys.readouterr().out
    # an experiment preset with its own sweep, expanded and checked by the pre-flight
    assert cli.main(["-m", *extra, "experiment=my_sweep", "dry_run=true"]) == 0
    out = capsys.readouterr().out
    assert "2 job(s) in" in out and "/multiruns/tokenizer/my_sweep-" in out
    assert re.findall(r"tokenizer\.vocab_size=(\d+)", out) == ["300", "320"]
    # lmrun's own options still listed with the user's in an error
    assert cli.main([*extra, "stage=pretrain", "model=my_modle", "dry_run=true"]) == 2
    assert "model=my_modle: no such option; available: gpt2," in capsys.readouterr().err
    assert files_under(isolated_workspace) == []
    with pytest.raises(ConfigError, match="model=my_model: no such option"):  # main() leaves no state behind
        cli.compose(["stage=pretrain", "model=my_model"])


@pytest.mark.slow
def test_a_run_with_a_config_dir_uses_the_users_preset(my_conf, small_text, isolated_workspace):
    assert cli.main(["--config-dir", str(my_conf), "experiment=my_tokenizer", "data=text_files",
                     f"data.train={small_text}", *FAST[:2]]) == 0
    (run_dir,) = (isolated_workspace / "runs" / "tokenizer").iterdir()
    assert json.loads((run_dir / "summary.json").read_text())["vocab_size"] == 333


def test_config_dir_mistakes_are_one_line(isolated_workspace, capsys):
    assert cli.main(["--config-dir", "no/such/dir", "stage=tokenizer"]) == 2
    assert capsys.readouterr().err.strip() == "lmrun: error: --config-dir no/such/dir: no such directory"
    assert cli.main(["--config-path", "elsewhere", "stage=tokenizer"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("lmrun: error: --config-path:") and "--config-dir" in err


# --- debug presets ----------------------------------------------------------------------------------
def test_debug_presets_shrink_the_budget(isolated_workspace, capsys):
    fast = cli.compose(["stage=pretrain", "debug=fast"])
    assert fast.train.max_steps <= 5 and fast.train.eval_every < fast.train.max_steps
    assert 0 < fast.train.checkpoint_every < fast.train.max_steps and fast.train.samples >= 1
    assert fast.logger.name == "none" and fast.model.name == "swiglu_rope"  # the model stays as configured
    overfit = cli.compose(["stage=pretrain", "debug=overfit"])
    assert overfit.train.overfit_batches == 1 and overfit.model.dropout == 0.0
    profile = cli.compose(["stage=pretrain", "debug=profile"])
    assert profile.train.profile is True and profile.train.max_steps <= 20
    assert cli.compose(["stage=pretrain", "debug=fast", "train.max_steps=2"]).train.max_steps == 2  # the command line wins
    assert cli.main(["stage=pretrain", "debug=fast", "dry_run=true"]) == 0
    assert "dry run" in capsys.readouterr().out and files_under(isolated_workspace) == []


@pytest.mark.slow
def test_debug_fast_runs_every_phase(small_text, isolated_workspace):
    assert cli.main(["stage=pretrain", "debug=fast", "data=text_files", f"data.train={small_text}",
                     "tokenizer.vocab_size=300", "model/size=tiny", "model.context_length=32", "progress=false"]) == 0
    (run_dir,) = (isolated_workspace / "runs" / "pretrain").iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["val_bpb"] > 0
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["ckpt_00000002.pt", "ckpt_00000004.pt"]
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "val_loss" in m][:1] == [2]  # the periodic evaluation ran
    assert (run_dir / "samples.txt").read_text().strip()
