"""The full TransformerLM: every preset and sub-group option builds, runs forward and backward
and trains; causality; truncated-input consistency; deterministic init; checkpoint keys as in
DESIGN.md; loading a CS336-style state dict reproduces a functional reference forward."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmrun import cli
from lmrun.model import TransformerLM, build_model

PRESETS = sorted(p.stem for p in (cli.CONF_DIR / "model").glob("*.yaml"))
SMALL = ["model.vocab_size=97", "model.context_length=32"]
VARIANTS = [
    ["model/norm=layernorm"], ["model/norm=none"], ["model.norm.placement=none"],
    ["model/ffn=geglu"], ["model/ffn=gelu"], ["model/ffn=relu"], ["model/ffn=relu2"],
    ["model/position=sinusoidal"], ["model/position=learned"],
    ["model/attention=naive"], ["model.n_kv_heads=2"], ["model.n_kv_heads=1", "model/attention=naive"],
    ["model.attention.qk_norm=true"], ["model.logit_softcap=5.0"], ["model.tie_embeddings=true"],
    ["model.bias=true", "model/norm=layernorm"],
]


def model_cfg(*overrides: str):
    """A preset at the tiny CPU shape (tests; the presets' default size is the main job's)."""
    overrides = list(overrides)
    if not any(o.startswith("model/size=") for o in overrides):
        preset = [o for o in overrides if o.startswith("model=")]
        overrides = preset + ["model/size=tiny"] + [o for o in overrides if not o.startswith("model=")]
    return cli.compose(["stage=tokenizer", *SMALL, *overrides]).model


def build(*overrides: str, seed: int = 0) -> TransformerLM:
    torch.manual_seed(seed)
    return build_model(model_cfg(*overrides))


def train_steps(model: TransformerLM, steps: int = 8) -> list[float]:
    """A few AdamW steps on one repeated batch; returns the losses."""
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, model.vocab_size, (4, 17), generator=g)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(steps):
        logits = model(x[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("overrides", [[f"model={p}"] for p in PRESETS] + VARIANTS,
                         ids=lambda o: " ".join(o))
def test_every_preset_and_variant_builds_runs_and_trains(overrides):
    model = build(*overrides)
    logits = model(torch.randint(0, 97, (2, 32)))
    assert logits.shape == (2, 32, 97) and torch.isfinite(logits).all()
    losses = train_steps(model)
    assert losses[-1] < 0.5 * losses[0], losses


def test_presets_found():
    assert {"swiglu_rope", "gpt2", "vanilla", "nope", "no_norm", "post_norm", "silu_ffn"} <= set(PRESETS)


@pytest.mark.parametrize("overrides", [["model=swiglu_rope"], ["model=gpt2"], ["model=vanilla"], ["model=nope"],
                                       ["model=post_norm", "model/attention=naive"], ["model.n_kv_heads=1"]],
                         ids=lambda o: " ".join(o))
def test_causal_and_truncation_consistent(overrides):
    model = build(*overrides).eval()
    torch.manual_seed(2)
    x = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        full = model(x)
        for t in (1, 7, 19):
            changed = x.clone()
            changed[:, t:] = torch.randint(0, 97, changed[:, t:].shape)
            torch.testing.assert_close(model(changed)[:, :t], full[:, :t], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(model(x[:, :t]), full[:, :t], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(model(changed)[:, 19:], full[:, 19:])  # the future does matter


def test_deterministic_init_under_a_seed():
    a, b, c = build(seed=3).state_dict(), build(seed=3).state_dict(), build(seed=4).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["layers.0.attn.q_proj.weight"], c["layers.0.attn.q_proj.weight"])


def layer_keys(i: int, ffn=("w1", "w2", "w3"), norm_suffixes=("weight",), bias=False) -> set[str]:
    keys = {f"layers.{i}.attn.{p}.weight" for p in ("q_proj", "k_proj", "v_proj", "output_proj")}
    keys |= {f"layers.{i}.ffn.{w}.weight" for w in ffn}
    if bias:
        keys |= {f"layers.{i}.attn.{p}.bias" for p in ("q_proj", "k_proj", "v_proj", "output_proj")}
        keys |= {f"layers.{i}.ffn.{w}.bias" for w in ffn}
    keys |= {f"layers.{i}.{ln}.{s}" for ln in ("ln1", "ln2") for s in norm_suffixes}
    return keys


def test_state_dict_keys_as_specified():
    sd = build("model=swiglu_rope").state_dict()
    expected = {"token_embeddings.weight", "ln_final.weight", "lm_head.weight"} | layer_keys(0) | layer_keys(1)
    assert set(sd) == expected
    assert sd["layers.0.attn.q_proj.weight"].shape == (64, 64)  # (d_out, d_in)
    assert sd["layers.0.ffn.w1.weight"].shape == (192, 64) and sd["layers.0.ffn.w2.weight"].shape == (64, 192)
    assert sd["lm_head.weight"].shape == (97, 64) and sd["token_embeddings.weight"].shape == (97, 64)

    gpt2 = build("model=gpt2")
    sd = gpt2.state_dict()
    expected = ({"token_embeddings.weight", "position_embeddings.weight", "ln_final.weight", "ln_final.bias",
                 "lm_head.weight"}
                | layer_keys(0, ("w1", "w2"), ("weight", "bias"), bias=True)
                | layer_keys(1, ("w1", "w2"), ("weight", "bias"), bias=True))
    assert set(sd) == expected
    assert gpt2.lm_head.weight is gpt2.token_embeddings.weight
    assert sd["position_embeddings.weight"].shape == (32, 64)

    sd = build("model=vanilla").state_dict()  # post-norm, no final norm, sinusoidal table not saved
    assert set(sd) == ({"token_embeddings.weight", "lm_head.weight"}
                       | layer_keys(0, ("w1", "w2"), ("weight", "bias"), bias=True)
                       | layer_keys(1, ("w1", "w2"), ("weight", "bias"), bias=True))
    sd = build("model=no_norm").state_dict()
    assert not any(k.startswith(("ln_final", "layers.0.ln")) for k in sd)
    sd = build("model.attention.qk_norm=true", "model.n_kv_heads=2").state_dict()
    assert sd["layers.1.attn.q_norm.weight"].shape == (16,) and sd["layers.1.attn.k_proj.weight"].shape == (32, 64)


def reference_forward(sd: dict, x: torch.Tensor, *, L: int, h: int, norm: str, ffn: str, position: str,
                      theta: float = 10000.0, eps: float = 1e-5) -> torch.Tensor:
    """A pre-norm Transformer LM written with torch.nn.functional from a CS336-style state dict."""
    b, s = x.shape
    d = sd["token_embeddings.weight"].shape[1]
    d_k = d // h

    def nrm(t, name):
        if norm == "rmsnorm":
            return F.rms_norm(t, (d,), sd[f"{name}.weight"], eps=eps)
        return F.layer_norm(t, (d,), sd[f"{name}.weight"], sd[f"{name}.bias"], eps=eps)

    def lin(t, name):
        return F.linear(t, sd[f"{name}.weight"], sd.get(f"{name}.bias"))

    def rope(t):  # t (b, h, s, d_k)
        inv = theta ** (-torch.arange(0, d_k, 2, dtype=torch.float64) / d_k)
        ang = torch.arange(s, dtype=torch.float64)[:, None] * inv
        cos, sin = torch.cos(ang).float(), torch.sin(ang).float()
        t1, t2 = t[..., 0::2], t[..., 1::2]
        return torch.stack((t1 * cos - t2 * sin, t1 * sin + t2 * cos), -1).flatten(-2)

    z = F.embedding(x, sd["token_embeddings.weight"])
    if position == "learned":
        z = z + sd["position_embeddings.weight"][:s]
    for i in range(L):
        p = f"layers.{i}"
        a = nrm(z, f"{p}.ln1")
        q, k, v = (lin(a, f"{p}.attn.{n}").view(b, s, h, d_k).transpose(1, 2) for n in ("q_proj", "k_proj", "v_proj"))
        if position == "rope":
            q, k = rope(q), rope(k)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, s, d)
        z = z + lin(o, f"{p}.attn.output_proj")
        a = nrm(z, f"{p}.ln2")
        if ffn == "swiglu":
            f = lin(F.silu(lin(a, f"{p}.ffn.w1")) * lin(a, f"{p}.ffn.w3"), f"{p}.ffn.w2")
        else:
            f = lin(F.gelu(lin(a, f"{p}.ffn.w1")), f"{p}.ffn.w2")
        z = z + f
    return F.linear(nrm(z, "ln_final"), sd["lm_head.weight"])


def random_state_dict(shapes: dict[str, tuple], seed: int) -> dict[str, torch.Tensor]:
    """Matrices N(0, 0.2²); 1-D weights (norm gains) 1 + N(0, 0.1²); biases N(0, 0.1²)."""
    g = torch.Generator().manual_seed(seed)
    return {k: 0.2 * torch.randn(shape, generator=g) if len(shape) == 2
            else (1.0 if k.endswith("weight") else 0.0) + 0.1 * torch.randn(shape, generator=g)
            for k, shape in shapes.items()}


def test_cs336_style_checkpoint_loads_and_matches_functional_reference():
    V, ctx, d, L, h, d_ff = 50, 16, 32, 2, 4, 48
    shapes = {"token_embeddings.weight": (V, d), "ln_final.weight": (d,), "lm_head.weight": (V, d)}
    for i in range(L):
        shapes |= {f"layers.{i}.attn.{n}.weight": (d, d) for n in ("q_proj", "k_proj", "v_proj", "output_proj")}
        shapes |= {f"layers.{i}.ln1.weight": (d,), f"layers.{i}.ln2.weight": (d,),
                   f"layers.{i}.ffn.w1.weight": (d_ff, d), f"layers.{i}.ffn.w3.weight": (d_ff, d),
                   f"layers.{i}.ffn.w2.weight": (d, d_ff)}
    sd = random_state_dict(shapes, 0)
    model = TransformerLM(V, ctx, d, L, h, d_ff, 10000.0)  # CS336's positional signature
    model.load_state_dict(sd, strict=True)
    x = torch.randint(0, V, (3, ctx), generator=torch.Generator().manual_seed(5))
    expected = reference_forward(sd, x, L=L, h=h, norm="rmsnorm", ffn="swiglu", position="rope")
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_gpt2_style_checkpoint_matches_functional_reference():
    V, ctx, d, L, h, d_ff = 50, 16, 32, 2, 4, 128
    shapes = {"token_embeddings.weight": (V, d), "position_embeddings.weight": (ctx, d),
              "ln_final.weight": (d,), "ln_final.bias": (d,)}
    for i in range(L):
        for n in ("q_proj", "k_proj", "v_proj", "output_proj"):
            shapes |= {f"layers.{i}.attn.{n}.weight": (d, d), f"layers.{i}.attn.{n}.bias": (d,)}
        for ln in ("ln1", "ln2"):
            shapes |= {f"layers.{i}.{ln}.weight": (d,), f"layers.{i}.{ln}.bias": (d,)}
        shapes |= {f"layers.{i}.ffn.w1.weight": (d_ff, d), f"layers.{i}.ffn.w1.bias": (d_ff,),
                   f"layers.{i}.ffn.w2.weight": (d, d_ff), f"layers.{i}.ffn.w2.bias": (d,)}
    sd = random_state_dict(shapes, 1)
    model = TransformerLM(V, ctx, d, L, h, d_ff, norm="layernorm", ffn="gelu", position="learned",
                          bias=True, tie_embeddings=True)
    model.load_state_dict(sd | {"lm_head.weight": sd["token_embeddings.weight"]}, strict=True)
    x = torch.randint(0, V, (2, ctx), generator=torch.Generator().manual_seed(6))
    expected = reference_forward(sd | {"lm_head.weight": sd["token_embeddings.weight"]}, x, L=L, h=h,
                                 norm="layernorm", ffn="gelu", position="learned")
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_post_norm_block_order():
    """post-norm: z = ln1(x + attn(x)); y = ln2(z + ffn(z)) — checked against the block's own parts."""
    model = build("model=post_norm").eval()
    block, x = model.layers[0], torch.randn(2, 5, 64)
    z = block.ln1(x + block.attn(x))
    torch.testing.assert_close(block(x), block.ln2(z + block.ffn(z)))


