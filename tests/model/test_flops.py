"""Parameter and FLOP accounting: hand-derived numbers for two published configurations, the
general formulas against the built modules (tiny ones for real, the big size presets on the meta
device), and forward FLOPs against torch's FlopCounterMode."""
from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from lmrun import cli
from lmrun.model import build_model, count_params, forward_flops_per_token, model_summary, training_flops
from lmrun.model.flops import human, mfu

PRESETS = sorted(p.stem for p in (cli.CONF_DIR / "model").glob("*.yaml"))
SIZES = sorted(p.stem for p in (cli.CONF_DIR / "model" / "size").glob("*.yaml"))


def model_cfg(*overrides: str):
    return cli.compose(["stage=tokenizer", *overrides]).model


def test_gpt2_xl_shape_with_swiglu_matches_cs336_accounting():
    """CS336 assignment 1 (transformer_accounting): GPT-2 XL shape, vocab 50257, context 1024,
    48 layers, d_model 1600, 25 heads, d_ff 6400, SwiGLU + RMSNorm + RoPE, untied."""
    cfg = model_cfg("model=swiglu_rope", "model/size=xl", "model.vocab_size=50257", "model.context_length=1024")
    p = count_params(cfg)
    assert p["token_embeddings"] == 50257 * 1600 == 80_411_200
    assert p["attention"] == 48 * 4 * 1600 * 1600 == 491_520_000
    assert p["ffn"] == 48 * 3 * 1600 * 6400 == 1_474_560_000
    assert p["norms"] == 48 * 2 * 1600 + 1600 == 155_200
    assert p["lm_head"] == 80_411_200 and p["position_embeddings"] == 0
    assert p["total"] == 2_127_057_600
    assert p["non_embedding"] == 2_127_057_600 - 80_411_200
    f = forward_flops_per_token(cfg)  # per token, sequences of 1024 tokens
    assert f["attention_projections"] == 48 * 2 * 1600 * 4 * 1600 == 983_040_000
    assert f["attention_scores"] == 48 * 4 * 1024 * 1600 == 314_572_800
    assert f["ffn"] == 48 * 2 * 3 * 1600 * 6400 == 2_949_120_000
    assert f["lm_head"] == 2 * 1600 * 50257 == 160_822_400
    assert f["total"] == 4_407_555_200
    assert f["total"] * 1024 == 4_513_336_524_800  # ~4.51 TFLOPs for one 1024-token forward pass


def test_gpt2_small_matches_the_published_parameter_count():
    """GPT-2 small (Radford et al. 2019; HF `gpt2`: 124,439,808 parameters)."""
    cfg = model_cfg("model=gpt2", "model/size=small", "model.vocab_size=50257", "model.context_length=1024")
    p = count_params(cfg)
    assert p["total"] == 124_439_808
    assert p["position_embeddings"] == 1024 * 768 and p["lm_head"] == 0  # tied
    assert p["attention"] == 12 * (4 * 768 * 768 + 4 * 768)
    assert p["ffn"] == 12 * (2 * 768 * 3072 + 3072 + 768)
    assert p["norms"] == 12 * 2 * 2 * 768 + 2 * 768
    f = forward_flops_per_token(cfg)
    assert (f["attention_projections"], f["attention_scores"], f["ffn"], f["lm_head"]) == \
        (56_623_104, 37_748_736, 113_246_208, 77_194_752)
    assert f["total"] == 284_812_800
    assert forward_flops_per_token(cfg, seq_len=256)["attention_scores"] == 12 * 4 * 256 * 768


def general_params(V, T, d, L, h, kvh, d_ff, gated, norm, placement, final, learned, tied, bias, qk_norm):
    """The parameter formula, written out independently of lmrun.model.flops."""
    dk = d // h
    n_norm = {"rmsnorm": d, "layernorm": 2 * d, "none": 0}[norm]
    attn = 2 * d * d + 2 * d * kvh * dk + (d + 2 * kvh * dk + d if bias else 0) + (2 * dk if qk_norm else 0)
    ffn = (3 if gated else 2) * d * d_ff + (((2 if gated else 1) * d_ff + d) if bias else 0)
    blocks = L * (attn + ffn + (2 * n_norm if placement != "none" else 0))
    return V * d + (T * d if learned else 0) + blocks + (n_norm if final else 0) + (0 if tied else V * d)


