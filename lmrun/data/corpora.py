"""The `data` group: which text a stage reads, split into train and validation files.

Presets (conf/data/): ``tinyshakespeare`` (embedded in the package, see corpora/SOURCES.md)
and ``text_files`` (a user's UTF-8 files, ``data.train=PATH [data.val=PATH]``). Without a
validation file the train file is split deterministically: the last ``val_fraction`` of its
bytes, cut at a document separator (else a line break), becomes the validation split. The
split files are derived data and live in the artifact cache.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lmrun.errors import DataError, check
from lmrun.tracking.cache import ArtifactCache

EMBEDDED_DIR = Path(__file__).parent / "corpora"
PKG_PREFIX = "pkg://"
_WINDOW = 1 << 20


@dataclass
class DataConfig:
    """name: preset name; train/val: file paths (``pkg://NAME`` is an embedded corpus);
    val_fraction: share of the train file held out when ``val`` is null;
    document_separator: the special token between documents in the text."""

    name: str = "tinyshakespeare"
    train: str | None = None
    val: str | None = None
    val_fraction: float = 0.1
    document_separator: str = "<|endoftext|>"


@dataclass
class Corpus:
    """A resolved dataset: train and validation text files and their identity."""

    name: str
    train: Path
    val: Path
    sources: list[dict]  # [{"role", "path", "bytes", "digest"}] of the files read
    train_identity: dict  # what determines the train split's content (for cache keys)


def validate_data(cfg: DataConfig) -> None:
    """Raise ConfigError for an impossible data config (no file reads)."""
    check("data.train", cfg.train, bool(cfg.train), f"a UTF-8 text file path (required with data={cfg.name})")
    check("data.val_fraction", cfg.val_fraction, 0.0 < cfg.val_fraction < 1.0, "a number in (0, 1)")
    check("data.document_separator", cfg.document_separator, bool(cfg.document_separator), "a non-empty string")


def resolve_path(value: str, key: str) -> Path:
    """``pkg://NAME`` -> the embedded corpus file; otherwise an expanded absolute path.

    Raises DataError for a missing or empty file."""
    if value.startswith(PKG_PREFIX):
        path = EMBEDDED_DIR / value[len(PKG_PREFIX):]
    else:
        path = Path(value).expanduser().absolute()
    if not path.is_file():
        raise DataError(f"{key}: file not found: {path}")
    if path.stat().st_size == 0:
        raise DataError(f"{key}: file is empty: {path}")
    return path


def _split_offset(path: Path, val_fraction: float, separator: bytes) -> int:
    """Byte offset where validation starts: after the first document separator (else the first
    line break) at or after (1 - val_fraction) of the file. 0 < offset < size, or DataError."""
    size = path.stat().st_size
    target = int(size * (1.0 - val_fraction))
    with open(path, "rb") as f:
        for needle in (separator, b"\n"):
            pos = target
            while pos < size:
                f.seek(pos)
                window = f.read(_WINDOW + len(needle))
                i = window.find(needle)
                if i >= 0:
                    cut = pos + i + len(needle)
                    if 0 < cut < size:
                        return cut
                    break
                pos += _WINDOW
    raise DataError(
        f"data.val_fraction={val_fraction}: cannot split {path} into two non-empty parts at a document "
        "or line boundary; give a validation file with data.val=PATH"
    )


def _copy_range(src: Path, dst: Path, start: int, end: int) -> None:
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        fi.seek(start)
        remaining = end - start
        while remaining > 0:
            block = fi.read(min(remaining, _WINDOW * 8))
            if not block:
                break
            fo.write(block)
            remaining -= len(block)


def prepare_corpus(cfg: DataConfig, cache: ArtifactCache, dry_run: bool = False) -> Corpus:
    """Resolve ``cfg`` to train/validation files, checking each is present, non-empty UTF-8.

    Without ``cfg.val`` the split is built once into the cache (``corpus/<key>/``). With
    ``dry_run`` nothing is written and the returned paths may not exist yet.
    Raises DataError (missing, empty or non-UTF-8 file) or ConfigError."""
    validate_data(cfg)
    train_src = resolve_path(cfg.train, "data.train")
    sources = [{"role": "train", "path": str(train_src), "bytes": train_src.stat().st_size,
                "digest": cache.text_file_digest(train_src, "data.train", remember=not dry_run)}]
    if cfg.val:
        val_src = resolve_path(cfg.val, "data.val")
        sources.append({"role": "val", "path": str(val_src), "bytes": val_src.stat().st_size,
                        "digest": cache.text_file_digest(val_src, "data.val", remember=not dry_run)})
        return Corpus(cfg.name, train_src, val_src, sources, {"train": sources[0]["digest"]})

    separator = cfg.document_separator.encode("utf-8")
    material = {"train": sources[0]["digest"], "val_fraction": cfg.val_fraction, "separator": cfg.document_separator}
    key = cache.key("corpus", material)
    if dry_run:
        where = cache.path("corpus", key)
        return Corpus(cfg.name, where / "train.txt", where / "val.txt", sources, material)

    def build(out: Path) -> dict:
        cut = _split_offset(train_src, cfg.val_fraction, separator)
        size = train_src.stat().st_size
        _copy_range(train_src, out / "train.txt", 0, cut)
        _copy_range(train_src, out / "val.txt", cut, size)
        return {"train_bytes": cut, "val_bytes": size - cut, "source": str(train_src)}

    artifact = cache.get_or_build("corpus", material, build)
    return Corpus(cfg.name, artifact.path / "train.txt", artifact.path / "val.txt", sources, material)


def read_prefix(path: Path, max_bytes: int) -> str:
    """The first ``max_bytes`` bytes of a UTF-8 file as text, cut at a character boundary."""
    with open(path, "rb") as f:
        data = f.read(max_bytes)
    return data.decode("utf-8", errors="ignore") if len(data) == max_bytes else data.decode("utf-8")


__all__ = ["DataConfig", "Corpus", "prepare_corpus", "validate_data", "resolve_path", "read_prefix"]
