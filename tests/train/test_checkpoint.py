from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch

from lmrun.errors import DataError, FormatError
from lmrun.model import TransformerLM
from lmrun.train.checkpoint import (
    CheckpointManager,
    CorruptCheckpointError,
    checkpoint_digest,
    load_checkpoint,
    read_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from lmrun.train.data import BatchStream


def _model(seed=0, d_model=16):
    torch.manual_seed(seed)
    return TransformerLM(40, 8, d_model=d_model, num_layers=1, num_heads=2)


def _trained(steps=3):
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    x = torch.randint(0, 40, (2, 8), generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        opt.zero_grad()
        model(x).float().logsumexp(-1).mean().backward()
        opt.step()
    return model, opt, x


def _step(model, opt, x):
    opt.zero_grad()
    model(x).float().logsumexp(-1).mean().backward()
    opt.step()


def _extras():
    stream = BatchStream(np.arange(100, dtype=np.uint16), 2, 4, seed=3)
    stream.next()
    return {"schedule": {"step": 3, "lr": 1e-3}, "rng": rng_state(), "data": stream.state_dict(),
            "config": {"model": {"d_model": 16}, "train": {"keep_last": 2}},
            "tokenizer": {"vocab_digest": "abc", "merges_digest": "def"},
            "numpy_values": {"arr": np.arange(3), "scalar": np.float32(0.5)}}


@pytest.mark.parametrize("kind", ["path", "bytesio"])
def test_round_trip_model_optimizer_extras(tmp_path, kind):
    model, opt, x = _trained()
    extras = _extras()
    out = tmp_path / "sub" / "ckpt.pt" if kind == "path" else io.BytesIO()
    save_checkpoint(model, opt, 3, out, **extras)
    if kind == "bytesio":
        out.seek(0)

    fresh = _model(seed=1)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2, weight_decay=0.1)
    iteration, extra = load_checkpoint(out, fresh, fresh_opt, return_extra=True)
    assert iteration == 3
    for (k, a), (k2, b) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    assert extra["schedule"] == {"step": 3, "lr": 1e-3}
    assert extra["config"]["train"]["keep_last"] == 2 and extra["tokenizer"]["vocab_digest"] == "abc"
    assert extra["numpy_values"] == {"arr": [0, 1, 2], "scalar": 0.5}
    assert extra["data"]["step"] == 1
    assert set(extra) == set(extras)

    # the optimizer state really came back: one more identical step gives identical weights
    _step(model, opt, x)
    _step(fresh, fresh_opt, x)
    for a, b in zip(model.parameters(), fresh.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_iteration_only_and_no_optimizer(tmp_path):
    model = _model()
    save_checkpoint(model, None, 7, tmp_path / "c.pt")
    other = _model(seed=5)
    opt = torch.optim.AdamW(other.parameters())
    assert load_checkpoint(tmp_path / "c.pt", other, opt) == 7
    assert read_checkpoint(tmp_path / "c.pt")["optimizer"] is None
    assert torch.equal(other.lm_head.weight, model.lm_head.weight)


def test_atomic_write_leaves_no_temp_files(tmp_path, monkeypatch):
    model, opt, _ = _trained(1)
    folder = tmp_path / "ckpts"
    path = folder / "ckpt.pt"
    save_checkpoint(model, opt, 1, path)
    save_checkpoint(model, opt, 2, path)  # overwrite
    assert [p.name for p in folder.iterdir()] == ["ckpt.pt"]
    before = path.read_bytes()

    def fail_midway(obj, f, *args, **kwargs):  # e.g. the disk fills in the middle of the write
        f.write(b"PK\x03\x04 partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", fail_midway)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(model, opt, 3, path)
    assert [p.name for p in folder.iterdir()] == ["ckpt.pt"]
    assert path.read_bytes() == before  # the old checkpoint is intact
    assert load_checkpoint(path, _model()) == 2


def test_corrupt_truncated_and_missing(tmp_path):
    model, opt, _ = _trained(1)
    good = tmp_path / "good.pt"
    save_checkpoint(model, opt, 1, good)
    blob = good.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(blob[: len(blob) // 2])
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint at all")
    for name in ("trunc.pt", "garbage.pt"):
        with pytest.raises(FormatError) as err:
            load_checkpoint(tmp_path / name, _model())
        assert name in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(DataError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "missing.pt", _model())
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(FormatError, match="not an lmrun checkpoint"):
        read_checkpoint(tmp_path / "list.pt")


class Evil:
    """An arbitrary class: pickle can store it, weights_only loading must refuse it."""


def test_weights_only_refuses_arbitrary_objects(tmp_path):
    torch.save({"model": {}, "iteration": 0, "x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(FormatError, match="evil.pt"):
        read_checkpoint(tmp_path / "evil.pt")
    with pytest.raises(TypeError, match="extra x is a Evil"):
        save_checkpoint(_model(), None, 0, tmp_path / "c.pt", x=Evil())
    with pytest.raises(ValueError, match="reserved"):
        save_checkpoint(_model(), None, 0, tmp_path / "c.pt", format_version=2)


def test_mismatched_model_is_one_line(tmp_path):
    save_checkpoint(_model(d_model=16), None, 0, tmp_path / "c.pt")
    with pytest.raises(FormatError, match="c.pt: does not fit this model.*shape mismatch") as err:
        load_checkpoint(tmp_path / "c.pt", _model(d_model=32))
    assert "\n" not in str(err.value)


def test_compiled_wrapper_keys_are_plain(tmp_path):
    class Wrapper(torch.nn.Module):  # what torch.compile's OptimizedModule looks like to state_dict
        def __init__(self, inner):
            super().__init__()
            self._orig_mod = inner

    model = _model()
    save_checkpoint(Wrapper(model), None, 0, tmp_path / "c.pt")
    keys = read_checkpoint(tmp_path / "c.pt")["model"].keys()
    assert "lm_head.weight" in keys and not any(k.startswith("_orig_mod") for k in keys)
    target = _model(seed=3)
    load_checkpoint(tmp_path / "c.pt", Wrapper(target))
    assert torch.equal(target.lm_head.weight, model.lm_head.weight)


def test_manager_keep_last_and_latest(tmp_path):
    model = _model()
    mgr = CheckpointManager(tmp_path / "ckpts", keep_last=2)
    assert mgr.latest() is None and mgr.load_latest(model) is None
    for step in (5, 10, 15, 100_000_000):
        path = mgr.save(step, model, None, note=f"s{step}")
        assert path.name == f"ckpt_{step:08d}.pt"
    names = sorted(p.name for p in (tmp_path / "ckpts").iterdir())
    assert names == ["ckpt_00000015.pt", "ckpt_100000000.pt"]
    (tmp_path / "ckpts" / ".ckpt_200000000.pt.abc.tmp").write_bytes(b"partial")  # an interrupted save
    assert mgr.latest().name == "ckpt_100000000.pt"
    iteration, extra = mgr.load_latest(_model(seed=2))
    assert iteration == 100_000_000 and extra["note"] == "s100000000"

    keep_all = CheckpointManager(tmp_path / "all", keep_last=None)
    for step in range(4):
        keep_all.save(step, model)
    assert len(keep_all.checkpoints()) == 4
    with pytest.raises(ValueError):
        CheckpointManager(tmp_path, keep_last=-1)


def _draws():
    return (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist(), torch.randn(2).tolist())


def test_rng_state_round_trip_through_checkpoint(tmp_path):
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    np.random.randn()  # leaves a cached gaussian in the legacy numpy state
    save_checkpoint(_model(), None, 0, tmp_path / "c.pt", rng=rng_state())
    first = _draws()
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    assert _draws() != first
    set_rng_state(read_checkpoint(tmp_path / "c.pt")["rng"])
    assert _draws() == first


# ----------------------------------------------------------------------------- checksums (issue 25, F5)

def _tensor_records(path) -> list[tuple[int, int]]:
    """(offset, size) in the file of each tensor's bytes: torch.save writes a zip whose entries
    ``<archive>/data/<n>`` hold the storages, stored uncompressed after a local header."""
    import struct
    import zipfile

    out = []
    blob = path.read_bytes()
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            if "/data/" in info.filename and info.compress_size:
                name_len, extra_len = struct.unpack("<HH", blob[info.header_offset + 26: info.header_offset + 30])
                out.append((info.header_offset + 30 + name_len + extra_len, info.compress_size))
    return out


def flip_tensor_bytes(path, n: int = 2000, seed: int = 0) -> None:
    """Flip ``n`` bytes (XOR 0xFF) at random places inside the tensor data of a checkpoint file,
    spread over its largest storages: torch.load still reads such a file without complaint."""
    records = sorted(_tensor_records(path), key=lambda r: -r[1])
    assert records, f"{path}: no tensor data found"
    rng = random.Random(seed)
    blob = bytearray(path.read_bytes())
    places = [o for offset, size in records[:4] for o in range(offset, offset + size)]
    for i in rng.sample(places, min(n, len(places))):
        blob[i] ^= 0xFF
    path.write_bytes(bytes(blob))


def test_checksum_catches_flipped_tensor_bytes(tmp_path):
    model, opt, _ = _trained(1)
    path = tmp_path / "ckpt.pt"
    save_checkpoint(model, opt, 1, path, note="x")
    obj = read_checkpoint(path)
    assert obj["checksum"]["algorithm"] == "sha256" and len(obj["checksum"]["digest"]) == 64
    flip_tensor_bytes(path)
    torch.load(path, weights_only=True)  # torch itself notices nothing: the reason for the checksum
    for load in (lambda: read_checkpoint(path), lambda: load_checkpoint(path, _model())):
        with pytest.raises(CorruptCheckpointError) as err:
            load()
        message = str(err.value)
        assert "ckpt.pt" in message and "checksum" in message and "\n" not in message
    assert isinstance(err.value, FormatError)


def test_checksum_covers_extras_and_optimizer(tmp_path):
    model, opt, _ = _trained(1)
    path = tmp_path / "c.pt"
    save_checkpoint(model, opt, 1, path, ema={"shadow": {"w": torch.ones(3)}}, note="abc")
    obj = torch.load(path, weights_only=True)
    for change in (lambda o: o["ema"]["shadow"]["w"].add_(1e-7), lambda o: o.update(note="abd"),
                   lambda o: next(iter(o["optimizer"]["state"].values()))["exp_avg"].view(-1)[0].add_(1.0),
                   lambda o: o.update(iteration=2)):
        tampered = {k: v for k, v in torch.load(path, weights_only=True).items()}
        change(tampered)
        torch.save(tampered, tmp_path / "t.pt")
        with pytest.raises(CorruptCheckpointError, match="t.pt: corrupt checkpoint"):
            read_checkpoint(tmp_path / "t.pt")
    assert checkpoint_digest(obj) == obj["checksum"]["digest"]  # the untouched file verifies


def test_checkpoint_without_checksum_still_loads(tmp_path):
    """Files written before checksums existed load unverified."""
    model = _model()
    torch.save({"format_version": 1, "iteration": 4, "model": model.state_dict(), "optimizer": None},
               tmp_path / "old.pt")
    other = _model(seed=3)
    assert load_checkpoint(tmp_path / "old.pt", other) == 4
    assert torch.equal(other.lm_head.weight, model.lm_head.weight)


def test_truncated_and_garbage_are_corrupt_errors(tmp_path):
    model, opt, _ = _trained(1)
    save_checkpoint(model, opt, 1, tmp_path / "good.pt")
    blob = (tmp_path / "good.pt").read_bytes()
    for cut in (len(blob) // 3, len(blob) - 30):
        (tmp_path / "trunc.pt").write_bytes(blob[:cut])
        with pytest.raises(CorruptCheckpointError, match="trunc.pt: not a readable checkpoint") as err:
            read_checkpoint(tmp_path / "trunc.pt")
        assert "\n" not in str(err.value)
    save_checkpoint(_model(d_model=16), None, 0, tmp_path / "c.pt")  # a good file for another model is not corrupt
    with pytest.raises(FormatError) as err:
        load_checkpoint(tmp_path / "c.pt", _model(d_model=32))
    assert not isinstance(err.value, CorruptCheckpointError)


# ----------------------------------------------------------------------------- falling back (F4) and stale temp files (F10)

def test_manager_falls_back_to_the_newest_good_checkpoint(tmp_path, caplog):
    model = _model()
    mgr = CheckpointManager(tmp_path / "ckpts", keep_last=3)
    for step in (1, 2, 3):
        with torch.no_grad():
            model.lm_head.weight.fill_(step)
        mgr.save(step, model, None, note=f"s{step}")
    flip_tensor_bytes(mgr.path(3))
    mgr.path(2).write_bytes(mgr.path(2).read_bytes()[:100])  # truncated
    target = _model(seed=4)
    with caplog.at_level("WARNING", logger="lmrun.train.checkpoint"):
        iteration, extra = mgr.load_latest(target)
    assert iteration == 1 and extra["note"] == "s1" and bool((target.lm_head.weight == 1).all())
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("ckpt_00000003.pt: corrupt checkpoint" in w and "checksum" in w for w in warnings)
    assert any("ckpt_00000002.pt: not a readable checkpoint" in w for w in warnings)
    assert any("resuming from" in w and "ckpt_00000001.pt" in w for w in warnings)
    assert [p.name for p in mgr.checkpoints()] == ["ckpt_00000001.pt", "ckpt_00000002.pt", "ckpt_00000003.pt"]

    # the writer moves corrupt files aside, so that they no longer count as the latest or against keep_last
    path, obj = mgr.read_latest(quarantine=True)
    assert path == mgr.path(1) and obj["iteration"] == 1
    assert sorted(p.name for p in mgr.directory.iterdir()) == ["ckpt_00000001.pt", "ckpt_00000002.pt.corrupt",
                                                              "ckpt_00000003.pt.corrupt"]
    assert mgr.latest() == mgr.path(1)

    flip_tensor_bytes(mgr.path(1))
    with pytest.raises(CorruptCheckpointError, match="none of its 1 checkpoint.*ckpt_00000001.pt") as err:
        mgr.load_latest(_model())
    assert "\n" not in str(err.value)


def test_manager_removes_temp_files_of_dead_writers_only(tmp_path):
    import os
    import subprocess
    import sys

    from lmrun.tracking.files import temp_path

    folder = tmp_path / "ckpts"
    mgr = CheckpointManager(folder, keep_last=None)
    mgr.save(1, _model())
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = temp_path(mgr.path(2)).name.replace(f".{os.getpid()}.", f".{dead_pid}.")
    (folder / stale).write_bytes(b"PK partial")
    live = temp_path(mgr.path(3))  # this process is writing it
    live.write_bytes(b"PK partial")
    assert mgr.remove_stale_temp_files() == [folder / stale]
    assert sorted(p.name for p in folder.iterdir()) == sorted([live.name, "ckpt_00000001.pt"])
