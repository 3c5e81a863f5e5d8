"""FlashAttention-2 (PyTorch and Triton) against the naive reference: outputs, the saved
log-sum-exp L and the gradients of Q, K and V, causal and not, lengths that are not multiples of
the tiles, n_queries != n_keys, leading dims, low precision; fully masked tiles are skipped; the
Triton kernels run under TRITON_INTERPRET=1."""
from __future__ import annotations

import math

import pytest
import torch

from lmrun.errors import LmrunError
from lmrun.kernels import FlashAttentionTorch, attention_reference, flash_attention
from lmrun.kernels.flash_attention_triton import FlashAttentionTriton

# (leading dims, n_queries, n_keys, d, q_tile, k_tile)
SHAPES = [
    ((2,), 37, 53, 24, 16, 16),   # neither length a multiple of the tiles; d not a power of two
    ((2,), 64, 40, 16, 32, 16),   # more queries than keys; different tile sizes
    ((1, 2), 50, 50, 32, 16, 32),  # two leading dims, square
    ((1,), 1, 19, 16, 16, 16),     # a single query
]


def inputs(lead, nq, nk, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    Q = torch.randn(*lead, nq, d, generator=g).to(dtype).requires_grad_()
    K = torch.randn(*lead, nk, d, generator=g).to(dtype).requires_grad_()
    V = torch.randn(*lead, nk, d, generator=g).to(dtype).requires_grad_()
    dO = torch.randn(*lead, nq, d, generator=g).to(dtype)
    return Q, K, V, dO


def run(fn, Q, K, V, dO):
    for t in (Q, K, V):
        t.grad = None
    O = fn(Q, K, V)
    L = O.grad_fn.saved_tensors[-1] if hasattr(O.grad_fn, "saved_tensors") else None
    O.backward(dO)
    return O.detach(), L, [t.grad.clone() for t in (Q, K, V)]


def reference(Q, K, V, dO, is_causal):
    q, k, v = (t.detach().double().requires_grad_() for t in (Q, K, V))
    O, L = attention_reference(q, k, v, is_causal)
    O.backward(dO.double())
    return O.detach(), L.detach(), [q.grad, k.grad, v.grad]


def assert_matches(impl, Q, K, V, dO, is_causal, atol, rtol=0.0):
    O_ref, L_ref, grads_ref = reference(Q, K, V, dO, is_causal)
    O, L, grads = run(impl, Q, K, V, dO)
    assert O.dtype == Q.dtype and O.shape == Q.shape
    torch.testing.assert_close(O.double(), O_ref, atol=atol, rtol=rtol)
    assert L.dtype == torch.float32 and L.shape == (math.prod(Q.shape[:-2]), Q.shape[-2])
    torch.testing.assert_close(L.double(), L_ref.reshape(L.shape), atol=atol, rtol=rtol)
    for name, g, g_ref in zip("QKV", grads, grads_ref):
        assert g.dtype == Q.dtype and g.shape == g_ref.shape, name
        torch.testing.assert_close(g.double(), g_ref, atol=atol, rtol=rtol, msg=lambda m: f"d{name}: {m}")


def test_reference_is_softmax_attention_and_logsumexp():
    Q, K, V, _ = inputs((3,), 5, 7, 8)
    S = Q @ K.transpose(-1, -2) / math.sqrt(8)
    O, L = attention_reference(Q, K, V)
    torch.testing.assert_close(O, torch.softmax(S, -1) @ V)
    torch.testing.assert_close(L, torch.logsumexp(S, -1))
    Oc, _ = attention_reference(Q, K, V, is_causal=True)
    torch.testing.assert_close(Oc, torch.nn.functional.scaled_dot_product_attention(Q, K, V, is_causal=True))


@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}x{s[2]}x{s[3]}")
def test_flash_torch_matches_reference(shape, is_causal):
    lead, nq, nk, d, qt, kt = shape
    Q, K, V, dO = inputs(lead, nq, nk, d)
    assert_matches(lambda q, k, v: FlashAttentionTorch.apply(q, k, v, is_causal, qt, kt), Q, K, V, dO, is_causal,
                   atol=2e-5)


