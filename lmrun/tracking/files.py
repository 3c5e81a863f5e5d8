"""Small file utilities shared by every stage: atomic writes, strict JSON, content digests, file
locks, and the clean-up of temporary files left by dead writers."""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import numbers
import os
import re
import secrets
import socket
import time
from pathlib import Path
from typing import Any, BinaryIO, Callable

_BLOCK = 1 << 20


# --- temporary files ---------------------------------------------------------------------------
def host_tag() -> str:
    """This host's short name as it appears in temporary file names: letters, digits and '-' only
    (the first label of the host name), so that a name splits unambiguously on dots."""
    name = socket.gethostname().split(".", 1)[0]
    return re.sub(r"[^A-Za-z0-9-]", "-", name) or "host"


#: ``.<name>.<host>.<pid>.<random>.tmp``: what :func:`atomic_write` writes before its rename
_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.(?P<rand>[0-9a-f]{8})\.tmp$")


def temp_path(path: str | os.PathLike) -> Path:
    """A fresh temporary path beside ``path`` for writing it atomically:
    ``<folder>/.<name>.<host>.<pid>.<random>.tmp``. The writer's host and pid in the name let
    :func:`remove_stale_temp_files` tell a dead writer's leftovers from a live writer's file.
    Nothing is created; :func:`atomic_write` creates it exclusively."""
    path = Path(path)
    return path.with_name(f".{path.name}.{host_tag()}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def _create_temp(path: Path) -> tuple[int, Path]:
    """Create a new temporary file for ``path`` (O_EXCL, mode 0o666 less the umask, like
    ``open(path, 'w')`` would): returns ``(fd, tmp)``."""
    for _ in range(100):
        tmp = temp_path(path)
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666), tmp
        except FileExistsError:  # 32 random bits collided: draw again
            continue
    raise FileExistsError(f"cannot create a temporary file beside {path}")


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (a process owned by another user counts)."""
    if pid <= 0:
        return True  # not a real writer's pid: never treat it as dead
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return True
    return True


def remove_stale_temp_files(directory: str | os.PathLike) -> list[Path]:
    """Remove the temporary files that dead writers left in ``directory`` (not recursive); returns
    the removed paths, sorted.

    A temporary file is one named by :func:`temp_path`, ``.<name>.<host>.<pid>.<random>.tmp``. It
    is removed only when ``<host>`` is this host and no process ``<pid>`` exists here (a killed
    writer). Kept: a live writer's file (its own process included), files written from other
    hosts (a shared filesystem: their writers cannot be checked from here), and any other name.
    A missing ``directory`` removes nothing. A file that vanishes meanwhile (its writer renamed it
    or another clean-up removed it) is not an error."""
    directory = Path(directory)
    try:
        entries = list(os.scandir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return []
    host, removed = host_tag(), []
    for entry in entries:
        m = _TEMP_RE.match(entry.name)
        if m is None or m["host"] != host or pid_alive(int(m["pid"])):
            continue
        try:
            if not entry.is_file(follow_symlinks=False):
                continue
            os.unlink(entry.path)
        except FileNotFoundError:
            continue
        removed.append(Path(entry.path))
    return sorted(removed)


# --- locks -------------------------------------------------------------------------------------
class LockHeld(Exception):
    """Another process holds a :class:`FileLock`; ``holder`` names it ("pid N on host H")."""

    def __init__(self, path: Path, holder: str):
        super().__init__(f"{path} is held by {holder}")
        self.path, self.holder = path, holder


class FileLock:
    """An exclusive lock on a file (``fcntl.flock``, never waits) that records its holder in it.

    Use :meth:`acquire`, then :meth:`release` (or ``with``). The kernel releases the lock when
    the holder's process ends, however it ends (kill -9 included), so a dead holder never blocks
    the next one; on a shared filesystem (NFS) the lock is seen across hosts where the
    filesystem supports flock (where it does not, the lock is not taken and a warning is logged).
    The file stays (empty once released): removing it would let two processes lock two
    different files of the same name."""

    def __init__(self, path: Path, fd: int, locked: bool = True):
        self.path, self._fd, self.locked = path, fd, locked

    @classmethod
    def acquire(cls, path: str | os.PathLike, **record) -> "FileLock":
        """Lock ``path`` (created with its folder if missing) and write a JSON record of this
        holder into it: pid, host, Slurm job id if any, time, and ``record``. LockHeld if another
        process (or another open of the file in this one) holds it; OSError if it cannot be created."""
        import fcntl

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(fd)
            os.close(fd)
            raise LockHeld(path, holder) from None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                os.close(fd)
                raise
            locked = False
            # a filesystem without locks (some Lustre/NFS mounts): go on unguarded rather than not at all
            logging.getLogger(__name__).warning("%s: this filesystem does not support file locks (%s); "
                                                "concurrent writers are not detected", path, e.strerror)
        except BaseException:
            os.close(fd)
            raise
        else:
            locked = True
        info = {"pid": os.getpid(), "host": socket.gethostname(), "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
                "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **record}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info, default=str) + "\n").encode("utf-8"), 0)
        return cls(path, fd, locked)

    def release(self) -> None:
        """Empty the record and unlock (a second call does nothing)."""
        import fcntl

        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
            if self.locked:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> "FileLock":
        return self

    def __exit__(self, *exc) -> bool:
        self.release()
        return False


def _lock_holder(fd: int) -> str:
    """'pid N on host H' from a lock file's record (written just after the lock is taken: wait
    up to a second for it)."""
    for _ in range(20):
        try:
            holder = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
            return f"pid {holder['pid']} on host {holder['host']}"
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            time.sleep(0.05)
    return "another process"


# --- atomic writes -----------------------------------------------------------------------------
def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> None:
    """Create ``path`` atomically: ``write(f)`` fills a temporary file in the same folder (see
    :func:`temp_path`), which is fsynced and renamed over ``path`` (then the folder is fsynced
    where POSIX allows). The file gets mode ``0o666`` less the process umask (0644 under umask
    022), as a plain ``open()`` would give — not tempfile's 0600.

    A reader sees the old file or the new one, never a partial write; on any error or interrupt
    the temporary file is removed, the old file is kept and the error propagates."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """UTF-8 text version of :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8"))


