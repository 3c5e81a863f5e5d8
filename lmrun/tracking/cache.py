"""The content-addressed artifact cache for derived data (DESIGN.md, "Run directories and artifacts").

Layout: ``<root>/<kind>/<key>/`` holding the artifact's files and ``artifact.json`` (the key
material, creation time, build seconds and what the builder returned). The key is a hash of
the inputs' identity (content digests of files) and the config that produced the artifact.
An artifact is built in a temporary sibling folder and renamed into place only when complete,
so an interrupted build leaves nothing that a later run could mistake for a finished one. The
temporary folder's name carries the builder's host and pid (``.tmp-<key>.<host>.<pid>.<random>``;
a replaced entry is moved aside as ``.old-<key>.<host>.<pid>.<random>``), so the folders of a
builder killed outright (``kill -9``, out of memory, a lost node) are removed before the next
build of that kind — never those of a live builder, nor of another host's (a shared cache).
File digests are remembered in ``<root>/digests.json`` by (path, size, mtime) so large inputs
are read once.
"""
from __future__ import annotations

import codecs
import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from lmrun.errors import DataError, FormatError
from lmrun.tracking.files import atomic_write_json, host_tag, pid_alive, remove_stale_temp_files

log = logging.getLogger(__name__)

MANIFEST = "artifact.json"
_BLOCK = 1 << 20
#: a build's temporary folder, or an entry moved aside while being replaced (see ``_work_dir``)
_WORK_RE = re.compile(r"^\.(?P<what>tmp|old)-(?P<key>[0-9a-f]+)\.(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\."
                      r"(?P<rand>[0-9a-f]{8})$")


def _work_dir(final: Path, what: str) -> Path:
    """``<kind dir>/.<what>-<key>.<host>.<pid>.<random>``: a folder beside ``final`` that this
    process owns (``what``: "tmp" for a build, "old" for an entry being replaced)."""
    return final.parent / f".{what}-{final.name}.{host_tag()}.{os.getpid()}.{uuid.uuid4().hex[:8]}"


@dataclass
class Artifact:
    """A complete cache entry: its folder, its manifest, and whether this run reused it."""

    kind: str
    key: str
    path: Path
    manifest: dict
    reused: bool