@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}x{s[2]}x{s[3]}")
def test_flash_triton_matches_reference(interpret, shape, is_causal):
    lead, nq, nk, d, qt, kt = shape
    Q, K, V, dO = inputs(lead, nq, nk, d)
    assert_matches(lambda q, k, v: FlashAttentionTriton.apply(q, k, v, is_causal, qt, kt), Q, K, V, dO, is_causal,
                   atol=2e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_flash_low_precision_inputs(interpret, dtype):
    """bf16/fp16 inputs: output and gradients in the input dtype, within that dtype's rounding
    of the float64 reference on the rounded inputs (accumulation in float32)."""
    Q, K, V, dO = inputs((2,), 40, 40, 32, dtype=dtype)
    atol = 3e-2 if dtype == torch.bfloat16 else 5e-3
    for fn in (FlashAttentionTorch.apply, FlashAttentionTriton.apply):
        assert_matches(lambda q, k, v: fn(q, k, v, True), Q, K, V, dO, True, atol=atol, rtol=2e-2)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_causal_skips_fully_masked_tiles(interpret, impl):
    """Keys no query may see (n_keys > n_queries, causal) sit in tiles that are never read: NaNs
    there would poison O (0 · NaN) and the gradients if they were."""
    Q, K, V, dO = inputs((2,), 32, 64, 16)
    with torch.no_grad():
        K[:, 32:] = float("nan")
        V[:, 32:] = float("nan")
    fn = FlashAttentionTorch.apply if impl == "torch" else FlashAttentionTriton.apply
    O, _, (dQ, dK, dV) = run(lambda q, k, v: fn(q, k, v, True, 16, 16), Q, K, V, dO)
    assert torch.isfinite(O).all() and torch.isfinite(dQ).all()
    assert torch.isfinite(dK[:, :32]).all() and torch.isfinite(dV[:, :32]).all()
    assert (dK[:, 32:] == 0).all() and (dV[:, 32:] == 0).all()
    O_ref, _, _ = reference(Q[:, :, :], K[:, :32], V[:, :32], dO, True)
    torch.testing.assert_close(O.double(), O_ref, atol=2e-5, rtol=0)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_no_quadratic_tensor_is_saved(interpret, impl):
    """What the backward pass keeps grows with n, not n²: Q, K, V, O and L only."""
    Q, K, V, _ = inputs((1,), 64, 64, 16)
    fn = FlashAttentionTorch.apply if impl == "torch" else FlashAttentionTriton.apply
    O = fn(Q, K, V, True)
    saved = O.grad_fn.saved_tensors
    assert len(saved) == 5
    assert max(t.numel() for t in saved) == 64 * 16


@pytest.mark.parametrize("impl", ["flash_torch", "flash_triton"])
def test_multi_head_wrapper_gqa_matches_sdpa(interpret, impl):
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 24, 16, generator=g, requires_grad=True)
    k = torch.randn(2, 2, 24, 16, generator=g, requires_grad=True)
    v = torch.randn(2, 2, 24, 16, generator=g, requires_grad=True)
    out = flash_attention(q, k, v, is_causal=True, impl=impl)
    out.square().sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    ref.square().sum().backward()
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)
    for a, t in zip(grads, (q, k, v)):
        torch.testing.assert_close(a, t.grad, atol=5e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="flash attention impl"):
        flash_attention(q, k, v, impl="sdpa")


def test_shape_and_tile_errors(interpret):
    Q, K, V, _ = inputs((2,), 8, 8, 16)
    with pytest.raises(ValueError, match="attention shapes"):
        FlashAttentionTorch.apply(Q, K[:, :, :8], V, False)
    with pytest.raises(ValueError, match="power of two"):
        FlashAttentionTriton.apply(Q, K, V, False, 24, 16)


def test_triton_on_cpu_without_interpreter_is_a_clear_error(no_gpu_no_interpreter):
    Q, K, V, _ = inputs((1,), 8, 8, 16)
    with pytest.raises(LmrunError, match="TRITON_INTERPRET=1"):
        FlashAttentionTriton.apply(Q, K, V, True)


class _FirstConfigTuner:
    """Stands in for ``triton.autotune`` under the interpreter (which cannot time configs): launches
    config ``pick`` of the list, with the tuned meta-parameters merged as the autotuner does."""

    def __init__(self, kernel, configs, pick, used):
        self.kernel, self.config, self.used = kernel, configs[pick % len(configs)], used

    def __getitem__(self, grid):
        def launch(*args, **meta):
            assert not set(meta) & set(self.config.kwargs), "a tuned meta-parameter was also passed"
            full = {**meta, **self.config.kwargs}
            self.used.append((self.kernel.__name__, self.config.kwargs["Q_TILE"], self.config.kwargs["K_TILE"]))
            return self.kernel[grid(full)](*args, **full)
        return launch


@pytest.mark.parametrize("pick", range(7))  # the longest candidate list has 7
def test_every_hopper_autotune_config_is_correct(interpret, monkeypatch, pick):
    """The autotuned launch path (grids as functions of the chosen tiles, meta-parameters merged)
    with each candidate of HOPPER_TILES, head dims 64 and 128, causal and not, at a length that is
    no multiple of any tile, against the float64 reference."""
    from lmrun.kernels import flash_attention_triton as fat
    from lmrun.kernels.runtime import lazy_jit

    used: list = []
    monkeypatch.setattr(fat, "use_autotune", lambda *a: True)
    monkeypatch.setattr(lazy_jit, "autotuned", lambda self, name, configs, key: _FirstConfigTuner(self, configs, pick,
                                                                                                   used))
    from lmrun.kernels.flash_attention_triton import HOPPER_TILES

    assert max(len(c) for k in HOPPER_TILES.values() for c in k.values()) <= 7
    for d, is_causal in ((64, True), (128, True), (64, False)) if pick < 2 else ((64, True), (128, True)):
        Q, K, V, dO = inputs((1,), 150, 150, d, seed=pick)
        assert_matches(lambda q, k, v: FlashAttentionTriton.apply(q, k, v, is_causal), Q, K, V, dO, is_causal,
                       atol=1e-4)
    kernels = {k for k, _, _ in used}
    assert kernels == {"flash_fwd_kernel", "flash_bwd_dkdv_kernel", "flash_bwd_dq_kernel"}
