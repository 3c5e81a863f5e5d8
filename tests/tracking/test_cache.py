from __future__ import annotations

import json

import pytest

from lmrun.errors import DataError, FormatError
from lmrun.tracking.cache import ArtifactCache


def test_build_then_reuse_then_rebuild(tmp_path):
    cache = ArtifactCache(tmp_path / "c")
    calls = []

    def build(out):
        calls.append(out)
        (out / "x.txt").write_text(f"build {len(calls)}")
        return {"n": len(calls)}

    a = cache.get_or_build("thing", {"k": 1}, build)
    assert not a.reused and (a.path / "x.txt").read_text() == "build 1" and a.manifest["result"] == {"n": 1}
    b = cache.get_or_build("thing", {"k": 1}, build)
    assert b.reused and b.path == a.path and len(calls) == 1
    c = cache.get_or_build("thing", {"k": 2}, build)
    assert not c.reused and c.path != a.path
    d = ArtifactCache(tmp_path / "c", rebuild=True).get_or_build("thing", {"k": 1}, build)
    assert not d.reused and d.path == a.path and (d.path / "x.txt").read_text() == "build 3"
    assert sorted(p.name for p in (tmp_path / "c" / "thing").iterdir()) == sorted([a.key, c.key])


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_interrupted_build_leaves_nothing(tmp_path, exc):
    cache = ArtifactCache(tmp_path / "c")

    def build(out):
        (out / "partial.bin").write_bytes(b"\0" * 100)
        raise exc

    with pytest.raises(type(exc)):
        cache.get_or_build("thing", {"k": 1}, build)
    assert list((tmp_path / "c" / "thing").iterdir()) == []
    assert cache.lookup("thing", cache.key("thing", {"k": 1})) is None


def test_corrupt_manifest_is_a_clear_error(tmp_path):
    cache = ArtifactCache(tmp_path / "c")
    a = cache.get_or_build("thing", {"k": 1}, lambda out: None)
    (a.path / "artifact.json").write_text("{not json")
    with pytest.raises(FormatError, match="corrupt cache entry"):
        cache.lookup("thing", a.key)


def test_text_file_digest_tracks_content_and_checks_utf8(tmp_path):
    cache = ArtifactCache(tmp_path / "c")
    f = tmp_path / "a.txt"
    f.write_text("héllo\n")
    d1 = cache.text_file_digest(f, "data.train")
    assert cache.text_file_digest(f, "data.train") == d1
    assert json.loads((tmp_path / "c" / "digests.json").read_text())
    f.write_text("héllo, world\n")
    assert cache.text_file_digest(f, "data.train") != d1
    f.write_bytes(b"ok\n\xff\xfe")
    with pytest.raises(DataError, match=r"data.train: not valid UTF-8 at byte 3"):
        cache.text_file_digest(f, "data.train")
    f.write_bytes("é".encode()[:1])
    with pytest.raises(DataError, match="truncated"):
        cache.text_file_digest(f, "data.train")


# --- issue 25 F10: what a killed builder leaves is removed at the next build, a live one's never ---

_BUILDER = """
import sys, time
from lmrun.tracking.cache import ArtifactCache

def build(out):
    (out / "partial.bin").write_bytes(b"0" * 1000)
    print("building", flush=True)
    time.sleep(600)

ArtifactCache(sys.argv[1]).get_or_build("tokens", {"k": "slow"}, build)
"""


def _start_builder(root):
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", _BUILDER, str(root)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "building"  # its temporary folder exists now
    return proc


def _temp_dirs(root):
    return sorted(p.name for p in (root / "tokens").iterdir() if p.name.startswith("."))


def test_killed_builder_folder_is_removed_at_the_next_build(tmp_path):
    import os
    import signal

    from lmrun.tracking.files import host_tag

    root = tmp_path / "c"
    proc = _start_builder(root)
    try:
        (name,) = _temp_dirs(root)
        assert name.startswith(".tmp-") and f".{host_tag()}.{proc.pid}." in name
        cache = ArtifactCache(root)
        cache.get_or_build("tokens", {"k": "other"}, lambda out: None)  # a build beside a live builder
        assert name in _temp_dirs(root)  # kept: its builder is alive
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert name in _temp_dirs(root)  # kill -9 runs no clean-up: the folder stays ...
    cache.get_or_build("tokens", {"k": "third"}, lambda out: None)
    assert _temp_dirs(root) == []  # ... until the next build of that kind removes it
    again = ArtifactCache(root).get_or_build("tokens", {"k": "slow"}, lambda out: {"ok": 1})
    assert again.manifest["result"] == {"ok": 1}


def _dead_pid() -> int:
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_remove_stale_keeps_live_foreign_and_unknown(tmp_path):
    import os

    from lmrun.tracking.files import host_tag

    cache = ArtifactCache(tmp_path / "c")
    kind = tmp_path / "c" / "tokenizer"
    kind.mkdir(parents=True)
    key, host, dead = "0" * 32, host_tag(), _dead_pid()
    names = {
        "dead": f".tmp-{key}.{host}.{dead}.deadbeef",
        "alive": f".tmp-{key}.{host}.{os.getpid()}.cafef00d",
        "foreign": f".tmp-{key}.some-other-node.{dead}.0badcafe",
        "legacy": f".tmp-{key}-1234abcd",  # named before pids were recorded: cannot tell, kept
    }
    for n in names.values():
        (kind / n).mkdir()
        (kind / n / "x").write_text("partial")
    (kind / f".old-{key}.{host}.{dead}.00000000").mkdir()  # a replaced entry whose rebuild ...
    (kind / f".old-{key}.{host}.{dead}.00000000" / "artifact.json").write_text("{}")  # ... was killed: put back
    stale_file = tmp_path / "c" / f".digests.json.{host}.{dead}.abcdef01.tmp"
    stale_file.write_text("{")
    removed = cache.remove_stale()
    assert [p.name for p in removed] == sorted([names["dead"], stale_file.name])
    left = sorted(p.name for p in kind.iterdir())
    assert left == sorted([key, names["alive"], names["foreign"], names["legacy"]])
    assert (kind / key / "artifact.json").is_file()
    assert cache.lookup("tokenizer", key) is not None
    assert ArtifactCache(tmp_path / "missing").remove_stale() == []