class ArtifactCache:
    """Content-addressed store of derived data under ``root`` (created on first write).

    ``rebuild=True`` makes :meth:`get_or_build` rebuild entries even when they exist."""

    def __init__(self, root: str | os.PathLike, rebuild: bool = False):
        self.root = Path(os.path.expanduser(str(root))).absolute()
        self.rebuild = rebuild

    # keys and paths --------------------------------------------------------------------
    @staticmethod
    def key(kind: str, material: dict) -> str:
        """32-hex-digit key of ``material`` (JSON-serialisable, keys sorted) for ``kind``."""
        blob = json.dumps({"kind": kind, **material}, sort_keys=True, default=str).encode("utf-8")
        return hashlib.sha256(blob).hexdigest()[:32]

    def path(self, kind: str, key: str) -> Path:
        return self.root / kind / key

    def lookup(self, kind: str, key: str) -> Artifact | None:
        """The complete artifact for ``key`` or None. A corrupt manifest raises FormatError."""
        where = self.path(kind, key)
        manifest_path = where / MANIFEST
        if not manifest_path.is_file():
            return None
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise FormatError(f"corrupt cache entry {where} ({e}); delete it or run with cache.rebuild=true") from None
        return Artifact(kind, key, where, manifest, reused=True)

    # building ----------------------------------------------------------------------------
    def remove_stale(self, kind: str | None = None) -> list[Path]:
        """Remove what dead builders left under ``<root>/<kind>`` (every kind when None): their
        temporary build folders and entries moved aside (``.tmp-…``/``.old-…`` named with this
        host and a pid that no longer exists here), and temporary files of interrupted atomic
        writes (``lmrun.tracking.files.remove_stale_temp_files``), also in the root
        (``digests.json``). An entry moved aside whose replacement never arrived (killed between
        the two renames) is put back instead. Kept: a live builder's folders (this process's
        included), other hosts' (their pids cannot be checked from here), anything else. Returns
        the removed paths, sorted; a missing cache removes nothing. Called before every build."""
        if kind is None:
            try:
                dirs = [p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")]
            except (FileNotFoundError, NotADirectoryError):
                return []
        else:
            dirs = [self.root / kind]
        host, removed = host_tag(), list(remove_stale_temp_files(self.root))
        for d in dirs:
            removed += remove_stale_temp_files(d)
            try:
                entries = list(os.scandir(d))
            except (FileNotFoundError, NotADirectoryError):
                continue
            for entry in entries:
                m = _WORK_RE.match(entry.name)
                if m is None or m["host"] != host or pid_alive(int(m["pid"])):
                    continue
                if not entry.is_dir(follow_symlinks=False):
                    continue
                final = d / m["key"]
                if m["what"] == "old" and not final.exists() and (Path(entry.path) / MANIFEST).is_file():
                    try:  # killed between its two renames: the replaced entry is still whole, put it back
                        os.rename(entry.path, final)
                        log.warning("cache: restored %s (its rebuild was killed)", final)
                        continue
                    except OSError:
                        pass
                shutil.rmtree(entry.path, ignore_errors=True)
                if not os.path.exists(entry.path):
                    removed.append(Path(entry.path))
        for path in removed:
            log.warning("cache: removed %s (left by a build that was killed)", path)
        return sorted(removed)

    def get_or_build(self, kind: str, material: dict, builder: Callable[[Path], dict | None],
                     rebuild: bool | None = None) -> Artifact:
        """Return the artifact for (kind, material), building it with ``builder(tmp_dir)`` if absent.

        ``builder`` writes its files into the folder it is given and may return a dict kept in
        the manifest under "result". The folder is renamed into place atomically after the
        builder returns; on any exception (or interrupt) it is deleted. ``rebuild`` (default:
        the cache's own flag) forces a new build that replaces the old entry. Before building,
        the leftovers of killed builders of this kind are removed (:meth:`remove_stale`)."""
        key = self.key(kind, material)
        rebuild = self.rebuild if rebuild is None else rebuild
        if not rebuild:
            found = self.lookup(kind, key)
            if found is not None:
                log.info("cache hit: %s/%s", kind, key)
                return found
        final = self.path(kind, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        self.remove_stale(kind)
        tmp = _work_dir(final, "tmp")
        tmp.mkdir()
        try:
            t0 = time.perf_counter()
            result = builder(tmp)
            manifest = {"kind": kind, "key": key, "material": material, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                        "build_seconds": round(time.perf_counter() - t0, 3), "result": result or {}}
            atomic_write_json(tmp / MANIFEST, manifest)
            self._install(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("cache %s: %s/%s", "rebuilt" if rebuild else "built", kind, key)
        return Artifact(kind, key, final, manifest, reused=False)

    @staticmethod
    def _install(tmp: Path, final: Path) -> None:
        old = None
        if final.exists():
            old = _work_dir(final, "old")
            os.rename(final, old)
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process installed the same key first: theirs is equally valid.
            if not (final / MANIFEST).is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    # input identity ----------------------------------------------------------------------
    def text_file_digest(self, path: str | os.PathLike, key: str, remember: bool = True) -> str:
        """Content digest of a UTF-8 text file, checking it decodes; memoised by (path, size, mtime).

        Raises DataError naming ``key``, the file and the byte offset of the first invalid byte."""
        path = Path(path).absolute()
        st = path.stat()
        memo_key = f"{path}|{st.st_size}|{st.st_mtime_ns}"
        memo = self._read_memo()
        if memo_key in memo:
            return memo[memo_key]
        h = hashlib.blake2b(digest_size=16)
        decoder = codecs.getincrementaldecoder("utf-8")()
        offset = 0
        with open(path, "rb") as f:
            while block := f.read(_BLOCK):
                h.update(block)
                try:
                    decoder.decode(block)
                except UnicodeDecodeError as e:
                    raise DataError(f"{key}: not valid UTF-8 at byte {offset + e.start}: {path}") from None
                offset += len(block)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise DataError(f"{key}: not valid UTF-8 (truncated character at the end): {path}") from None
        digest = h.hexdigest()
        if remember:
            memo[memo_key] = digest
            try:
                atomic_write_json(self.root / "digests.json", memo)
            except OSError as e:  # a read-only cache still works, only slower
                log.warning("cannot write digest memo in %s: %s", self.root, e)
        return digest

    def _read_memo(self) -> dict[str, Any]:
        try:
            return json.loads((self.root / "digests.json").read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            return {}


def open_cache(cfg) -> ArtifactCache:
    """The artifact cache of a composed config: root ``cfg.paths.cache_dir``, every entry
    rebuilt when ``cfg.cache.rebuild`` is set."""
    return ArtifactCache(cfg.paths.cache_dir, rebuild=bool(cfg.cache.rebuild))