# --- strict JSON -------------------------------------------------------------------------------
def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, ±Infinity; NumPy floats included) replaced by
    None, recursively through dicts, lists and tuples (tuples become lists). JSON has no NaN or
    Infinity: Python's ``json`` would write the non-standard tokens, which other readers reject.
    Other values are returned unchanged."""
    if isinstance(obj, bool) or obj is None or isinstance(obj, (str, int)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, numbers.Real) and not isinstance(obj, numbers.Integral):  # e.g. numpy.float32
        value = float(obj)
        return value if math.isfinite(value) else None
    return obj


def json_dumps(obj: Any, **kwargs) -> str:
    """``json.dumps`` for result files: non-finite floats become null (:func:`json_safe`), other
    unknown objects their ``str``, and ``allow_nan=False``, so that a NaN or Infinity that slips
    past the conversion raises ValueError instead of writing invalid JSON. ``kwargs`` go to
    ``json.dumps`` (e.g. ``indent``)."""
    kwargs.setdefault("default", str)
    return json.dumps(json_safe(obj), allow_nan=False, **kwargs)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented, strict JSON, atomically: non-finite floats are written as null
    (see :func:`json_dumps`)."""
    atomic_write_text(path, json_dumps(obj, indent=2, ensure_ascii=False) + "\n")


# --- digests -----------------------------------------------------------------------------------
def file_digest(path: str | os.PathLike) -> str:
    """BLAKE2b-128 hex digest of a file's bytes, streamed in 1 MiB blocks (memory O(1))."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            h.update(block)
    return h.hexdigest()


def config_digest(obj: Any, length: int = 8) -> str:
    """Short SHA-256 hex digest of a JSON-serialisable object (keys sorted), e.g. a resolved config."""
    blob = json.dumps(obj, sort_keys=True, default=str, ensure_ascii=False).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:length]


def save_figure(fig, path: str | os.PathLike, **savefig_kwargs) -> None:
    """Write a matplotlib figure atomically (see :func:`atomic_write`; the format follows the
    suffix, PNG by default) and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    savefig_kwargs.setdefault("format", path.suffix.lstrip(".").lower() or "png")
    try:
        fig.tight_layout()
        atomic_write(path, lambda f: fig.savefig(f, **savefig_kwargs))
    finally:
        plt.close(fig)
