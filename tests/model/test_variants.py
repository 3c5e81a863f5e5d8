"""Architecture variants against their references: MLA's absorbed inference form equals its
training form (also token by token from the latent cache); sliding-window attention equals full
causal attention for w >= seq_len and an explicitly masked reference otherwise (naive and SDPA);
linear attention's parallel, chunked and recurrent forms agree; Hyena's FFT convolution equals
the direct causal convolution; MoE's grouped computation equals a per-token loop, one expert
equals the dense SwiGLU, routing respects top-k, the auxiliary losses match their formulas;
every variant is causal."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lmrun import cli
from lmrun.model import MultiHeadSelfAttention, RotaryEmbedding, build_model
from lmrun.model.ffn import SwiGLU
from lmrun.model.hyena import HyenaOperator, causal_conv_direct, fft_causal_conv
from lmrun.model.linear_attention import (LinearAttention, feature_map, linear_attention_chunked,
                                          linear_attention_parallel, linear_attention_recurrent)
from lmrun.model.mla import MultiHeadLatentAttention
from lmrun.model.moe import MoE, load_balancing_loss, router_z_loss
from lmrun.model.variants import layer_windows

D64 = torch.float64


def model_cfg(*overrides: str):
    return cli.compose(["stage=tokenizer", "model/size=tiny", "model.vocab_size=97", "model.context_length=32",
                        "model.dropout=0", *overrides]).model


# --- multi-head latent attention ------------------------------------------------------------
def mla(q_rank=0, rope_dim=8, bias=False, impl="sdpa", seed=0):
    torch.manual_seed(seed)
    rope = RotaryEmbedding(10000.0, rope_dim, 64) if rope_dim else None
    return MultiHeadLatentAttention(48, 4, 20, q_rank=q_rank, rope_dim=rope_dim, rope=rope, impl=impl, bias=bias,
                                    dtype=D64)


@pytest.mark.parametrize("q_rank,rope_dim,bias", [(0, 8, False), (16, 4, False), (0, 0, False), (12, 6, True)])
def test_mla_absorbed_form_equals_training_form(q_rank, rope_dim, bias):
    attn = mla(q_rank, rope_dim, bias)
    if bias:  # zero-initialised biases would hide a wrong bias path
        with torch.no_grad():
            for m in attn.modules():
                if getattr(m, "bias", None) is not None:
                    m.bias.normal_()
    x = torch.randn(2, 11, 48, dtype=D64)
    train = attn(x)
    absorbed, cache = attn.absorbed_forward(x)
    torch.testing.assert_close(absorbed, train, rtol=1e-10, atol=1e-10)
    assert cache["c_kv"].shape == (2, 11, 20)
    assert (cache["k_rope"] is None) == (rope_dim == 0)
    # decoding one token at a time from the latent cache gives the same outputs
    cache, steps = None, []
    for t in range(11):
        y, cache = attn.absorbed_forward(x[:, t:t + 1], cache=cache)
        steps.append(y)
    # (RoPE rotates in float32: the projections of one token alone differ from the batched ones in
    # the last float64 bits, which the float32 rotation turns into ~1e-8 differences)
    torch.testing.assert_close(torch.cat(steps, dim=1), train, rtol=1e-6, atol=1e-6)
    assert attn.kv_cache_elements_per_token() == 20 + rope_dim


def test_mla_matches_an_explicit_reference_and_sdpa():
    attn = mla(q_rank=16, rope_dim=8, impl="naive")
    x = torch.randn(2, 9, 48, dtype=D64)
    # reference written from the DeepSeek-V2 equations with plain tensor ops
    W = {n: p for n, p in attn.named_parameters()}
    c_q = F.rms_norm(x @ W["q_down_proj.weight"].T, (16,), W["q_latent_norm.weight"], eps=1e-5)
    q = (c_q @ W["q_up_proj.weight"].T).view(2, 9, 4, 20).transpose(1, 2)
    c = F.rms_norm(x @ W["kv_down_proj.weight"].T, (20,), W["kv_latent_norm.weight"], eps=1e-5)
    k_c = (c @ W["k_up_proj.weight"].T).view(2, 9, 4, 12).transpose(1, 2)
    v = (c @ W["v_up_proj.weight"].T).view(2, 9, 4, 12).transpose(1, 2)
    k_r = x @ W["k_rope_proj.weight"].T  # (2, 9, 8)

    def rot(t):  # adjacent-pair RoPE
        pos = torch.arange(9, dtype=D64)[:, None]
        ang = pos * 10000.0 ** (-torch.arange(0, 8, 2, dtype=D64) / 8)
        a, b = t[..., 0::2], t[..., 1::2]
        return torch.stack([a * ang.cos() - b * ang.sin(), a * ang.sin() + b * ang.cos()], -1).flatten(-2)

    q_full = torch.cat([q[..., :12], rot(q[..., 12:])], -1)
    k_full = torch.cat([k_c, rot(k_r)[:, None].expand(2, 4, 9, 8)], -1)
    scores = q_full @ k_full.transpose(-1, -2) / math.sqrt(20)
    scores = scores.masked_fill(~torch.ones(9, 9, dtype=torch.bool).tril(), float("-inf"))
    ref = (scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 9, 48) @ W["output_proj.weight"].T
    torch.testing.assert_close(attn(x), ref, rtol=1e-5, atol=1e-6)  # RoPE tables are float32
    attn.impl = "sdpa"
    torch.testing.assert_close(attn(x), ref, rtol=1e-5, atol=1e-6)


# --- sliding-window attention ------------------------------------------------------------------
def windowed_reference(attn: MultiHeadSelfAttention, x: torch.Tensor, window: int) -> torch.Tensor:
    """Explicit masked softmax attention: token i sees j with i - window < j <= i."""
    b, s, d = x.shape
    h, kvh, dk = attn.num_heads, attn.n_kv_heads, attn.d_k
    q = (x @ attn.q_proj.weight.T).view(b, s, h, dk).transpose(1, 2)
    k = (x @ attn.k_proj.weight.T).view(b, s, kvh, dk).transpose(1, 2).repeat_interleave(h // kvh, 1)
    v = (x @ attn.v_proj.weight.T).view(b, s, kvh, dk).transpose(1, 2).repeat_interleave(h // kvh, 1)
    i, j = torch.arange(s)[:, None], torch.arange(s)[None, :]
    allowed = (j <= i) & (j > i - window)
    scores = (q @ k.transpose(-1, -2) / math.sqrt(dk)).masked_fill(~allowed, float("-inf"))
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, h * dk)
    return out @ attn.output_proj.weight.T


@pytest.mark.parametrize("impl", ["naive", "sdpa"])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_sliding_window_equals_masked_reference_and_full_causal_for_large_windows(impl, kv_heads):
    torch.manual_seed(0)
    full = MultiHeadSelfAttention(32, 4, kv_heads, impl=impl, dtype=D64)
    x = torch.randn(2, 13, 32, dtype=D64)
    tol = 1e-10 if impl == "sdpa" else 1e-6  # the naive path computes scores in float32
    for window in (1, 3, 7):
        local = MultiHeadSelfAttention(32, 4, kv_heads, impl=impl, window=window, dtype=D64)
        local.load_state_dict(full.state_dict())
        out = local(x)
        torch.testing.assert_close(out, windowed_reference(local, x, window), rtol=tol, atol=tol)
        assert not torch.allclose(out, full(x))  # the window changes the result
    for window in (13, 40):  # a window covering the sequence is full causal attention
        local = MultiHeadSelfAttention(32, 4, kv_heads, impl=impl, window=window, dtype=D64)
        local.load_state_dict(full.state_dict())
        torch.testing.assert_close(local(x), full(x), rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="window"):
        MultiHeadSelfAttention(32, 4, window=0)


def test_local_global_layers_and_windowed_model():
    cfg = model_cfg("model/attention=local_global", "model.num_layers=4", "model.attention.window=5")
    assert layer_windows(cfg) == [5, None, 5, None]
    model = build_model(cfg)
    assert [layer.attn.window for layer in model.layers] == [5, None, 5, None]
    assert layer_windows(model_cfg("model=sliding_window")) == [32, 32]
    # the receptive field grows by window-1 per local layer: with 2 local layers of window 3,
    # position 10 cannot see positions < 10 - 2·2 = 6
    torch.manual_seed(0)
    m = build_model(model_cfg("model=sliding_window", "model.attention.window=3")).eval()
    x = torch.randint(0, 97, (1, 12))
    changed = x.clone()
    changed[0, :6] = (x[0, :6] + 1) % 97
    with torch.no_grad():
        a, b = m(x), m(changed)
    torch.testing.assert_close(a[0, 10:], b[0, 10:])
    assert not torch.allclose(a[0, 9], b[0, 9])


# --- linear attention --------------------------------------------------------------------------
def paper_reference(q, k, v, eps=1e-6):
    """Katharopoulos et al. 2020, eq. 5 with a causal sum, one query at a time (no RoPE)."""
    fq, fk = F.elu(q) + 1, F.elu(k) + 1
    out = torch.empty_like(v)
    for i in range(q.shape[-2]):
        w = fq[..., i:i + 1, :] @ fk[..., :i + 1, :].transpose(-1, -2)  # (..., 1, i+1)
        out[..., i, :] = ((w @ v[..., :i + 1, :]) / (w.sum(-1, keepdim=True) + eps))[..., 0, :]
    return out


def test_linear_attention_forms_agree_with_the_paper():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 17, 8, dtype=D64) for _ in range(3))
    fq, fk = feature_map(q), feature_map(k)
    ref = paper_reference(q, k, v)
    torch.testing.assert_close(linear_attention_parallel(fq, fk, fq, fk, v), ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(linear_attention_recurrent(fq, fk, fq, fk, v), ref, rtol=1e-10, atol=1e-10)
    for chunk in (1, 4, 5, 17, 64):  # divisible, padded, one chunk, longer than the sequence
        torch.testing.assert_close(linear_attention_chunked(fq, fk, fq, fk, v, chunk), ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kv_heads,rope,fmap", [(4, True, "elu"), (2, False, "relu"), (1, True, "elu")])
def test_linear_attention_module_forms_equal(kv_heads, rope, fmap):
    torch.manual_seed(0)
    attn = LinearAttention(32, 4, kv_heads, feature_map=fmap, chunk_size=4,
                           rope=RotaryEmbedding(10000.0, 8, 32) if rope else None, dtype=D64)
    x = torch.randn(2, 11, 32, dtype=D64)
    chunked = attn(x)
    torch.testing.assert_close(attn(x, form="parallel"), chunked, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(attn(x, form="recurrent"), chunked, rtol=1e-9, atol=1e-9)
    # prefixes: causal and independent of the sequence length
    torch.testing.assert_close(attn(x[:, :6]), chunked[:, :6], rtol=1e-9, atol=1e-9)


# --- Hyena ---------------------------------------------------------------------------------------
def test_fft_convolution_equals_direct_causal_convolution():
    torch.manual_seed(0)
    u, h = torch.randn(3, 5, 19, dtype=D64), torch.randn(5, 19, dtype=D64)
    loop = torch.zeros_like(u)
    for t in range(19):
        for j in range(t + 1):
            loop[..., t] += h[:, j] * u[..., t - j]
    torch.testing.assert_close(causal_conv_direct(u, h), loop, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(fft_causal_conv(u, h), loop, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_hyena_fft_path_equals_direct_path_and_is_causal(order):
    torch.manual_seed(0)
    op = HyenaOperator(16, 32, order=order, filter_dim=8, filter_emb_dim=5, dtype=D64)
    x = torch.randn(2, 20, 16, dtype=D64)
    y = op(x)
    torch.testing.assert_close(y, op(x, conv="direct"), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(op(x[:, :7]), y[:, :7], rtol=1e-9, atol=1e-9)  # prefix = same outputs
    x2 = x.clone()
    x2[:, 12:] = torch.randn(2, 8, 16, dtype=D64)
    torch.testing.assert_close(op(x2)[:, :12], y[:, :12], rtol=1e-9, atol=1e-9)
    assert not torch.allclose(op(x2)[:, 12:], y[:, 12:])
    h = op.filter_fn(32)
    assert h.shape == (order, 16, 32)
    # the decay window: late filter taps are much smaller than early ones
    assert h[..., -4:].abs().mean() < h[..., :4].abs().mean()
    with pytest.raises(ValueError, match="longer"):
        op(torch.randn(1, 33, 16, dtype=D64))


# --- mixture of experts -----------------------------------------------------------------------------
def moe_loop_reference(moe: MoE, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Token by token: top-k experts by router probability, gates (renormalised), capacity
    served in GShard's order (every token's first choice before any second choice)."""
    x2 = x.reshape(-1, x.shape[-1])
    n = x2.shape[0]
    probs = torch.softmax(x2 @ moe.router.weight.T, dim=-1)
    out = torch.zeros_like(x2)
    cap = moe.capacity(n)
    load = [0] * moe.num_experts
    dropped = 0
    choices = [torch.argsort(probs[t], descending=True)[:moe.top_k] for t in range(n)]
    for rank in range(moe.top_k):
        for t in range(n):
            e = int(choices[t][rank])
            if cap is not None and load[e] >= cap:
                dropped += 1
                continue
            load[e] += 1
            g = probs[t, e] / (probs[t, choices[t]].sum() if moe.renormalize and moe.top_k > 1 else 1.0)
            out[t] += g * moe.experts[e](x2[t:t + 1])[0]
    if moe.shared is not None:
        out = out + moe.shared(x2)
    return out.view(x.shape), dropped


