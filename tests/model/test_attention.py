"""softmax, scaled_dot_product_attention and causal multi-head self-attention (MHA, GQA, MQA,
QK-norm, RoPE, naive and sdpa paths) against torch.nn.functional and hand-computed cases."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lmrun.model import MultiHeadSelfAttention, RotaryEmbedding, scaled_dot_product_attention, softmax


def close(a, b, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def test_softmax_matches_torch_and_is_stable():
    torch.manual_seed(0)
    x = torch.randn(3, 4, 10) * 5
    for dim in (0, 1, -1):
        close(softmax(x, dim), torch.softmax(x, dim))
    big = x * 200 + 1e4  # exp(1e4) overflows float32 without the max shift
    assert not torch.isfinite(torch.exp(big)).all()
    y = softmax(big, -1)
    assert torch.isfinite(y).all()
    close(y, torch.softmax(big, -1))
    hand = softmax(torch.tensor([1000.0, 1000.0 + math.log(3.0)], dtype=torch.float64), -1)
    close(hand, torch.tensor([0.25, 0.75], dtype=torch.float64), rtol=1e-12, atol=1e-12)
    masked = torch.tensor([0.0, float("-inf"), 0.0])
    close(softmax(masked, -1), torch.tensor([0.5, 0.0, 0.5]))


def test_sdpa_hand_computed():
    Q = torch.tensor([[1.0, 0.0]])
    K = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    V = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    p = math.exp(1 / math.sqrt(2)) / (math.exp(1 / math.sqrt(2)) + 1)  # scores (1/sqrt 2, 0)
    close(scaled_dot_product_attention(Q, K, V), torch.tensor([[p * 1 + (1 - p) * 3, p * 2 + (1 - p) * 4]]))
    # masking the first key leaves only the second value
    close(scaled_dot_product_attention(Q, K, V, torch.tensor([[False, True]])), torch.tensor([[3.0, 4.0]]))


def test_sdpa_matches_functional_with_causal_and_arbitrary_masks():
    torch.manual_seed(0)
    Q, K, V = torch.randn(2, 3, 6, 8), torch.randn(2, 3, 6, 8), torch.randn(2, 3, 6, 5)
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    close(scaled_dot_product_attention(Q, K, V, causal), F.scaled_dot_product_attention(Q, K, V, is_causal=True))
    close(scaled_dot_product_attention(Q, K, V), F.scaled_dot_product_attention(Q, K, V))
    mask = torch.rand(2, 3, 6, 6) > 0.5
    mask[..., 0] = True  # every row attends somewhere
    close(scaled_dot_product_attention(Q, K, V, mask), F.scaled_dot_product_attention(Q, K, V, attn_mask=mask))
    # different query and key lengths
    close(scaled_dot_product_attention(Q[..., :2, :], K, V), F.scaled_dot_product_attention(Q[..., :2, :], K, V))


def reference_attention(attn: MultiHeadSelfAttention, x: torch.Tensor, positions: torch.Tensor | None = None,
                        theta: float | None = None) -> torch.Tensor:
    """Causal MHA from F.linear, explicit RoPE/RMS formulas, repeat_interleave and F.sdpa."""
    b, s, d = x.shape
    h, kvh, d_k = attn.num_heads, attn.n_kv_heads, attn.d_k
    q = F.linear(x, attn.q_proj.weight).view(b, s, h, d_k).transpose(1, 2)
    k = F.linear(x, attn.k_proj.weight).view(b, s, kvh, d_k).transpose(1, 2)
    v = F.linear(x, attn.v_proj.weight).view(b, s, kvh, d_k).transpose(1, 2)
    if attn.q_norm is not None:
        q = F.rms_norm(q, (d_k,), attn.q_norm.weight, eps=1e-5)
        k = F.rms_norm(k, (d_k,), attn.k_norm.weight, eps=1e-5)
    if theta is not None:
        pos = (positions if positions is not None else torch.arange(s)).double()
        inv = theta ** (-torch.arange(0, d_k, 2, dtype=torch.float64) / d_k)
        ang = pos[..., None] * inv  # (s, d_k/2) or (b, s, d_k/2)
        if ang.dim() == 3:
            ang = ang[:, None]
        cos, sin = torch.cos(ang).float(), torch.sin(ang).float()

        def rot(t):
            t1, t2 = t[..., 0::2], t[..., 1::2]
            return torch.stack((t1 * cos - t2 * sin, t1 * sin + t2 * cos), -1).flatten(-2)

        q, k = rot(q), rot(k)
    k = k.repeat_interleave(h // kvh, dim=1)
    v = v.repeat_interleave(h // kvh, dim=1)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return F.linear(out.transpose(1, 2).reshape(b, s, d), attn.output_proj.weight)


@pytest.mark.parametrize("impl", ["naive", "sdpa"])
@pytest.mark.parametrize("n_kv_heads", [None, 2, 1])  # MHA, GQA, MQA
@pytest.mark.parametrize("use_rope,qk_norm", [(False, False), (True, False), (True, True)])
def test_attention_matches_reference(impl, n_kv_heads, use_rope, qk_norm):
    torch.manual_seed(0)
    d, h, s = 32, 4, 7
    attn = MultiHeadSelfAttention(d, h, n_kv_heads, theta=10000.0 if use_rope else None,
                                  max_seq_len=16, impl=impl, qk_norm=qk_norm)
    if qk_norm:
        with torch.no_grad():
            attn.q_norm.weight.normal_()
            attn.k_norm.weight.normal_()
    kv = n_kv_heads or h
    assert attn.k_proj.weight.shape == (kv * d // h, d) and attn.q_proj.weight.shape == (d, d)
    x = torch.randn(2, s, d)
    positions = torch.tensor([[3, 4, 5, 6, 7, 8, 9], [0, 2, 4, 6, 8, 10, 12]])
    theta = 10000.0 if use_rope else None
    close(attn(x), reference_attention(attn, x, None, theta))
    close(attn(x, positions), reference_attention(attn, x, positions, theta))


def test_naive_and_sdpa_paths_agree_and_leading_dims():
    torch.manual_seed(0)
    a = MultiHeadSelfAttention(32, 8, 2, theta=10000.0, max_seq_len=16, impl="naive")
    b = MultiHeadSelfAttention(32, 8, 2, theta=10000.0, max_seq_len=16, impl="sdpa")
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 9, 32)
    close(a(x), b(x))
    close(a(x)[1, 2], a(x[1, 2][None])[0])


def test_rope_attention_is_shift_invariant():
    """RoPE makes attention depend on relative positions only: shifting every position by a
    constant leaves the output unchanged, while a non-uniform change alters it."""
    torch.manual_seed(0)
    attn = MultiHeadSelfAttention(32, 4, rope=RotaryEmbedding(10000.0, 8, 64))
    x = torch.randn(1, 6, 32)
    base = attn(x, torch.arange(6))
    close(attn(x, torch.arange(6) + 20), base, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(attn(x, torch.tensor([0, 1, 2, 3, 4, 9])), base, atol=1e-4)


def test_attention_rejects_bad_head_counts():
    with pytest.raises(ValueError, match="divisible"):
        MultiHeadSelfAttention(30, 4)
    with pytest.raises(ValueError, match="n_kv_heads"):
        MultiHeadSelfAttention(32, 4, 3)
