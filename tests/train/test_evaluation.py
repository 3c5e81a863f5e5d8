from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmrun.errors import DataError
from lmrun.model import TransformerLM
from lmrun.train.evaluation import bits_per_byte, evaluate_loss

VOCAB, CTX = 50, 8


def _tiny_model():
    torch.manual_seed(0)
    return TransformerLM(VOCAB, CTX, d_model=16, num_layers=1, num_heads=2)


def _manual_loss(model, data, ctx):
    """Token-by-token: target i (1..n-1) is predicted in the window starting at ((i-1)//ctx)*ctx."""
    n = len(data)
    tokens = torch.from_numpy(data.astype(np.int64))
    losses = []
    with torch.no_grad():
        for i in range(1, n):
            s = (i - 1) // ctx * ctx
            window = tokens[s:min(s + ctx, n - 1)]
            logits = model(window[None])[0]
            losses.append(F.cross_entropy(logits[i - 1 - s][None].double(), tokens[i][None]).item())
    return sum(losses) / len(losses), len(losses)


@pytest.mark.parametrize("n", [41, 42, 9, 2])  # 40 predictions = 5 full windows; 41 = 5 + partial; tiny
def test_matches_manual_token_weighted_mean(n):
    model = _tiny_model()
    data = np.random.default_rng(0).integers(0, VOCAB, size=n).astype(np.uint16)
    expected, count = _manual_loss(model, data, CTX)
    for batch_size in (1, 2, 64):
        out = evaluate_loss(model, data, batch_size, CTX, "cpu")
        assert out["tokens"] == count == n - 1
        assert out["loss"] == pytest.approx(expected, rel=1e-5)
        assert out["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)


def test_max_tokens_and_mode_restored():
    model = _tiny_model()
    data = np.random.default_rng(1).integers(0, VOCAB, size=100).astype(np.uint16)
    model.train()
    out = evaluate_loss(model, data, 4, CTX, "cpu", max_tokens=30)
    assert model.training
    assert out["tokens"] == 29
    assert out["loss"] == pytest.approx(_manual_loss(model, data[:30], CTX)[0], rel=1e-5)
    model.eval()
    evaluate_loss(model, data, 4, CTX, "cpu")
    assert not model.training
    # no gradients were recorded
    assert all(p.grad is None for p in model.parameters())


class _Recorder(torch.nn.Module):
    """Uniform logits; remembers every input row it saw."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.extend(row.tolist() for row in x)
        return torch.zeros(*x.shape, VOCAB)


def test_every_token_predicted_exactly_once():
    data = np.arange(1000, 1000 + 59, dtype=np.uint32) % VOCAB  # 58 predictions: 7 windows of 8 + 2
    rec = _Recorder()
    out = evaluate_loss(rec, data, 3, CTX, "cpu")
    inputs = [t for row in rec.seen for t in row]
    assert inputs == data[:-1].tolist()  # inputs tile the array in order, no overlap, no gap
    assert [len(r) for r in rec.seen] == [8] * 7 + [2]
    assert out["tokens"] == 58 and out["loss"] == pytest.approx(math.log(VOCAB), rel=1e-6)


def test_bf16_autocast_close():
    model = _tiny_model()
    data = np.random.default_rng(2).integers(0, VOCAB, size=65).astype(np.uint16)
    ref = evaluate_loss(model, data, 4, CTX, "cpu")["loss"]
    low = evaluate_loss(model, data, 4, CTX, "cpu", autocast_dtype=torch.bfloat16)["loss"]
    assert low == pytest.approx(ref, rel=2e-2)


def test_too_little_data():
    with pytest.raises(DataError, match="at least 2"):
        evaluate_loss(_tiny_model(), np.zeros(1, dtype=np.uint16), 2, CTX)
    with pytest.raises(DataError):
        evaluate_loss(_tiny_model(), np.zeros(10, dtype=np.uint16), 2, CTX, max_tokens=1)


def test_bits_per_byte():
    assert bits_per_byte(math.log(2), 1.0) == pytest.approx(1.0)
    assert bits_per_byte(2.0, 4.0) == pytest.approx(2.0 / math.log(2) / 4.0)
    with pytest.raises(ValueError):
        bits_per_byte(1.0, 0.0)


def _manual_strided_loss(model, data, ctx, stride):
    """By the definition: window starts 0, r, 2r, ... while a window fits before token n - 1, then
    one window ending at n - 1; target i is predicted in the first window whose targets reach it."""
    n = len(data)
    tokens = torch.from_numpy(data.astype(np.int64))
    full = [w for w in range(0, n, stride) if w + ctx <= n - 1]
    losses = []
    with torch.no_grad():
        for i in range(1, n):
            start = next((w for w in full if w + ctx >= i), max(0, n - 1 - ctx))
            window = tokens[start:min(start + ctx, n - 1)]
            assert start < i <= start + len(window)
            logits = model(window[None])[0]
            losses.append(F.cross_entropy(logits[i - 1 - start][None].double(), tokens[i][None]).item())
    return sum(losses) / len(losses), len(losses)


@pytest.mark.parametrize("n,stride", [(41, 4), (42, 4), (45, 3), (9, 2), (5, 1), (2, 3), (60, 7), (30, 1)])
def test_strided_matches_manual(n, stride):
    model = _tiny_model()
    data = np.random.default_rng(n).integers(0, VOCAB, size=n).astype(np.uint16)
    expected, count = _manual_strided_loss(model, data, CTX, stride)
    for batch_size in (1, 3, 64):
        out = evaluate_loss(model, data, batch_size, CTX, "cpu", stride=stride)
        assert out["tokens"] == count == n - 1
        assert out["loss"] == pytest.approx(expected, rel=1e-5)


def test_stride_of_a_context_is_the_chunked_loss_and_context_helps():
    model = _tiny_model()
    data = np.random.default_rng(3).integers(0, VOCAB, size=70).astype(np.uint16)
    chunked = evaluate_loss(model, data, 4, CTX, "cpu")
    assert evaluate_loss(model, data, 4, CTX, "cpu", stride=CTX) == chunked
    rec = _Recorder()
    out = evaluate_loss(rec, data, 3, CTX, "cpu", stride=2, max_tokens=30)
    assert out["tokens"] == 29 and out["loss"] == pytest.approx(math.log(VOCAB), rel=1e-6)
    assert [row[0] for row in rec.seen] == data[[0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 21]].tolist()
    with pytest.raises(ValueError, match="stride"):
        evaluate_loss(model, data, 4, CTX, "cpu", stride=0)
    with pytest.raises(ValueError, match="stride"):
        evaluate_loss(model, data, 4, CTX, "cpu", stride=CTX + 1)


@pytest.mark.parametrize("stride", [None, 8, 3])
def test_progress_counts_every_prediction_once_per_forward_pass(stride):
    data = np.arange(1000, 1000 + 59, dtype=np.uint32) % VOCAB  # 58 predictions
    passes = []

    class Counting(_Recorder):
        def forward(self, x):
            passes.append(len(x))
            return super().forward(x)

    calls = []
    out = evaluate_loss(Counting(), data, 3, CTX, "cpu", stride=stride, progress=calls.append)
    assert sum(calls) == out["tokens"] == 58  # each prediction counted once, ...
    assert len(calls) == len(passes) > 1  # ... after each forward pass
    assert out == evaluate_loss(_Recorder(), data, 3, CTX, "cpu", stride=stride)  # the default is unchanged
