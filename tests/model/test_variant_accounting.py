"""FLOP and parameter accounting of the architecture variants (against the built modules and
torch's FlopCounterMode, and hand-derived formulas), their presets and one-line config errors."""
from __future__ import annotations

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from lmrun import cli
from lmrun.configs import check_schema, validate
from lmrun.errors import ConfigError
from lmrun.model import build_model, count_params, forward_flops_per_token, model_summary, training_flops
from lmrun.model.flops import kv_cache_per_token

ARMS = ["swiglu_rope", "gqa", "mla", "sliding_window", "linear_attention", "moe", "hyena"]


def model_cfg(*overrides: str):
    return cli.compose(["stage=tokenizer", "model/size=tiny", "model.vocab_size=97", "model.context_length=24",
                        *overrides]).model


def hyena_filter_flops(counter: FlopCounterMode) -> int:
    """FLOPs the counter saw inside the Hyena filter networks (once per forward, not per token)."""
    return sum(sum(ops.values()) for name, ops in counter.get_flop_counts().items() if name.endswith("attn.filter_fn"))


@pytest.mark.parametrize("overrides", [
    ["model=mla"], ["model=mla", "model.attention.mla.q_lora_rank=24", "model.bias=true"],
    ["model=mla", "model/position=none", "model.attention.mla.kv_lora_rank=8"],
    ["model=sliding_window", "model.attention.window=5"], ["model=gqa"],
    ["model=linear_attention", "model.attention.linear.chunk_size=8"],
    ["model=linear_attention", "model.n_kv_heads=2", "model.attention.linear.chunk_size=64"],
    ["model=moe"], ["model=moe", "model.ffn.moe.shared_experts=1", "model.bias=true", "model.ffn.moe.top_k=3"],
    ["model=hyena"], ["model=hyena", "model.attention.hyena.order=3", "model/position=learned"],
], ids=lambda o: " ".join(o))
def test_counts_match_the_built_module_and_flop_counter(overrides):
    cfg = model_cfg(*overrides, "model.attention.impl=naive")  # explicit matmuls the counter sees
    model = build_model(cfg)
    p = count_params(cfg)
    by_name = {n: t.numel() for n, t in model.named_parameters()}
    assert p["total"] == model.num_params() == sum(by_name.values())
    assert p["attention"] == sum(v for n, v in by_name.items() if ".attn." in n)
    assert p["ffn"] == sum(v for n, v in by_name.items() if ".ffn." in n)
    batch, seq = 2, 24
    with FlopCounterMode(display=False) as counter:
        model(torch.randint(0, 97, (batch, seq)))
    f = forward_flops_per_token(cfg, seq)
    uncounted = f.get("hyena_fft_conv", 0) * batch * seq  # torch does not count FFTs
    assert counter.get_total_flops() - hyena_filter_flops(counter) == f["total"] * batch * seq - uncounted


def test_moe_total_and_active_parameters_and_flops_by_hand():
    cfg = cli.compose(["stage=tokenizer", "model=moe"]).model  # main-job shape: d 128, 3 layers, vocab 1024
    d, L, V, E, k, w = 128, 3, 1024, 8, 2, 160  # expert width d_ff/top_k = 320/2
    p = count_params(cfg)
    expert = 3 * d * w
    assert p["ffn"] == L * (E * expert + E * d)  # experts + router
    assert p["total"] - p["active"] == L * (E - k) * expert
    assert p["active_non_embedding"] == p["active"] - V * d
    f = forward_flops_per_token(cfg)
    assert f["ffn"] == L * k * 2 * expert and f["router"] == L * 2 * d * E
    dense = forward_flops_per_token(cli.compose(["stage=tokenizer", "model=swiglu_rope"]).model)
    assert f["ffn"] == dense["ffn"]  # matched active FLOPs, 4x the FFN parameters
    assert p["ffn"] - L * E * d == 4 * count_params(cli.compose(["stage=tokenizer"]).model)["ffn"]
    s = model_summary(cfg)
    assert s["six_n_flops_per_token"] == 6 * p["active_non_embedding"] and "active" in s["params_human"]
    assert training_flops(cfg, 10)["six_nd"] == 60 * p["active_non_embedding"]


def test_sub_quadratic_terms():
    # linear attention: per-token cost independent of the sequence length beyond one chunk
    lin = cli.compose(["stage=tokenizer", "model=linear_attention", "model.context_length=4096"]).model
    mha = cli.compose(["stage=tokenizer", "model=swiglu_rope", "model.context_length=4096"]).model
    h, d_k, L, C = 4, 32, 3, 64
    for T in (256, 1024, 4096):
        f = forward_flops_per_token(lin, T)
        assert f["attention_scores"] == L * 2 * C * h * 2 * d_k and f["attention_state"] == L * 4 * h * d_k * d_k
        assert forward_flops_per_token(mha, T)["attention_scores"] == L * 4 * T * h * d_k
    assert "attention_state" not in forward_flops_per_token(lin, 64)  # one chunk: the quadratic form
    assert forward_flops_per_token(lin, 64)["attention_scores"] == forward_flops_per_token(mha, 64)["attention_scores"]
    # Hyena: O(log T) per token for the long convolutions, by the stated FFT convention
    hy = cli.compose(["stage=tokenizer", "model=hyena", "model.context_length=4096"]).model
    for T in (128, 4096):
        f = forward_flops_per_token(hy, T)
        n = 2 * T
        assert f["hyena_fft_conv"] == L * round(2 * 128 * (2 * 2.5 * n * math.log2(n) + 6 * (T + 1)) / T)
        assert f["hyena_short_conv"] == L * 2 * 3 * 128 * 3
        assert "attention_scores" not in f
    ratio = forward_flops_per_token(hy, 4096)["hyena_fft_conv"] / forward_flops_per_token(hy, 128)["hyena_fft_conv"]
    assert 1.5 < ratio < math.log2(8192) / math.log2(256)  # 32x the length: ~log-ratio per token (attention: 32x)


