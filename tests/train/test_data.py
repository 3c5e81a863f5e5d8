from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lmrun.errors import DataError
from lmrun.train.data import BatchStream, MixtureSampler, get_batch, load_tokens


def _positions(n: int) -> np.ndarray:
    """A token array whose value at i identifies i (mod 2^16 never wraps for these sizes)."""
    return np.arange(n, dtype=np.uint16)


def test_get_batch_shapes_ranges_and_shift():
    data = _positions(100)
    rng = np.random.default_rng(0)
    starts_seen = set()
    for _ in range(50):
        x, y = get_batch(data, 8, 10, "cpu", generator=rng)
        assert x.shape == y.shape == (8, 10)
        assert x.dtype == y.dtype == torch.int64
        assert x.device.type == "cpu" and x.is_contiguous() and y.is_contiguous()
        # x is a window of consecutive positions, y the same window shifted by one
        starts = x[:, 0]
        assert torch.equal(x, starts[:, None] + torch.arange(10))
        assert torch.equal(y, x + 1)
        assert starts.min() >= 0 and (starts + 10).max() <= 99  # the last target index exists
        starts_seen.update(starts.tolist())
    assert starts_seen == set(range(90))  # every legal start (0..n-ctx-1) is reachable; none beyond


def test_get_batch_global_rng_reproducible():
    data = _positions(1000)
    np.random.seed(5)
    a = get_batch(data, 4, 16, torch.device("cpu"))
    np.random.seed(5)
    b = get_batch(data, 4, 16, "cpu")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_memmap_input(tmp_path, dtype):
    values = (np.arange(5000, dtype=np.int64) * 7919) % (65535 if dtype == "uint16" else 100_000)
    path = tmp_path / "train.bin"
    values.astype(dtype).tofile(path)
    data = load_tokens(path, dtype)
    assert isinstance(data, np.memmap) and len(data) == 5000
    x, y = get_batch(data, 6, 32, "cpu", generator=np.random.default_rng(1))
    for row_x, row_y in zip(x.numpy(), y.numpy()):
        s = int(np.flatnonzero(values == row_x[0])[0])  # values are distinct
        assert np.array_equal(row_x, values[s:s + 32])
        assert np.array_equal(row_y, values[s + 1:s + 33])
    if dtype == "uint32":
        assert values.max() > 65535 and x.max() <= values.max()


def test_exact_fit_and_too_short():
    data = _positions(11)
    x, y = get_batch(data, 3, 10, "cpu")  # exactly one possible window
    assert torch.equal(x, torch.arange(10).expand(3, 10)) and torch.equal(y, x + 1)
    with pytest.raises(DataError, match="10 tokens.*context_length \\+ 1 = 11"):
        get_batch(data[:10], 2, 10, "cpu")
    with pytest.raises(ValueError):
        get_batch(data, 0, 4, "cpu")


def test_load_tokens_errors(tmp_path):
    with pytest.raises(DataError, match="no such token file"):
        load_tokens(tmp_path / "missing.bin")
    (tmp_path / "empty.bin").write_bytes(b"")
    with pytest.raises(DataError, match="empty"):
        load_tokens(tmp_path / "empty.bin")
    (tmp_path / "odd.bin").write_bytes(b"\x00" * 6)
    with pytest.raises(DataError, match="not a whole number of uint32"):
        load_tokens(tmp_path / "odd.bin", "uint32")


def _batches(stream, k):
    return [stream.next("cpu") for _ in range(k)]


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b))


def test_batch_stream_reproducible_and_resumable():
    data = _positions(5000)
    a = BatchStream(data, 4, 8, seed=3)
    b = BatchStream(data, 4, 8, seed=3)
    assert _same(_batches(a, 5), _batches(b, 5))
    assert not _same(_batches(BatchStream(data, 4, 8, seed=4), 3), _batches(BatchStream(data, 4, 8, seed=3), 3))

    state = json.loads(json.dumps(a.state_dict()))  # survives JSON (and so torch weights_only)
    expected = _batches(a, 4)
    resumed = BatchStream(data, 4, 8, seed=999)
    resumed.load_state_dict(state)
    assert resumed.step == 5
    assert _same(_batches(resumed, 4), expected)
    assert resumed.step == a.step == 9


def test_batch_stream_checks_length():
    with pytest.raises(DataError):
        BatchStream(_positions(8), 2, 8)


def _mixture(seed=0):
    a = np.arange(0, 1000, dtype=np.uint32)
    b = np.arange(10_000, 10_500, dtype=np.uint32)
    c = np.arange(20_000, 21_000, dtype=np.uint32)
    return MixtureSampler([a, b, c], [0.6, 0.3, 0.1], seed=seed, names=["web", "code", "books"])


def test_mixture_proportions_and_windows():
    mix = _mixture()
    src_counts = np.zeros(3)
    for _ in range(200):
        x, y = mix.sample(25, 16, "cpu")
        assert x.shape == (25, 16) and x.dtype == torch.int64
        assert torch.equal(y, x + 1)  # each row a contiguous window of one source
        src = x[:, 0].numpy() // 10_000
        assert np.array_equal(x[:, -1].numpy() // 10_000, src)  # a window never crosses sources
        src_counts += np.bincount(src, minlength=3)
    frac = src_counts / src_counts.sum()
    # 5000 draws: the standard error of a proportion is at most 0.007
    np.testing.assert_allclose(frac, [0.6, 0.3, 0.1], atol=0.03)
    assert mix.counts == src_counts.astype(int).tolist()
    assert abs(mix.proportions()["web"] - frac[0]) < 1e-12


def test_mixture_zero_weight_source_never_sampled_and_may_be_short():
    a = np.arange(100, dtype=np.uint16)
    tiny = np.arange(5000, 5003, dtype=np.uint16)
    mix = MixtureSampler([a, tiny], [1.0, 0.0])
    x, _ = mix.sample(64, 8)
    assert x.max() < 100


def test_mixture_resumable_standalone_and_in_stream():
    mix = _mixture(seed=7)
    for _ in range(3):
        mix.sample(4, 8)
    state = mix.state_dict()
    expected = [mix.sample(4, 8) for _ in range(3)]
    other = _mixture(seed=0)
    other.load_state_dict(state)
    assert _same([other.sample(4, 8) for _ in range(3)], expected)

    s1 = BatchStream(_mixture(), 4, 8, seed=1)
    _batches(s1, 2)
    saved = s1.state_dict()
    expected = _batches(s1, 3)
    s2 = BatchStream(_mixture(), 4, 8, seed=1)
    s2.load_state_dict(saved)
    assert s2.data.counts == saved["mixture"]["counts"]
    assert _same(_batches(s2, 3), expected)


def test_mixture_bad_weights():
    a = np.arange(100, dtype=np.uint16)
    with pytest.raises(ValueError, match="one weight per array"):
        MixtureSampler([a, a], [1.0])
    with pytest.raises(ValueError, match="not all zero"):
        MixtureSampler([a, a], [0.0, 0.0])
    with pytest.raises(ValueError, match=">= 0"):
        MixtureSampler([a, a], [1.0, -0.5])
    with pytest.raises(DataError, match="'1' of the mixture"):
        MixtureSampler([a, a[:4]], [1, 1]).sample(2, 8)
