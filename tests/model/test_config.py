"""The `model` config group: presets and sub-groups compose from the command line, sizes are the
standard shapes, and impossible combinations are one-line errors before anything runs."""
from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from lmrun import cli
from lmrun.configs import check_schema, validate
from lmrun.errors import ConfigError
from lmrun.model import ModelConfig, as_model_config, validate_model
from lmrun.model.config import AttentionConfig, NormConfig, PositionConfig


def compose(*overrides: str):
    cfg = cli.compose(["stage=tokenizer", *overrides])
    check_schema(cfg)
    validate(cfg)
    return cfg


def test_default_is_llama_style_and_follows_the_tokenizer_vocab():
    m = compose().model
    assert (m.name, m.norm.kind, m.norm.placement, m.ffn.kind, m.position.kind) == \
        ("swiglu_rope", "rmsnorm", "pre", "swiglu", "rope")
    assert m.vocab_size == 1024 and compose("tokenizer.vocab_size=8192").model.vocab_size == 8192
    assert (m.size, m.d_model, m.num_layers, m.num_heads, m.d_ff) == ("cpu", 128, 3, 4, None)


@pytest.mark.parametrize("preset,expect", [
    ("gpt2", {"norm.kind": "layernorm", "norm.placement": "pre", "ffn.kind": "gelu", "position.kind": "learned",
              "tie_embeddings": True, "bias": True}),
    ("vanilla", {"norm.kind": "layernorm", "norm.placement": "post", "norm.final": False, "ffn.kind": "relu",
                 "position.kind": "sinusoidal"}),
    ("nope", {"norm.kind": "rmsnorm", "ffn.kind": "swiglu", "position.kind": "none"}),
    ("no_norm", {"norm.kind": "none", "ffn.kind": "swiglu", "position.kind": "rope"}),
    ("post_norm", {"norm.kind": "rmsnorm", "norm.placement": "post", "position.kind": "rope"}),
    ("silu_ffn", {"ffn.kind": "silu", "d_ff": None, "position.kind": "rope"}),
])
def test_presets(preset, expect):
    m = compose(f"model={preset}").model
    assert m.name == preset
    assert {k: OmegaConf.select(m, k) for k in expect} == expect


def test_sub_groups_swap_one_part():
    m = compose("model=swiglu_rope", "model/norm=layernorm", "model/position=sinusoidal").model
    assert (m.norm.kind, m.position.kind, m.ffn.kind, m.norm.placement) == ("layernorm", "sinusoidal", "swiglu", "pre")
    m = compose("model=post_norm", "model/norm=layernorm").model  # the preset's placement survives
    assert (m.norm.kind, m.norm.placement) == ("layernorm", "post")
    m = compose("model=gpt2", "model/norm=rmsnorm", "model/attention=naive", "model/ffn=relu2").model
    assert (m.norm.kind, m.attention.impl, m.ffn.kind, m.position.kind) == ("rmsnorm", "naive", "relu2", "learned")
    m = compose("model.n_kv_heads=1", "model.attention.qk_norm=true").model
    assert m.n_kv_heads == 1 and m.attention.qk_norm is True


@pytest.mark.parametrize("size,shape", [
    ("small", (768, 3072, 12, 12)), ("medium", (1024, 4096, 24, 16)), ("large", (1280, 5120, 36, 20)),
    ("xl", (1600, 6400, 48, 25)), ("2.7b", (2560, 10240, 32, 32)), ("tinystories", (512, 1344, 4, 16)),
])
def test_size_presets(size, shape):
    m = compose(f"model/size={size}").model
    assert (m.size, m.d_model, m.d_ff, m.num_layers, m.num_heads) == (size, *shape)
    m = compose("model=silu_ffn", f"model/size={size}").model  # the ablation keeps d_ff at its default
    assert m.d_ff is None and m.d_model == shape[0]


@pytest.mark.parametrize("overrides,message", [
    (["model.num_heads=7"], "model.num_heads=7: expected a divisor of model.d_model=128"),
    (["model.n_kv_heads=3"], "model.n_kv_heads=3: expected null or a divisor of model.num_heads=4"),
    (["model.d_model=96", "model.num_heads=32"], "model.num_heads=32: expected a value giving an even head dimension"),
    (["model.norm.kind=batchnorm"], "model.norm.kind='batchnorm': expected one of rmsnorm, layernorm, none"),
    (["model.norm.placement=sandwich"], "model.norm.placement='sandwich': expected one of pre, post, none"),
    (["model.ffn.kind=swish"], "model.ffn.kind='swish'"),
    (["model.position.kind=alibi"], "model.position.kind='alibi'"),
    (["model.attention.impl=flash"], "model.attention.impl='flash': expected one of naive, sdpa"),
    (["model.d_ff=0"], "model.d_ff=0"),
    (["model.logit_softcap=0"], "model.logit_softcap=0"),
    (["model.num_layers=0"], "model.num_layers=0: expected an integer >= 1"),
    (["model.context_length=0"], "model.context_length=0"),
])
def test_impossible_combinations_fail_at_compose_time(overrides, message):
    with pytest.raises(ConfigError) as e:
        compose(*overrides)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_odd_head_dim_is_fine_without_rope():
    compose("model.d_model=96", "model.num_heads=32", "model/position=none")
    compose("model/size=xl")  # head dim 64


@pytest.mark.parametrize("overrides,message", [
    (["model.dmodel=8"], "model.dmodel: unknown key"),
    (["model.norm.type=rmsnorm"], "model.norm.type: unknown key"),
    (["model/norm=batchnorm"], "model/norm=batchnorm: no such option"),
    (["model=gpt5"], "model=gpt5: no such option"),
    (["model.d_model=wide"], "model.d_model='wide'"),
])
def test_schema_rejects_unknown_keys_and_options(overrides, message):
    with pytest.raises(ConfigError, match=None) as e:
        cli.compose(["stage=tokenizer", *overrides])
    assert message in str(e.value)


def test_cli_prints_one_line_and_exits_2(capsys):
    assert cli.main(["stage=tokenizer", "model.num_heads=7", "dry_run=true"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["lmrun: error: model.num_heads=7: expected a divisor of model.d_model=128"]


def test_validate_model_on_dataclasses_and_conversion():
    validate_model(ModelConfig())
    with pytest.raises(ConfigError, match="model.position.theta"):
        validate_model(ModelConfig(position=PositionConfig(theta=0.0)))
    with pytest.raises(ConfigError, match="model.norm.eps"):
        validate_model(ModelConfig(norm=NormConfig(eps=-1.0)))
    node = compose("model=gpt2", "model.n_kv_heads=2").model
    m = as_model_config(node)
    assert isinstance(m, ModelConfig) and isinstance(m.attention, AttentionConfig)
    assert (m.vocab_size, m.n_kv_heads, m.position.kind) == (1024, 2, "learned")
