"""Linear, Embedding, norms, activations, feed-forward and position layers, each against a
reference: torch.nn.functional, a direct formula (float64), or a hand-computed case."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lmrun.model import (
    MLP,
    Embedding,
    GatedFFN,
    LayerNorm,
    Linear,
    RMSNorm,
    RotaryEmbedding,
    SinusoidalPositionalEmbedding,
    SwiGLU,
    default_d_ff,
    gelu,
    relu,
    relu2,
    silu,
    sinusoidal_table,
)
from lmrun.model.ffn import build_ffn

RTOL, ATOL = 1e-5, 1e-6
TRUNC_STD = 0.98658  # std of N(0, 1) truncated at ±3


def close(a, b, rtol=RTOL, atol=ATOL):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


# --- Linear / Embedding ------------------------------------------------------------------------
def test_linear_matches_functional_and_stores_out_by_in():
    torch.manual_seed(0)
    lin = Linear(24, 40)
    assert lin.weight.shape == (40, 24) and lin.bias is None
    assert [k for k, _ in lin.named_parameters()] == ["weight"]
    x = torch.randn(3, 5, 24)
    close(lin(x), F.linear(x, lin.weight))
    lin_b = Linear(24, 40, bias=True)
    with torch.no_grad():
        lin_b.bias.normal_()
    close(lin_b(x), F.linear(x, lin_b.weight, lin_b.bias))


def test_linear_init_is_truncated_normal_with_glorot_std():
    torch.manual_seed(0)
    d_in, d_out = 512, 256
    w = Linear(d_in, d_out).weight.detach()
    std = math.sqrt(2 / (d_in + d_out))
    assert abs(w.std().item() / (std * TRUNC_STD) - 1) < 0.02
    assert w.abs().max().item() <= 3 * std + 1e-7
    assert abs(w.mean().item()) < 0.05 * std


def test_embedding_lookup_and_init():
    torch.manual_seed(0)
    emb = Embedding(1000, 128)
    assert emb.weight.shape == (1000, 128)
    w = emb.weight.detach()
    assert abs(w.std().item() / TRUNC_STD - 1) < 0.02 and w.abs().max().item() <= 3.0
    ids = torch.tensor([[0, 5, 999], [5, 5, 1]])
    close(emb(ids), F.embedding(ids, emb.weight))


def test_embedding_backward_is_deterministic_with_threads():
    """Repeated ids: the gradient rows are summed in a fixed order whatever the threads (advanced
    indexing's backward was not, which broke bit-exact resume), and equal F.embedding's."""
    torch.manual_seed(0)
    emb = Embedding(64, 32)
    ids = torch.randint(0, 64, (8, 256))
    upstream = torch.randn(8, 256, 32)
    threads = torch.get_num_threads()
    grads = []
    try:
        for n in (1, 2, 2, 2):
            torch.set_num_threads(n)
            emb.weight.grad = None
            emb(ids).backward(upstream)
            grads.append(emb.weight.grad.clone())
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(g, grads[1]) for g in grads[2:])
    w = emb.weight.detach().clone().requires_grad_()
    F.embedding(ids, w).backward(upstream)
    close(grads[0], w.grad)


# --- norms -------------------------------------------------------------------------------------
def test_rmsnorm_matches_formula_and_functional():
    torch.manual_seed(0)
    norm = RMSNorm(32, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(4, 7, 32) * 3
    xd, wd = x.double(), norm.weight.double()
    expected = xd / torch.sqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-5) * wd
    close(norm(x).double(), expected, rtol=1e-6, atol=1e-6)
    close(norm(x), F.rms_norm(x, (32,), norm.weight, eps=1e-5))


def test_rmsnorm_backward_matches_autograd_of_the_formula():
    torch.manual_seed(0)
    norm = RMSNorm(24, eps=1e-5, dtype=torch.float64)
    with torch.no_grad():
        norm.weight.normal_()
    x = (torch.randn(2, 5, 24, dtype=torch.float64) * 3).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, w: norm_fn(a, w), (x, norm.weight))
    g = torch.randn_like(x)
    norm(x).backward(g)
    gx, gw = x.grad.clone(), norm.weight.grad.clone()
    x.grad = None
    w = norm.weight.detach().clone().requires_grad_()
    (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w).backward(g)
    close(gx, x.grad, rtol=1e-10, atol=1e-10)
    close(gw, w.grad, rtol=1e-10, atol=1e-10)


def norm_fn(x, w):
    from lmrun.model.norms import _RMSNormFunction

    return _RMSNormFunction.apply(x, w, 1e-5)


def test_rmsnorm_computes_in_float32_and_casts_back():
    torch.manual_seed(0)
    norm = RMSNorm(16)
    x = (torch.randn(3, 16) * 100).bfloat16()
    y = norm(x)
    assert y.dtype == torch.bfloat16
    xf = x.float()
    expected = (xf / torch.sqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).bfloat16()
    assert torch.equal(y, expected)


def test_layernorm_matches_functional():
    torch.manual_seed(0)
    norm = LayerNorm(48, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(2, 9, 48) * 5 + 3
    close(norm(x), F.layer_norm(x, (48,), norm.weight, norm.bias, eps=1e-5))
    assert sorted(dict(norm.named_parameters())) == ["bias", "weight"]


def test_norm_hand_computed():
    x = torch.tensor([[3.0, 4.0]])
    # RMS of (3, 4) is sqrt(12.5); LayerNorm: mean 3.5, var 0.25 -> (-1, 1)
    close(RMSNorm(2, eps=0.0)(x), torch.tensor([[3 / math.sqrt(12.5), 4 / math.sqrt(12.5)]]))
    close(LayerNorm(2, eps=0.0)(x), torch.tensor([[-1.0, 1.0]]))


# --- activations and feed-forward --------------------------------------------------------------
def test_activations_match_functional():
    x = torch.linspace(-8, 8, 1001)
    close(silu(x), x * torch.sigmoid(x))
    close(gelu(x), F.gelu(x))
    close(relu(x), F.relu(x))
    close(relu2(x), F.relu(x) ** 2)
    assert gelu(torch.tensor([1.0])).item() == pytest.approx(0.5 * (1 + math.erf(1 / math.sqrt(2))), rel=1e-6)


def test_swiglu_matches_formula():
    torch.manual_seed(0)
    ffn = SwiGLU(32, 64)
    assert ffn.w1.weight.shape == (64, 32) and ffn.w3.weight.shape == (64, 32) and ffn.w2.weight.shape == (32, 64)
    x = torch.randn(2, 5, 32)
    expected = F.linear(F.silu(F.linear(x, ffn.w1.weight)) * F.linear(x, ffn.w3.weight), ffn.w2.weight)
    close(ffn(x), expected)
    assert sorted(ffn.state_dict()) == ["w1.weight", "w2.weight", "w3.weight"]


@pytest.mark.parametrize("kind,act", [("gelu", F.gelu), ("relu", F.relu), ("silu", F.silu),
                                      ("relu2", lambda t: F.relu(t) ** 2)])
def test_ungated_mlps_match_formula(kind, act):
    torch.manual_seed(0)
    ffn = build_ffn(kind, 32, 96)
    assert isinstance(ffn, MLP) and sorted(ffn.state_dict()) == ["w1.weight", "w2.weight"]
    x = torch.randn(3, 32)
    close(ffn(x), F.linear(act(F.linear(x, ffn.w1.weight)), ffn.w2.weight))


def test_geglu_and_biases():
    torch.manual_seed(0)
    ffn = build_ffn("geglu", 16, 32, bias=True)
    assert isinstance(ffn, GatedFFN)
    for lin in (ffn.w1, ffn.w2, ffn.w3):
        with torch.no_grad():
            lin.bias.normal_()
    x = torch.randn(4, 16)
    h = F.gelu(F.linear(x, ffn.w1.weight, ffn.w1.bias)) * F.linear(x, ffn.w3.weight, ffn.w3.bias)
    close(ffn(x), F.linear(h, ffn.w2.weight, ffn.w2.bias))


def test_default_d_ff():
    assert default_d_ff(512, "swiglu") == 1344  # CS336 assignment 1: 8/3 * 512 = 1365.3 -> 1344
    assert default_d_ff(768, "swiglu") == 2048
    assert default_d_ff(64, "swiglu") == 192
    assert default_d_ff(16, "geglu") == 64
    assert default_d_ff(512, "silu") == 2048 and default_d_ff(100, "gelu") == 400
    assert build_ffn("swiglu", 512).w1.weight.shape == (1344, 512)


# --- positions ---------------------------------------------------------------------------------
def rope_reference(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Apply the RoPE block-diagonal rotation matrix R(p) token by token (float64)."""
    d = x.shape[-1]
    out = torch.empty_like(x, dtype=torch.float64)
    flat_x = x.double().reshape(-1, x.shape[-2], d)
    flat_p = positions.expand(x.shape[:-1]).reshape(-1, x.shape[-2])
    out = out.reshape(-1, x.shape[-2], d)
    for b in range(flat_x.shape[0]):
        for i in range(flat_x.shape[1]):
            p = int(flat_p[b, i])
            R = torch.zeros(d, d, dtype=torch.float64)
            for k in range(d // 2):
                a = p * theta ** (-2 * k / d)
                R[2 * k:2 * k + 2, 2 * k:2 * k + 2] = torch.tensor([[math.cos(a), -math.sin(a)],
                                                                   [math.sin(a), math.cos(a)]])
            out[b, i] = R @ flat_x[b, i]
    return out.reshape(x.shape)


def test_rope_matches_rotation_matrices_for_arbitrary_positions():
    torch.manual_seed(0)
    rope = RotaryEmbedding(theta=10000.0, d_k=8, max_seq_len=64)
    x = torch.randn(2, 3, 5, 8)  # (batch, heads, seq, d_k)
    positions = torch.tensor([[7, 0, 63, 2, 2], [1, 40, 3, 9, 11]]).unsqueeze(1)  # (batch, 1, seq)
    close(rope(x, positions).double(), rope_reference(x, positions, 10000.0), rtol=1e-5, atol=1e-5)
    # a different theta changes the rotation
    rope2 = RotaryEmbedding(theta=500.0, d_k=8, max_seq_len=64)
    close(rope2(x, positions).double(), rope_reference(x, positions, 500.0), rtol=1e-5, atol=1e-5)


def test_rope_real_arithmetic_form_under_compile_matches(monkeypatch):
    """Under torch.compile the rotation is written without complex numbers (Inductor has no
    complex kernels); same values and gradients as the eager complex multiply."""
    torch.manual_seed(0)
    rope = RotaryEmbedding(theta=10000.0, d_k=8, max_seq_len=64)
    positions = torch.tensor([[7, 0, 63, 2, 2], [1, 40, 3, 9, 11]]).unsqueeze(1)
    x = torch.randn(2, 3, 5, 8, requires_grad=True)
    eager = rope(x, positions)
    (g_eager,) = torch.autograd.grad(eager.square().sum(), x)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    real = rope(x, positions)
    (g_real,) = torch.autograd.grad(real.square().sum(), x)
    close(real, eager, rtol=1e-6, atol=1e-6)
    close(g_real, g_eager, rtol=1e-5, atol=1e-5)
    close(real.double(), rope_reference(x.detach(), positions, 10000.0), rtol=1e-5, atol=1e-5)


def test_rope_hand_computed_and_relative():
    rope = RotaryEmbedding(theta=10000.0, d_k=2, max_seq_len=4)
    y = rope(torch.tensor([[1.0, 0.0]]), torch.tensor([1]))
    close(y, torch.tensor([[math.cos(1.0), math.sin(1.0)]]))
    torch.manual_seed(0)
    rope = RotaryEmbedding(theta=10000.0, d_k=16, max_seq_len=128)
    q, k = torch.randn(16), torch.randn(16)
    dot = lambda m, n: (rope(q[None], torch.tensor([m])) * rope(k[None], torch.tensor([n]))).sum()
    close(dot(5, 2), dot(105, 102), rtol=1e-4, atol=1e-5)  # depends on m - n only
    assert rope(q[None], torch.tensor([3])).norm().item() == pytest.approx(q.norm().item(), rel=1e-6)


def test_rope_tables_are_not_in_state_dict_and_odd_dim_fails():
    assert RotaryEmbedding(10000.0, 8, 16).state_dict() == {}
    with pytest.raises(ValueError, match="even"):
        RotaryEmbedding(10000.0, 7, 16)


def test_sinusoidal_table_matches_formula():
    table = sinusoidal_table(10, 6)
    for p in range(10):
        for i in range(3):
            assert table[p, 2 * i].item() == pytest.approx(math.sin(p / 10000 ** (2 * i / 6)), abs=1e-6)
            assert table[p, 2 * i + 1].item() == pytest.approx(math.cos(p / 10000 ** (2 * i / 6)), abs=1e-6)
    close(table[0], torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0, 1.0]))
    assert sinusoidal_table(4, 5).shape == (4, 5)  # odd width
    emb = SinusoidalPositionalEmbedding(10, 6)
    assert emb.state_dict() == {} and list(emb.parameters()) == []
    close(emb(torch.tensor([3, 1])), table[[3, 1]])


