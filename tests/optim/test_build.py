"""build_optimizer / build_schedule from configs: parameter groups by name rules (no-decay
params have weight_decay 0; Muon gets only hidden matrices; a tied matrix is in one group),
the lr_scale convention and set_lr, every preset in conf/optimizer and conf/schedule building
and running 3 steps on a tiny TransformerLM, and one-line ConfigErrors."""
from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from lmrun import cli
from lmrun.errors import ConfigError
from lmrun.optim import (
    SGD,
    SOAP,
    AdamW,
    Muon,
    OptimizerConfig,
    ScheduleConfig,
    build_optimizer,
    build_schedule,
    clip_grad_norm,
    param_groups,
    set_lr,
    validate_optimizer,
    validate_schedule,
)

from .helpers import lm_batch, lm_loss, tiny_lm, train

OPTIMIZER_PRESETS = sorted(p.stem for p in (cli.CONF_DIR / "optimizer").glob("*.yaml"))
SCHEDULE_PRESETS = sorted(p.stem for p in (cli.CONF_DIR / "schedule").glob("*.yaml"))
GPT2_LIKE = {"norm": "layernorm", "ffn": "gelu", "position": "learned", "bias": True, "tie_embeddings": True}


def preset(group: str, name: str, schema):
    return OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.load(cli.CONF_DIR / group / f"{name}.yaml"))


def group_names(opt) -> dict[str, list[str]]:
    return {g["name"]: g["param_names"] for g in opt.param_groups}


def all_names(opt) -> list[str]:
    return [n for g in opt.param_groups for n in g["param_names"]]


def assert_partition(model, opt):
    """Every trainable parameter in exactly one group."""
    seen = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(seen) == len(set(seen))
    assert set(seen) == {id(p) for p in model.parameters()}


def test_presets_found():
    assert OPTIMIZER_PRESETS == ["adamw", "muon", "sgd", "soap"]
    assert SCHEDULE_PRESETS == ["constant", "cosine", "linear", "wsd"]


def test_adamw_groups_no_decay_has_zero_weight_decay():
    model = tiny_lm(qk_norm=True)
    opt = build_optimizer(model, OptimizerConfig(name="adamw", weight_decay=0.1))
    assert isinstance(opt, AdamW)
    names = group_names(opt)
    assert set(names) == {"decay", "no_decay"}
    assert sorted(names["no_decay"]) == sorted(
        ["token_embeddings.weight", "ln_final.weight"]
        + [f"layers.{i}.{n}.weight" for i in range(2) for n in ("ln1", "ln2", "attn.q_norm", "attn.k_norm")])
    assert "lm_head.weight" in names["decay"] and "layers.1.ffn.w3.weight" in names["decay"]
    wd = {g["name"]: g["weight_decay"] for g in opt.param_groups}
    assert wd == {"decay": 0.1, "no_decay": 0.0}
    assert all(p.ndim == 2 for p in opt.param_groups[0]["params"])
    assert_partition(model, opt)


def test_no_decay_params_really_do_not_decay():
    model = tiny_lm()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    build_optimizer(model, OptimizerConfig(name="adamw", lr=0.1, weight_decay=0.5)).step()
    after = dict(model.named_parameters())
    assert torch.equal(after["ln_final.weight"], before["ln_final.weight"])
    assert torch.equal(after["token_embeddings.weight"], before["token_embeddings.weight"])
    torch.testing.assert_close(after["lm_head.weight"], before["lm_head.weight"] * (1 - 0.05))


def test_tied_and_biased_model_groups():
    model = tiny_lm(**GPT2_LIKE)
    assert model.lm_head.weight is model.token_embeddings.weight
    opt = build_optimizer(model, OptimizerConfig(name="adamw"))
    names = group_names(opt)
    assert "layers.0.attn.q_proj.bias" in names["no_decay"] and "layers.0.ln1.bias" in names["no_decay"]
    assert "position_embeddings.weight" in names["no_decay"]
    assert "token_embeddings.weight" in names["no_decay"] and "lm_head.weight" not in all_names(opt)
    assert_partition(model, opt)