@pytest.mark.slow
def test_softcap_tying_and_errors():
    model = build("model.logit_softcap=2.0")
    logits = model(torch.randint(0, 97, (2, 32)))
    assert logits.abs().max().item() <= 2.0
    tied = build("model.tie_embeddings=true")
    assert tied.lm_head.weight is tied.token_embeddings.weight
    assert tied.num_params() == sum(p.numel() for p in tied.parameters())
    assert tied.num_params() < build().num_params()
    with pytest.raises(ValueError, match="context_length"):
        build()(torch.zeros(1, 33, dtype=torch.long))


def test_token_positions_and_bf16():
    model = build().eval()
    x = torch.randint(0, 97, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(model(x, torch.arange(10)), model(x))
        torch.testing.assert_close(model(x, torch.arange(10) + 5), model(x), rtol=1e-4, atol=1e-4)  # RoPE is relative
        y = model.to(torch.bfloat16)(x)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    assert model.layers[0].attn.rope.cos.dtype == torch.float32  # position tables stay exact


@pytest.mark.parametrize("position", ["rope", "sinusoidal"])
def test_meta_init_then_to_empty_matches_a_normal_build(position):
    """Build on the meta device, materialise with to_empty, load weights: same logits (the
    non-persistent RoPE / sinusoidal tables are recomputed, not left uninitialised)."""
    cfg = model_cfg(f"model/position={position}")
    torch.manual_seed(0)
    ref = build_model(cfg).eval()  # eval: the presets' dropout would draw different masks
    lazy = build_model(cfg, device="meta").to_empty(device="cpu").eval()
    lazy.load_state_dict(ref.state_dict())
    x = torch.randint(0, 97, (2, 16))
    torch.testing.assert_close(lazy(x), ref(x), rtol=0, atol=0)
