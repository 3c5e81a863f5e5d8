"""Atomic writes: permissions, temp-file names, clean-up of dead writers' leftovers, strict JSON."""
from __future__ import annotations

import json
import math
import os
import stat
import subprocess
import sys

import numpy as np
import pytest

from lmrun.tracking import files
from lmrun.tracking.files import (atomic_write, atomic_write_json, atomic_write_text, json_dumps, json_safe,
                                  remove_stale_temp_files, save_figure, temp_path)


@pytest.fixture
def out(tmp_path):
    """An empty folder (tmp_path also holds the workspace the autouse fixture makes)."""
    d = tmp_path / "out"
    d.mkdir()
    return d


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_writes_respect_the_umask_not_mkstemps_0600(out, umask_022):
    atomic_write_text(out / "a.txt", "x")
    atomic_write_json(out / "run.json", {"a": 1})
    assert _mode(out / "a.txt") == 0o644 and _mode(out / "run.json") == 0o644
    os.umask(0o077)
    atomic_write_text(out / "private.txt", "x")
    assert _mode(out / "private.txt") == 0o600


def test_save_figure_is_atomic_and_0644(out, umask_022):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([1, 2], [3, 4])
    save_figure(fig, out / "plot.png")
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert _mode(out / "plot.png") == 0o644
    assert [p.name for p in out.iterdir()] == ["plot.png"]  # no temp file left


def test_temp_file_names_carry_host_and_pid_and_are_removed_on_error(out):
    def write(f):
        f.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(out / "x.json", write)
    assert list(out.iterdir()) == []
    name = temp_path(out / "ckpt.pt").name
    m = files._TEMP_RE.match(name)
    assert m and m["name"] == "ckpt.pt" and int(m["pid"]) == os.getpid() and m["host"] == files.host_tag()


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_remove_stale_temp_files_removes_only_dead_local_writers(out):
    host = files.host_tag()
    dead = _dead_pid()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = out / f".model.pt.{host}.{dead}.0123abcd.tmp"
        live_tmp = out / f".model.pt.{host}.{live.pid}.0123abcd.tmp"
        mine = temp_path(out / "run.json")
        other_host = out / f".model.pt.otherhost-7.{dead}.0123abcd.tmp"
        unrelated = [out / ".model.pt.abc123.tmp", out / "notes.tmp", out / "model.pt"]
        for p in [stale, live_tmp, mine, other_host, *unrelated]:
            p.write_text("x")
        assert remove_stale_temp_files(out) == [stale]
        assert not stale.exists()
        assert all(p.exists() for p in [live_tmp, mine, other_host, *unrelated])
        assert remove_stale_temp_files(out) == []
        assert remove_stale_temp_files(out / "missing") == []
    finally:
        live.kill()
        live.wait()


def test_a_killed_writer_leaves_a_temp_file_that_the_next_start_removes(out):
    """A real writer killed mid-write: its temp file names its pid; once it is dead the clean-up
    removes it, while the target keeps its old content."""
    target = out / "ckpt.bin"
    target.write_bytes(b"old")
    code = ("import sys, time; from lmrun.tracking.files import atomic_write\n"
            "def w(f):\n    f.write(b'partial'); f.flush(); print('writing', flush=True); time.sleep(60)\n"
            f"atomic_write({str(target)!r}, w)\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "writing"
        temps = [q for q in out.iterdir() if q.name.endswith(".tmp")]
        assert len(temps) == 1 and f".{p.pid}." in temps[0].name
        assert remove_stale_temp_files(out) == []  # the writer is alive
    finally:
        p.kill()
        p.wait()
    assert remove_stale_temp_files(out) == temps
    assert sorted(q.name for q in out.iterdir()) == ["ckpt.bin"] and target.read_bytes() == b"old"


def test_json_never_holds_nan_or_infinity(out):
    obj = {"loss": float("nan"), "nested": {"grad": [1.0, float("inf"), (float("-inf"), 2)]},
           "np": np.float32("nan"), "np64": np.float64(1.5), "ok": 3, "flag": True, "s": "NaN"}
    assert json_safe(obj) == {"loss": None, "nested": {"grad": [1.0, None, [None, 2]]}, "np": None,
                              "np64": 1.5, "ok": 3, "flag": True, "s": "NaN"}
    atomic_write_json(out / "summary.json", obj)
    text = (out / "summary.json").read_text()
    assert "NaN" not in text.replace('"NaN"', "") and "Infinity" not in text
    back = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert back["loss"] is None and back["nested"]["grad"] == [1.0, None, [None, 2]]
    assert json_dumps({"x": math.inf}) == '{"x": null}'


def test_json_dumps_refuses_a_nan_that_slips_past(out, monkeypatch):
    """allow_nan=False is the second guard: were the conversion to miss a value, the write fails
    instead of producing invalid JSON (and atomic_write keeps the old file)."""
    monkeypatch.setattr(files, "json_safe", lambda obj: obj)
    with pytest.raises(ValueError):
        json_dumps({"x": float("nan")})
    (out / "summary.json").write_text('{"ok": 1}\n')
    with pytest.raises(ValueError):
        atomic_write_json(out / "summary.json", {"x": float("inf")})
    assert (out / "summary.json").read_text() == '{"ok": 1}\n' and len(list(out.iterdir())) == 1


def test_a_filesystem_without_locks_is_not_fatal(out, monkeypatch, caplog):
    import errno
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with files.FileLock.acquire(out / ".lock") as lock:
        assert lock.path == out / ".lock"
    assert "does not support file locks" in caplog.text