def test_muon_groups_follow_the_rules():
    model = tiny_lm(**GPT2_LIKE)
    opt = build_optimizer(model, OptimizerConfig(name="muon", momentum=0.95, nesterov=True))
    assert isinstance(opt, Muon)
    names = group_names(opt)
    assert set(names) == {"muon", "adamw_no_decay"}  # the only decayed AdamW matrix, lm_head, is tied
    hidden = sorted(f"layers.{i}.{m}.weight" for i in range(2)
                    for m in ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.output_proj", "ffn.w1", "ffn.w2"))
    assert sorted(names["muon"]) == hidden
    adamw_names = names["adamw_no_decay"]
    assert "token_embeddings.weight" in adamw_names  # also the LM head (tied)
    assert "position_embeddings.weight" in adamw_names and "ln_final.weight" in adamw_names
    assert all(p.ndim == 2 for g in opt.param_groups if g["use_muon"] for p in g["params"])
    assert [g["use_muon"] for g in opt.param_groups] == [True, False]
    assert_partition(model, opt)
    untied = build_optimizer(tiny_lm(), OptimizerConfig(name="muon"))
    names = group_names(untied)
    assert "lm_head.weight" in names["adamw"] and "token_embeddings.weight" in names["adamw_no_decay"]


def test_lr_scale_and_set_lr():
    model = tiny_lm()
    opt = build_optimizer(model, OptimizerConfig(name="muon", lr=1e-3, muon_lr=2e-2))
    scales = {g["name"]: g["lr_scale"] for g in opt.param_groups}
    assert scales["muon"] == pytest.approx(20.0) and scales["adamw"] == 1.0
    assert {g["name"]: g["lr"] for g in opt.param_groups}["muon"] == pytest.approx(2e-2)
    set_lr(opt, 5e-4)
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs["muon"] == pytest.approx(1e-2) and lrs["adamw"] == pytest.approx(5e-4)
    plain = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    set_lr(plain, 0.25)  # groups without lr_scale: scale 1
    assert plain.param_groups[0]["lr"] == 0.25


def test_frozen_parameters_left_out():
    model = tiny_lm()
    model.token_embeddings.weight.requires_grad_(False)
    opt = build_optimizer(model, OptimizerConfig())
    assert "token_embeddings.weight" not in all_names(opt)


@pytest.mark.parametrize("name", OPTIMIZER_PRESETS)
@pytest.mark.parametrize("model_kwargs", [{}, GPT2_LIKE], ids=["llama", "gpt2"])
def test_every_optimizer_preset_runs_three_steps(name, model_kwargs):
    cfg = preset("optimizer", name, OptimizerConfig)
    validate_optimizer(cfg)
    model = tiny_lm(**model_kwargs)
    before = [p.detach().clone() for p in model.parameters()]
    opt = build_optimizer(model, cfg)  # the composed node (DictConfig) is accepted
    assert type(opt) is {"adamw": AdamW, "muon": Muon, "soap": SOAP, "sgd": SGD}[name]
    assert_partition(model, opt)
    losses = train(model, opt, 3)
    assert all(math.isfinite(x) for x in losses)
    moved = [not torch.equal(a, b) for a, b in zip(model.parameters(), before)]
    assert all(moved), [n for (n, _), m in zip(model.named_parameters(), moved) if not m]


@pytest.mark.parametrize("name", OPTIMIZER_PRESETS)
def test_every_optimizer_preset_lowers_lm_loss(name):
    model = tiny_lm()
    cfg = preset("optimizer", name, OptimizerConfig)
    lr = {"adamw": 1e-2, "muon": 1e-2, "soap": 1e-2, "sgd": 0.5}[name]
    cfg.lr = lr
    opt = build_optimizer(model, cfg)
    tokens = lm_batch(model.vocab_size)
    losses = train(model, opt, 25, tokens)
    assert losses[-1] < 0.7 * losses[0], (name, losses[::5])


@pytest.mark.parametrize("name", SCHEDULE_PRESETS)
def test_every_schedule_preset_drives_three_steps(name):
    cfg = preset("schedule", name, ScheduleConfig)
    validate_schedule(cfg)
    lr_at = build_schedule(cfg, max_lr=1e-2, total_steps=3)
    model = tiny_lm()
    opt = build_optimizer(model, OptimizerConfig(lr=1e-2))
    tokens = lm_batch(model.vocab_size)
    lrs = []
    for step in range(3):
        set_lr(opt, lr_at(step))
        lrs.append(opt.param_groups[0]["lr"])
        opt.zero_grad()
        lm_loss(model, tokens).backward()
        assert math.isfinite(clip_grad_norm(model.parameters(), 1.0))
        opt.step()
    assert all(0 < lr <= 1e-2 * (1 + 1e-12) for lr in lrs), lrs
    long = build_schedule(cfg, max_lr=1.0, total_steps=1000)
    assert long(0) == 0.0 and long(20) == 1.0  # 2% warmup
    assert long(1000) == pytest.approx(1.0 if name == "constant" else cfg.min_lr_ratio)


def test_compose_and_build_from_the_cli():
    cfg = cli.compose(["stage=tokenizer", "optimizer=muon", "schedule=wsd", "optimizer.muon_lr=0.02"])
    opt = build_optimizer(tiny_lm(), cfg.optimizer)
    assert isinstance(opt, Muon) and opt.param_groups[0]["lr"] == pytest.approx(0.02)
    lr_at = build_schedule(cfg.schedule, cfg.optimizer.lr, 100)
    assert lr_at.keywords["decay_shape"] == "sqrt" and lr_at(50) == pytest.approx(cfg.optimizer.lr)


@pytest.mark.parametrize("overrides,message", [
    ({"name": "adam"}, r"^optimizer\.name='adam': expected one of adamw, muon, soap, sgd$"),
    ({"lr": -1.0}, r"^optimizer\.lr=-1\.0: expected a number > 0$"),
    ({"lr": 0.0}, r"optimizer\.lr=0\.0"),
    ({"beta2": 1.0}, r"^optimizer\.beta2=1\.0: expected a number in \[0, 1\)$"),
    ({"weight_decay": -0.1}, r"optimizer\.weight_decay=-0\.1: expected a number >= 0"),
    ({"name": "sgd", "nesterov": True, "momentum": 0.0}, r"optimizer\.nesterov=True: .*momentum"),
    ({"muon_lr": 0.0}, r"optimizer\.muon_lr=0\.0"),
    ({"ns_steps": 0}, r"optimizer\.ns_steps=0: expected an integer >= 1"),
    ({"ns_dtype": "float16"}, r"optimizer\.ns_dtype='float16': expected one of bfloat16, float32"),
    ({"muon_scale": "x"}, r"optimizer\.muon_scale='x'"),
    ({"precondition_frequency": 0}, r"optimizer\.precondition_frequency=0"),
    ({"shampoo_beta": 1.5}, r"optimizer\.shampoo_beta=1\.5"),
    ({"max_precond_dim": 0}, r"optimizer\.max_precond_dim=0"),
])
def test_optimizer_config_errors(overrides, message):
    cfg = OptimizerConfig(**overrides)
    with pytest.raises(ConfigError, match=message) as err:
        validate_optimizer(cfg)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError):
        build_optimizer(tiny_lm(), cfg)