@pytest.mark.slow
def test_kv_cache_per_token():
    d_k, L = 16, 2
    assert kv_cache_per_token(model_cfg()) == {"elements": L * 2 * 4 * d_k, "state_elements": 0}
    assert kv_cache_per_token(model_cfg("model=gqa"))["elements"] == L * 2 * 2 * d_k
    assert kv_cache_per_token(model_cfg("model=mla"))["elements"] == L * (4 * d_k + d_k // 2)
    # a window of 6 at 24 tokens of context caches a quarter; local/global: half the layers
    assert kv_cache_per_token(model_cfg("model=sliding_window", "model.attention.window=6"))["elements"] == 64
    assert kv_cache_per_token(model_cfg("model/attention=local_global", "model.attention.window=6"))["elements"] == 160
    assert kv_cache_per_token(model_cfg("model=linear_attention")) == {"elements": 0,
                                                                       "state_elements": L * 4 * d_k * (d_k + 1)}
    assert kv_cache_per_token(model_cfg("model=hyena"))["elements"] == L * 2 * 64


@pytest.mark.slow
def test_experiment_arms_have_matched_active_flops():
    cfg = cli.compose(["stage=pretrain", "experiment=ablate_architecture"])
    assert cfg.stage.name == "pretrain"
    arm_cfg = lambda arm: cli.compose(["stage=pretrain", "experiment=ablate_architecture", f"model={arm}"]).model
    base = forward_flops_per_token(arm_cfg("swiglu_rope"))["total"]
    for arm in ARMS:
        total = forward_flops_per_token(arm_cfg(arm))["total"]
        assert abs(total / base - 1) < 0.10, (arm, total / base)


def compose(*overrides: str):
    cfg = cli.compose(["stage=tokenizer", *overrides])
    check_schema(cfg)
    validate(cfg)
    return cfg


@pytest.mark.parametrize("arm", ARMS)
def test_presets_compose(arm):
    m = compose(f"model={arm}").model
    assert m.name == arm


def test_variants_compose_with_the_core_parts():
    m = compose("model=swiglu_rope", "model/attention=mla", "model/ffn=moe").model
    assert (m.attention.kind, m.ffn.kind, m.ffn.moe.num_experts, m.ffn.moe.top_k) == ("mla", "moe", 8, 2)
    m = compose("model=gpt2", "model/attention=sliding_window", "model.attention.impl=naive").model
    assert (m.attention.kind, m.attention.window, m.norm.kind, m.position.kind) == ("mha", 32, "layernorm", "learned")
    m = compose("model=hyena", "model/ffn=moe", "model.ffn.moe.capacity_factor=1.25").model
    assert (m.attention.kind, m.ffn.moe.capacity_factor, m.position.kind) == ("hyena", 1.25, "none")
    m = compose("model=mla", "model/attention=sdpa").model  # swapping back gives standard attention
    assert m.attention.kind == "mha"


@pytest.mark.parametrize("overrides,message", [
    (["model.attention.kind=ssm"], "model.attention.kind='ssm': expected one of mha, mla, linear, hyena"),
    (["model/attention=hyena"], "model.position.kind='rope': expected sinusoidal, learned or none with "
                                "model.attention.kind=hyena"),
    (["model=mla", "model.n_kv_heads=2"], "model.n_kv_heads=2: expected null with model.attention.kind=mla"),
    (["model=mla", "model.attention.mla.rope_head_dim=5"], "model.attention.mla.rope_head_dim=5: expected null"),
    (["model=mla", "model.attention.qk_norm=true"], "model.attention.qk_norm=True: expected false"),
    (["model=linear_attention", "model.attention.window=8"], "model.attention.window=8: expected null with "
                                                             "model.attention.kind=linear"),
    (["model=sliding_window", "model.attention.window=0"], "model.attention.window=0"),
    (["model=linear_attention", "model.attention.linear.feature_map=softmax"],
     "model.attention.linear.feature_map='softmax': expected one of elu, relu"),
    (["model=linear_attention", "model.attention.linear.chunk_size=0"], "model.attention.linear.chunk_size=0"),
    (["model=hyena", "model.attention.hyena.filter_emb_dim=4"], "model.attention.hyena.filter_emb_dim=4"),
    (["model=moe", "model.ffn.moe.top_k=9"], "model.ffn.moe.top_k=9: expected an integer in [1, "
                                             "model.ffn.moe.num_experts=8]"),
    (["model=moe", "model.ffn.moe.capacity_factor=0"], "model.ffn.moe.capacity_factor=0"),
    (["model=moe", "model.ffn.moe.aux_loss_weight=-1"], "model.ffn.moe.aux_loss_weight=-1"),
])
def test_impossible_variant_settings_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError) as e:
        compose(*overrides)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_unknown_variant_keys_fail_at_compose():
    with pytest.raises(Exception, match="num_expert"):
        compose("model=moe", "model.ffn.moe.num_expert=4")
