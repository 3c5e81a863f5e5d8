"""Cached decoding equals full recomputation, for every mixer with a cache and mixed prompt lengths."""
from __future__ import annotations

import pytest
import torch

from lmrun.inference import kv_cache
from lmrun.inference.kv_cache import InferenceCache, forward_cached, supports_cache
from lmrun.model.transformer import TransformerLM
from lmrun.model.variants import HyenaConfig, LinearAttentionConfig, MLAConfig

VOCAB = 37

VARIANTS = {
    "mha": dict(),
    "gqa": dict(n_kv_heads=2),
    "mqa": dict(n_kv_heads=1),
    "qk_norm_bias": dict(qk_norm=True, bias=True),
    "sliding_window": dict(windows=[3, 3]),
    "local_global": dict(windows=[4, None], n_kv_heads=2),
    "mla": dict(attention_kind="mla", mla=MLAConfig(kv_lora_rank=12, q_lora_rank=0, rope_head_dim=4)),
    "mla_qlatent_bias": dict(attention_kind="mla", bias=True, mla=MLAConfig(kv_lora_rank=12, q_lora_rank=8)),
    "linear": dict(attention_kind="linear", linear=LinearAttentionConfig(chunk_size=4)),
    "linear_gqa_nope": dict(attention_kind="linear", n_kv_heads=2, position="none"),
    "learned_post_norm": dict(position="learned", norm="layernorm", norm_placement="post"),
    "sinusoidal_softcap": dict(position="sinusoidal", logit_softcap=5.0),
    "moe": dict(ffn="moe"),
    "geglu_gqa": dict(ffn="geglu", n_kv_heads=2),
    "mlp_relu2_no_norm": dict(ffn="relu2", norm="none"),
    "mlp_gelu_bias_nope": dict(ffn="gelu", bias=True, position="none"),
    "tied_no_final_norm": dict(tie_embeddings=True, final_norm=False, n_kv_heads=2),
    "tied_layernorm": dict(tie_embeddings=True, norm="layernorm"),
}


