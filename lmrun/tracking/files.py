"""Small file utilities shared by every stage: atomic writes and content digests."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

_BLOCK = 1 << 20


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> None:
    """Create ``path`` atomically: ``write(f)`` fills a temporary file in the same folder, which
    is fsynced and renamed over ``path`` (then the folder is fsynced where POSIX allows).

    A reader sees the old file or the new one, never a partial write; on any error or interrupt
    the temporary file is removed and the old file is kept."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
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


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


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
    """Write a matplotlib figure as PNG atomically (temp file + rename) and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    tmp = path.with_suffix(".tmp.png")
    try:
        fig.tight_layout()
        fig.savefig(tmp, **savefig_kwargs)
    finally:
        plt.close(fig)
    tmp.replace(path)