@pytest.mark.parametrize("experts,top_k,capacity,renorm,shared", [
    (4, 1, None, True, 0), (4, 2, None, True, 0), (6, 3, None, False, 1), (4, 2, 0.5, True, 0), (5, 1, 0.8, True, 0),
])
def test_moe_grouped_equals_per_token_loop(experts, top_k, capacity, renorm, shared):
    torch.manual_seed(0)
    moe = MoE(16, 24, experts, top_k, capacity_factor=capacity, renormalize=renorm, shared_experts=shared, dtype=D64)
    x = torch.randn(3, 7, 16, dtype=D64)
    out = moe(x)
    ref, dropped = moe_loop_reference(moe, x)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    stats = moe.aux["stats"]
    assert stats["moe_dropped_tokens"] == dropped
    assert stats["moe_dropped_frac"] == pytest.approx(dropped / (21 * top_k))
    if capacity is not None:
        assert dropped > 0  # these capacities are below the load: something must be dropped


def test_moe_routing_respects_top_k():
    torch.manual_seed(1)
    moe = MoE(16, 24, 6, 2, dtype=D64)
    x = torch.randn(10, 16, dtype=D64)
    base = moe(x)
    _, _, _, index = moe.route(x)
    for e in range(6):  # changing an expert changes exactly the tokens routed to it
        with torch.no_grad():
            moe.experts[e].w2.weight.mul_(2.0)
        changed = (moe(x) - base).abs().amax(-1) > 1e-12
        with torch.no_grad():
            moe.experts[e].w2.weight.mul_(0.5)
        assert torch.equal(changed, (index == e).any(-1))
    assert index.shape == (10, 2) and (index[:, 0] != index[:, 1]).all()