def tiny(seed: int = 0, **kw) -> TransformerLM:
    torch.manual_seed(seed)
    model = TransformerLM(VOCAB, 32, 16, 2, 4, 32, **kw).double().eval()
    for p in model.parameters():  # larger weights than init: attention patterns far from uniform
        p.data.mul_(2.0)
    return model


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_cached_logits_equal_recomputation_mixed_lengths(name, fuse, monkeypatch):
    """Both decode paths: q/k/v and w1/w3 weights concatenated (small models) or not."""
    monkeypatch.setattr(kv_cache, "FUSE_MAX_BYTES", 2**40 if fuse else 0)
    model = tiny(**VARIANTS[name])
    lengths = [5, 1, 9]
    gen = torch.Generator().manual_seed(1)
    rows = [torch.randint(0, VOCAB, (n + 6,), generator=gen) for n in lengths]  # prompt + 6 decoded tokens
    L = max(lengths)
    pad = torch.tensor([L - n for n in lengths])
    prompt = torch.zeros(3, L, dtype=torch.long)
    for i, n in enumerate(lengths):
        prompt[i, L - n:] = rows[i][:n]
    cache = InferenceCache(model, 3, L + 6, pad)
    got = [forward_cached(model, prompt, cache)]
    for t in range(6):
        got.append(forward_cached(model, torch.stack([r[lengths[i] + t] for i, r in enumerate(rows)])[:, None], cache))
    for i, n in enumerate(lengths):
        ref = model(rows[i][None])[0]  # (n + 6, vocab), the row alone, no padding
        cached = torch.cat([got[0][i, L - n:]] + [g[i] for g in got[1:]])  # logits after each of its tokens
        torch.testing.assert_close(cached, ref, atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("name", ["mha", "sliding_window", "mla"])
def test_chunked_prefill_and_truncate(name):
    """Feeding tokens in chunks of different sizes, and rolling back, gives the same logits."""
    model = tiny(**VARIANTS[name])
    ids = torch.randint(0, VOCAB, (2, 14), generator=torch.Generator().manual_seed(3))
    ref = model(ids)
    cache = InferenceCache(model, 2, 14, slack=4)
    out = [forward_cached(model, ids[:, :4], cache), forward_cached(model, ids[:, 4:7], cache)]
    forward_cached(model, ids[:, 7:10], cache)  # speculative tokens, then rolled back
    cache.truncate(7)
    out += [forward_cached(model, ids[:, 7:8], cache), forward_cached(model, ids[:, 8:], cache)]
    torch.testing.assert_close(torch.cat(out, dim=1), ref, atol=1e-10, rtol=1e-9)


def test_ring_buffer_is_bounded_by_window_and_refuses_deep_rollback():
    model = tiny(windows=[3, 3])
    cache = InferenceCache(model, 1, 30, slack=2)
    assert cache.layers[0]["k"].shape[2] == 5  # window + slack, not the capacity
    forward_cached(model, torch.zeros(1, 10, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="slack"):
        cache.truncate(7)


def test_recurrent_state_is_constant_size_and_not_rollbackable():
    model = tiny(**VARIANTS["linear"])
    cache = InferenceCache(model, 1, 30)
    before = cache.nbytes()
    forward_cached(model, torch.zeros(1, 10, dtype=torch.long), cache)
    assert cache.nbytes() == before
    with pytest.raises(ValueError, match="rolled back"):
        cache.truncate(5)


def test_hyena_has_no_cache():
    model = tiny(attention_kind="hyena", position="none", hyena=HyenaConfig(filter_dim=8, filter_emb_dim=5))
    assert not supports_cache(model)
    with pytest.raises(ValueError, match="Hyena"):
        InferenceCache(model, 1, 8)


def test_mla_cache_holds_only_latent_and_rope_key():
    model = tiny(**VARIANTS["mla"])
    cache = InferenceCache(model, 2, 10)
    per_token = sum(e["c"].shape[-1] + e["kr"].shape[-1] for e in cache.layers)
    assert per_token == 2 * (12 + 4)
    assert cache.nbytes() == 2 * 10 * per_token * 8


@pytest.mark.parametrize("name", ["mha", "gqa", "qk_norm_bias", "local_global", "mla"])
def test_float32_and_bfloat16_decoding_close_to_recomputation(name):
    """float32 takes the in-place fast path, bfloat16 the generic one (RMSNorm's own module). (MLA's
    absorbed form rounds differently from its training form in bfloat16: float32 only.)"""
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 0.05)):
        if name == "mla" and dtype == torch.bfloat16:
            continue
        model = tiny(**VARIANTS[name]).to(dtype)
        ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(5))
        with torch.no_grad():
            ref = model(ids).float()
        cache = InferenceCache(model, 2, 12)
        got = [forward_cached(model, ids[:, :7], cache)] + [forward_cached(model, ids[:, t:t + 1], cache)
                                                           for t in range(7, 12)]
        got = torch.cat(got, dim=1).float()
        assert float((got - ref).abs().max()) <= tol * float(ref.abs().max()), dtype