def test_dropout_drops_p_scales_the_rest_and_masks_the_gradient():
    from lmrun.model.layers import Dropout

    torch.manual_seed(0)
    drop = Dropout(0.25)
    x = torch.ones(400, 500, requires_grad=True)
    y = drop(x)
    assert abs(float((y == 0).float().mean()) - 0.25) < 0.005  # 200k draws: sd 0.001
    assert torch.all((y == 0) | (y == 1 / 0.75))
    y.backward(torch.full_like(y, 2.0))
    torch.testing.assert_close(x.grad, 2.0 * y.detach())  # gradient through kept elements only, same scale
    torch.manual_seed(0)
    assert torch.equal(drop(x), y)  # seeded like every other draw
    drop.eval()
    assert drop(x) is x
    drop.train()
    drop.p = 0.0
    assert drop(x) is x and isinstance(drop, torch.nn.Dropout)


def test_dropout_mask_is_uniform_in_every_lane_and_quantizes_p():
    from lmrun.model.layers import dropout_mask

    torch.manual_seed(1)
    m = dropout_mask((1001, 403), 0.1, torch.float32)  # numel not a multiple of 4
    assert m.shape == (1001, 403) and m.dtype == torch.float32
    p = round(0.1 * 65536) / 65536
    assert m.unique().tolist() == [0.0, pytest.approx(1 / (1 - p))]
    # each of the four 16-bit lanes of a 64-bit draw drops p of its elements (sd ~0.0009 here)
    lanes = (m.flatten()[: 1001 * 400] == 0).float().view(-1, 4).mean(0)
    assert torch.all((lanes - 0.1).abs() < 0.005), lanes
    assert dropout_mask((3, 5), 0.5, torch.bfloat16).dtype == torch.bfloat16