def test_moe_with_one_expert_equals_the_dense_ffn():
    torch.manual_seed(0)
    dense = SwiGLU(16, 24, dtype=D64)
    moe = MoE(16, 24, num_experts=1, top_k=1, dtype=D64)
    moe.experts[0].load_state_dict(dense.state_dict())
    x = torch.randn(2, 5, 16, dtype=D64)
    torch.testing.assert_close(moe(x), dense(x), rtol=1e-12, atol=1e-12)
    # as a whole model, too: a one-expert MoE LM with the dense LM's weights gives its logits
    torch.manual_seed(0)
    lm = build_model(model_cfg())
    moe_lm = build_model(model_cfg("model/ffn=moe", "model.ffn.moe.num_experts=1", "model.ffn.moe.top_k=1"))
    sd = {k.replace(".ffn.experts.0.", ".ffn."): v for k, v in moe_lm.state_dict().items()}
    routers = {k: sd.pop(k) for k in list(sd) if k.endswith("ffn.router.weight")}
    sd.update({k: v for k, v in lm.state_dict().items() if ".ffn." in k})
    assert set(sd) == set(lm.state_dict()) and len(routers) == 2
    lm.load_state_dict(sd)
    moe_lm.load_state_dict({**{k.replace(".ffn.", ".ffn.experts.0.") if ".ffn." in k else k: v
                               for k, v in lm.state_dict().items()}, **routers})
    tokens = torch.randint(0, 97, (2, 12))
    torch.testing.assert_close(moe_lm(tokens), lm(tokens))


