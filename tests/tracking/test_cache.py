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