@pytest.mark.parametrize("overrides,message", [
    ({"name": "step"}, r"^schedule\.name='step': expected one of cosine, wsd, constant, linear$"),
    ({"warmup_steps": -1}, r"schedule\.warmup_steps=-1"),
    ({"warmup_fraction": 1.5}, r"schedule\.warmup_fraction=1\.5: expected a number in \[0, 1\]"),
    ({"min_lr_ratio": -0.1}, r"schedule\.min_lr_ratio=-0\.1"),
    ({"decay_shape": "exp"}, r"schedule\.decay_shape='exp': expected one of linear, cosine, sqrt"),
    ({"name": "wsd", "warmup_fraction": 0.5, "decay_fraction": 0.6}, r"schedule\.decay_fraction=0\.6: .*warmup"),
])
def test_schedule_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message) as err:
        validate_schedule(ScheduleConfig(**overrides))
    assert "\n" not in str(err.value)


def test_cli_one_line_error(capsys):
    assert cli.main(["stage=tokenizer", "optimizer.lr=-1", "dry_run=true"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["lmrun: error: optimizer.lr=-1.0: expected a number > 0"]


def test_param_groups_skip_empty_groups():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3, bias=False))
    groups = param_groups(model, OptimizerConfig(name="muon"))
    assert [g["name"] for g in groups] == ["muon"]
    with pytest.raises(ValueError, match="no trainable"):
        build_optimizer(torch.nn.Sequential(), OptimizerConfig())