def test_moe_auxiliary_losses_on_a_hand_computed_case():
    # 4 tokens, 2 experts, top-1: logits chosen so that probabilities are easy
    logits = torch.log(torch.tensor([[0.75, 0.25], [0.5, 0.5], [0.25, 0.75], [0.875, 0.125]], dtype=D64))
    probs = logits.softmax(-1)
    index = probs.topk(1, dim=-1).indices  # ties go to the first expert: [0, 0, 1, 0]
    assert index[:, 0].tolist() == [0, 0, 1, 0]
    # f = (3/4, 1/4); P = mean probs = ((0.75+0.5+0.25+0.875)/4, (0.25+0.5+0.75+0.125)/4) = (0.59375, 0.40625)
    expected = 2 * (0.75 * 0.59375 + 0.25 * 0.40625)
    assert load_balancing_loss(probs, index, 2).item() == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(1.09375)
    # logits with log-sum-exp 0 (probabilities) give z-loss 0; shifted by 2 they give 4
    assert router_z_loss(logits).item() == pytest.approx(0.0, abs=1e-12)
    assert router_z_loss(logits + 2.0).item() == pytest.approx(4.0, rel=1e-12)
    # a uniform router has balance loss 1
    uniform = torch.full((6, 3), 1 / 3, dtype=D64)
    assert load_balancing_loss(uniform, torch.tensor([[0], [1], [2], [0], [1], [2]]), 3).item() == pytest.approx(1.0)