def test_mha_cache_bytes_and_full_cache_errors():
    model = tiny(n_kv_heads=2)  # d_k = 4, 2 layers, float64
    cache = InferenceCache(model, 3, 10)
    assert cache.layers[0]["k"].shape == (3, 2, 10, 4)  # views of one (batch, capacity, 2·kv heads, d_k) tensor
    assert cache.nbytes() == 2 * 3 * 10 * (2 * 2 * 4) * 8
    forward_cached(model, torch.zeros(3, 8, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="holds 10 slots; 11"):
        forward_cached(model, torch.zeros(3, 3, dtype=torch.long), cache)
    ring = InferenceCache(tiny(windows=[3, 3]), 1, 4)
    forward_cached(ring_model := tiny(windows=[3, 3]), torch.zeros(1, 4, dtype=torch.long), ring)
    with pytest.raises(ValueError, match="holds 4 slots"):
        forward_cached(ring_model, torch.zeros(1, 1, dtype=torch.long), ring)


@pytest.mark.parametrize("fuse", [True, False])
def test_decode_paths_taken(fuse, monkeypatch):
    """The equality tests above run both residual forms: doubled ([x, -x]: fused Llama-style
    models) and plain (everything else, and every model without fusion)."""
    monkeypatch.setattr(kv_cache, "FUSE_MAX_BYTES", 2**40 if fuse else 0)
    for name, doubled in (("mha", fuse), ("local_global", fuse), ("geglu_gqa", fuse), ("qk_norm_bias", False),
                          ("learned_post_norm", False), ("mla", False), ("moe", False), ("mlp_relu2_no_norm", False)):
        model = tiny(**VARIANTS[name])
        cache = InferenceCache(model, 1, 4)
        forward_cached(model, torch.zeros(1, 2, dtype=torch.long), cache)
        assert cache._plan.doubled == doubled, name


@pytest.mark.parametrize("name", ["mha", "mla", "learned_post_norm"])
def test_cache_longer_than_the_context_stops_at_the_context(name):
    model = tiny(**VARIANTS[name])  # context_length 32
    cache = InferenceCache(model, 2, 40, pad=torch.tensor([0, 3]))
    forward_cached(model, torch.zeros(2, 31, dtype=torch.long), cache)
    forward_cached(model, torch.zeros(2, 1, dtype=torch.long), cache)  # position 31 in row 0
    with pytest.raises(ValueError, match="beyond context_length=32"):
        forward_cached(model, torch.zeros(2, 1, dtype=torch.long), cache)


@pytest.mark.parametrize("name", ["mha", "sliding_window", "mla", "linear"])
def test_reset_cache_equals_a_fresh_one(name):
    model = tiny(**VARIANTS[name])
    gen = torch.Generator().manual_seed(7)
    first, second = torch.randint(0, VOCAB, (1, 12), generator=gen), torch.randint(0, VOCAB, (1, 9), generator=gen)
    cache = InferenceCache(model, 1, 12, slack=2)
    forward_cached(model, first, cache)
    cache.reset()
    got = torch.cat([forward_cached(model, second[:, :5], cache), forward_cached(model, second[:, 5:], cache)], dim=1)
    torch.testing.assert_close(got, model(second), atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("name", ["mha", "gqa", "mla"])
def test_int8_model_cached_equals_its_recomputation(name):
    """Int8 linears are called as modules (float32 input, strided views included), batch of 3."""
    from lmrun.inference.quantize import quantize_int8

    model = quantize_int8(tiny(**VARIANTS[name]).float())
    lengths = [5, 1, 9]
    gen = torch.Generator().manual_seed(2)
    rows = [torch.randint(0, VOCAB, (n + 4,), generator=gen) for n in lengths]
    L = max(lengths)
    prompt = torch.zeros(3, L, dtype=torch.long)
    for i, n in enumerate(lengths):
        prompt[i, L - n:] = rows[i][:n]
    cache = InferenceCache(model, 3, L + 4, torch.tensor([L - n for n in lengths]))
    got = [forward_cached(model, prompt, cache)]
    for t in range(4):
        got.append(forward_cached(model, torch.stack([r[lengths[i] + t] for i, r in enumerate(rows)])[:, None], cache))
    with torch.no_grad():
        for i, n in enumerate(lengths):
            ref = model(rows[i][None])[0]
            cached = torch.cat([got[0][i, L - n:]] + [g[i] for g in got[1:]])
            torch.testing.assert_close(cached, ref, atol=1e-4 * float(ref.abs().max()), rtol=1e-4)