@pytest.mark.parametrize("overrides", [
    ["model.n_kv_heads=2", "model.attention.qk_norm=true", "model.bias=true", "model/ffn=geglu", "model.d_ff=80"],
    ["model=gpt2", "model.n_kv_heads=1", "model/norm=rmsnorm"],
    ["model=vanilla", "model.norm.placement=none", "model.d_ff=100"],
])
def test_general_formula(overrides):
    cfg = model_cfg("model.vocab_size=300", "model.context_length=48", *overrides)
    from lmrun.model import resolved_d_ff, resolved_kv_heads
    expected = general_params(cfg.vocab_size, cfg.context_length, cfg.d_model, cfg.num_layers, cfg.num_heads,
                              resolved_kv_heads(cfg), resolved_d_ff(cfg), cfg.ffn.kind in ("swiglu", "geglu"),
                              cfg.norm.kind, cfg.norm.placement, cfg.norm.final, cfg.position.kind == "learned",
                              cfg.tie_embeddings, cfg.bias, cfg.attention.qk_norm)
    assert count_params(cfg)["total"] == expected == build_model(cfg).num_params()


VARIANTS = [[f"model={p}"] for p in PRESETS] + [
    ["model.n_kv_heads=2", "model.attention.qk_norm=true"], ["model.n_kv_heads=1", "model.bias=true"],
    ["model/ffn=geglu"], ["model/ffn=relu2", "model.d_ff=100"], ["model=gpt2", "model/norm=rmsnorm"],
    ["model.norm.placement=none"], ["model.tie_embeddings=true", "model/position=learned"],
]


@pytest.mark.parametrize("overrides", VARIANTS, ids=lambda o: " ".join(o))
def test_counts_match_the_built_module_and_flop_counter(overrides):
    cfg = model_cfg("model.vocab_size=97", "model.context_length=24", "model/attention=naive", *overrides)
    model = build_model(cfg)
    p = count_params(cfg)
    assert p["total"] == model.num_params() == sum(t.numel() for t in model.parameters())
    assert p["non_embedding"] == model.num_params(non_embedding=True)
    by_name = {n: t.numel() for n, t in model.named_parameters()}
    assert p["ffn"] == sum(v for n, v in by_name.items() if ".ffn." in n)
    assert p["attention"] == sum(v for n, v in by_name.items() if ".attn." in n)
    batch, seq = 2, 24
    with FlopCounterMode(display=False) as counter:
        model(torch.randint(0, 97, (batch, seq)))
    assert counter.get_total_flops() == forward_flops_per_token(cfg, seq)["total"] * batch * seq


@pytest.mark.parametrize("size", [s for s in SIZES if s not in ("tiny",)])
@pytest.mark.parametrize("preset", ["swiglu_rope", "gpt2", "vanilla", "silu_ffn"])
def test_big_sizes_count_equals_meta_module(size, preset):
    cfg = model_cfg(f"model={preset}", f"model/size={size}", "model.vocab_size=50257", "model.context_length=1024")
    model = build_model(cfg, device="meta")  # shapes only, no memory
    assert count_params(cfg)["total"] == model.num_params()


def test_summary_training_flops_and_plan_output():
    cfg = model_cfg("model/size=small", "model.vocab_size=50257", "model.context_length=1024")
    s = model_summary(cfg)
    json.dumps(s)  # a plan must be JSON/YAML-serialisable
    fwd = s["forward_flops_per_token"]
    assert s["train_flops_per_token"] == 3 * fwd["total"]
    assert s["six_n_flops_per_token"] == 6 * s["params"]["non_embedding"]
    assert s["six_n_total_flops_per_token"] == 6 * s["params"]["total"]
    assert sum(s["forward_flops_share"].values()) == pytest.approx(1.0, abs=1e-3)
    assert s["seq_len"] == 1024 and "swiglu_rope/small" in s["architecture"]
    t = training_flops(cfg, tokens=1_000_000)
    assert t == {"exact": 3 * fwd["total"] * 10**6, "six_nd": 6 * s["params"]["non_embedding"] * 10**6}
    # exact 3x-forward and 6N agree within the attention-score and LM-head terms
    assert 0.7 < t["six_nd"] / t["exact"] < 1.0
    assert mfu(1000.0, 3e9, 1e13) == pytest.approx(0.3)
    assert human(124_439_808) == "124.44M" and human(4.5e12, "FLOPs") == "4.50TFLOPs"
    plan = cli.format_plan({"model": s}, ["model/size=small"])
    assert "forward_flops_per_token" in plan and "attention_scores" in plan and s["params_human"] in plan