def test_moe_auxiliary_loss_reaches_the_model_and_router_gradient():
    torch.manual_seed(0)
    model = build_model(model_cfg("model=moe", "model/size=tiny", "model.ffn.moe.aux_loss_weight=0.5",
                                  "model.ffn.moe.z_loss_weight=0.1"))
    x = torch.randint(0, 97, (2, 16))
    model(x)
    aux, stats = model.auxiliary()
    layers = [layer.ffn for layer in model.layers]
    assert aux is not None and all(m.aux is None for m in layers)  # collected and cleared
    assert model.auxiliary() == (None, {})
    model(x)
    expected = sum(0.5 * m.aux["stats"]["moe_balance_loss"] + 0.1 * m.aux["stats"]["moe_router_z_loss"] for m in layers)
    mean_balance = sum(float(m.aux["stats"]["moe_balance_loss"]) for m in layers) / len(layers)
    aux, stats = model.auxiliary()
    torch.testing.assert_close(aux.detach(), expected)
    assert stats["moe_balance_loss"] == pytest.approx(mean_balance) and stats["moe_dropped_tokens"] == 0
    aux.backward()  # the auxiliary loss alone trains the routers
    assert all(m.router.weight.grad is not None and m.router.weight.grad.abs().sum() > 0 for m in layers)


# --- every variant: builds, is causal ------------------------------------------------------------------
VARIANTS = [["model=gqa"], ["model=mla"], ["model=mla", "model.attention.mla.q_lora_rank=16", "model/ffn=moe"],
            ["model=sliding_window", "model.attention.window=4"],
            ["model=sliding_window", "model/attention=local_global", "model.attention.window=4",
             "model.attention.impl=naive"],
            ["model=linear_attention", "model.attention.linear.chunk_size=8"], ["model=moe"],
            ["model=moe", "model.ffn.moe.shared_experts=1", "model.ffn.moe.top_k=1"], ["model=hyena"],
            ["model=hyena", "model/position=learned", "model/ffn=moe"]]


@pytest.mark.parametrize("overrides", VARIANTS, ids=lambda o: " ".join(o))
def test_every_variant_is_causal(overrides):
    torch.manual_seed(0)
    model = build_model(model_cfg(*overrides)).eval()
    x = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        full = model(x)
        for t in (1, 9, 19):
            changed = x.clone()
            changed[:, t:] = torch.randint(0, 97, changed[:, t:].shape)
            torch.testing.assert_close(model(changed)[:, :t], full[:, :t], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(model(x[:, :t]), full[:, :t], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(model(changed)[:, 19:], full[:, 19:])


@pytest.mark.slow
def test_variant_state_dict_keys():
    sd = build_model(model_cfg("model=mla", "model.attention.mla.q_lora_rank=16")).state_dict()
    attn = {k.split("attn.")[1] for k in sd if k.startswith("layers.0.attn.")}
    assert attn == {f"{n}.weight" for n in ("q_down_proj", "q_latent_norm", "q_up_proj", "kv_down_proj",
                                             "kv_latent_norm", "k_rope_proj", "k_up_proj", "v_up_proj", "output_proj")}
    assert sd["layers.0.attn.kv_down_proj.weight"].shape == (64, 64)  # kv rank 4·16
    sd = build_model(model_cfg("model=moe", "model.ffn.moe.shared_experts=2")).state_dict()
    ffn = {k.split("ffn.")[1] for k in sd if k.startswith("layers.1.ffn.")}
    assert ffn == ({"router.weight"} | {f"experts.{e}.{w}.weight" for e in range(8) for w in ("w1", "w2", "w3")}
                   | {f"shared.{w}.weight" for w in ("w1", "w2", "w3")})
    assert sd["layers.1.ffn.shared.w1.weight"].shape == (2 * 96, 64)  # 2 experts of d_ff/top_k = 192/2
    assert sd["layers.1.ffn.experts.3.w2.weight"].shape == (64, 96)
    sd = build_model(model_cfg("model=hyena")).state_dict()
    assert {k.split("attn.")[1] for k in sd if k.startswith("layers.0.attn.")} == {
        "in_proj.weight", "short_filter", "filter_fn.in_proj.weight", "filter_fn.in_proj.bias",
        "filter_fn.hidden.weight", "filter_fn.hidden.bias", "filter_fn.out_proj.weight", "filter_fn.freq",
        "filter_fn.skip", "output_proj.weight"}
    # the dense attention keys stay as they are for linear attention and windows
    for preset in ("linear_attention", "sliding_window", "gqa"):
        keys = {k for k in build_model(model_cfg(f"model={preset}")).state_dict() if k.startswith("layers.0.attn.")}
        assert keys == {f"layers.0.attn.{p}.weight" for p in ("q_proj", "k_proj", "v_proj", "output_proj")}
