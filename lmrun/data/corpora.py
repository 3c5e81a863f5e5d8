"""The `data` group: which text a stage reads, split into train and validation files.

Presets (conf/data/): ``tinyshakespeare`` (embedded in the package, see corpora/SOURCES.md),
``text_files`` (a user's UTF-8 files), ``jsonl`` (one JSON object per line, the document under
``data.field``), ``parquet`` (the string column ``data.column``, local files, read with pyarrow)
and ``mixture`` (several sources weighted by tokens). ``data.train`` / ``data.val`` take a file,
a directory, a glob or a list of these. Readers: lmrun/data/formats.py; mixtures:
lmrun/data/mixture.py.

A single plain-text train file is split as it always was: without a validation file, the last
``val_fraction`` of its bytes, cut at a document separator (else a line break), becomes the
validation split. Every other input is streamed document by document into the cache
(``corpus/<key>/train.txt``, ``val.txt``), documents joined with ``document_separator`` (each
document followed by it), so the tokenizer and encoder read plain text as before; without
``data.val`` the validation split is the documents after the first ``1 - val_fraction`` of the
text (cut between documents). The key covers every input file's content digest and every
config value that changes the text. Bad records (formats.py) raise a one-line DataError
naming the file and line/row before anything is written, or with ``data.on_bad_record=skip``
are skipped, counted and reported (``Corpus.info``, the token arrays' meta.json).
"""
from __future__ import annotations

import json
import logging
import os
from array import array
from dataclasses import dataclass
from dataclasses import field as dc_field
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np

from lmrun.data.formats import (BAD_RECORD_POLICIES, FORMATS, bad_record_error, read_documents, resolve_files,
                                scan_file)
from lmrun.data.mixture import write_mixture
from lmrun.errors import ConfigError, DataError, check, check_choice
from lmrun.tracking.cache import ArtifactCache
from lmrun.tracking.files import atomic_write_json

log = logging.getLogger(__name__)

EMBEDDED_DIR = Path(__file__).parent / "corpora"
PKG_PREFIX = "pkg://"
_WINDOW = 1 << 20
#: Bump when the streamed (document) corpus layout changes for the same inputs.
CORPUS_FORMAT_VERSION = 1
SCAN_MEMO = "scans.json"


@dataclass
class SourceConfig:
    """One source of a mixture (``data.mixture.<name>``): ``train`` (a file, directory, glob or
    list), ``weight`` (> 0; weights are normalised to sum to 1; shares of the train split's
    tokens), and ``format`` / ``field`` / ``column`` (null: those of ``data``)."""

    train: Any = None
    weight: float = 1.0
    format: Optional[str] = None
    field: Optional[str] = None
    column: Optional[str] = None


@dataclass
class DataConfig:
    """name: preset name; format: text | jsonl | parquet; train/val: a file, a directory, a glob
    or a list of these (``pkg://NAME`` is an embedded corpus); val_fraction: share of the train
    text held out when ``val`` is null; document_separator: the special token between documents;
    field: the JSONL field holding a document; column: the Parquet column holding a document;
    mixture: named sources weighted by tokens (with it, ``train`` stays null); seed: the
    mixture's sampling seed (independent of the training seed); on_bad_record: error | skip."""

    name: str = "tinyshakespeare"
    format: str = "text"
    train: Any = None
    val: Any = None
    val_fraction: float = 0.1
    document_separator: str = "<|endoftext|>"
    field: str = "text"
    column: str = "text"
    mixture: Dict[str, Any] = dc_field(default_factory=dict)  # name -> SourceConfig fields (checked)
    seed: int = 0
    on_bad_record: str = "error"


@dataclass
class Corpus:
    """A resolved dataset: train and validation text files and their identity. For a mixture,
    ``mixture`` lists the sources (name, weight, their own train/val text files); ``train`` /
    ``val`` are then the byte-weighted mixtures (what a tokenizer is trained on; built by
    :meth:`ensure_text` when first needed), and the token arrays are mixed by tokens
    (lmrun.tokenizer.artifacts)."""

    name: str
    train: Path
    val: Path
    sources: list[dict]  # [{"role", "path", "bytes", "digest"}] of the files read
    train_identity: dict  # what determines the train split's content (for cache keys)
    info: dict = dc_field(default_factory=dict)  # format, documents, skipped records, mixture shares
    mixture: Optional[list] = None  # [{"name", "weight", "train", "val", "train_ends", "val_ends": Path}]
    _text_builder: Optional[Any] = dc_field(default=None, repr=False)

    def ensure_text(self) -> None:
        """Make sure ``train`` and ``val`` exist: a mixture's byte-weighted text is built (into
        the cache) only when something reads it — training a tokenizer, a tokenizer report."""
        if self._text_builder is not None:
            self._text_builder()


def _is_list(value) -> bool:
    return isinstance(value, (list, tuple)) or type(value).__name__ == "ListConfig"


def source_config(name: str, value) -> SourceConfig:
    """``data.mixture.<name>`` as a SourceConfig: a mapping with the keys train, weight, format,
    field, column (or a bare path/glob/list: the train files, weight 1). ConfigError naming the
    key for anything else."""
    from dataclasses import fields

    if isinstance(value, (str, list, tuple)) or _is_list(value):
        value = {"train": value}
    if not hasattr(value, "items"):
        raise ConfigError(f"data.mixture.{name}={value!r}: expected a mapping like {{train: PATH, weight: 0.5}}")
    allowed = [f.name for f in fields(SourceConfig)]
    for k in value:
        check(f"data.mixture.{name}.{k}", value[k], k in allowed, "one of the keys " + ", ".join(allowed))
    out = SourceConfig(**{k: value[k] for k in value})
    try:
        out.weight = float(out.weight)
    except (TypeError, ValueError):
        raise ConfigError(f"data.mixture.{name}.weight={out.weight!r}: expected a number > 0") from None
    return out


def validate_data(cfg: DataConfig) -> None:
    """Raise ConfigError for an impossible data config (no file reads)."""
    check_choice("data.format", cfg.format, list(FORMATS))
    check_choice("data.on_bad_record", cfg.on_bad_record, list(BAD_RECORD_POLICIES))
    check("data.val_fraction", cfg.val_fraction, 0.0 < cfg.val_fraction < 1.0, "a number in (0, 1)")
    check("data.document_separator", cfg.document_separator, bool(cfg.document_separator), "a non-empty string")
    check("data.field", cfg.field, bool(cfg.field), "the JSONL field holding a document, e.g. text")
    check("data.column", cfg.column, bool(cfg.column), "the Parquet column holding a document, e.g. text")
    mixture = cfg.mixture or {}
    if mixture:
        check("data.train", cfg.train, cfg.train is None, "null with data.mixture (each source has its own train)")
        check("data.val", cfg.val, cfg.val is None, "null with data.mixture (each source's split is held out)")
        for name, src in mixture.items():
            key = f"data.mixture.{name}"
            src = source_config(name, src)
            check(f"{key}.train", src.train, bool(src.train), "a file, directory, glob or list of them")
            check(f"{key}.weight", src.weight, src.weight is not None and src.weight > 0, "a number > 0")
            if src.format is not None:
                check_choice(f"{key}.format", src.format, list(FORMATS))
        return
    check("data.train", cfg.train, bool(cfg.train),
          f"a file, directory, glob or list of {cfg.format} files (required with data={cfg.name})")


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


def _prepare_text_file(cfg: DataConfig, cache: ArtifactCache, dry_run: bool) -> Corpus:
    """One plain-text train file (and optionally one validation file): byte-exact split."""
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



def _single_text_file(cfg: DataConfig) -> bool:
    """The original layout: plain text, one train file (and at most one validation file)."""
    def one_file(v):
        if v is None:
            return True
        if _is_list(v) or any(c in str(v) for c in "*?["):
            return False
        return str(v).startswith(PKG_PREFIX) or not os.path.isdir(os.path.expanduser(str(v)))
    return cfg.format == "text" and not cfg.mixture and one_file(cfg.train) and one_file(cfg.val)


def prepare_corpus(cfg: DataConfig, cache: ArtifactCache, dry_run: bool = False) -> Corpus:
    """Resolve ``cfg`` to train/validation text files (module docstring), checking every input.

    Files other than a single plain-text file are scanned first (one streaming pass: content
    digest, documents, bad records; remembered in the cache's ``scans.json`` by path, size and
    mtime), so a bad record stops the run before anything is written. The split (and a
    mixture's text) is built once into the cache (``corpus/<key>/``). With ``dry_run`` nothing
    is written and the returned paths may not exist yet.
    Raises DataError (a missing or empty file, a bad record: file and line/row) or ConfigError."""
    validate_data(cfg)
    if _single_text_file(cfg):
        return _prepare_text_file(cfg, cache, dry_run)
    return _prepare_documents(cfg, cache, dry_run)


_SCANS: dict[str, dict] = {}  # this process's scans (plan, then run)


def _scan(cache: ArtifactCache, path: Path, fmt: str, reader: dict, remember: bool) -> dict:
    st = path.stat()
    what = reader["field"] if fmt == "jsonl" else reader["column"] if fmt == "parquet" else reader["separator"]
    memo_key = f"{path}|{st.st_size}|{st.st_mtime_ns}|{fmt}|{what}|v{CORPUS_FORMAT_VERSION}"
    if memo_key not in _SCANS:
        try:
            disk = json.loads((cache.root / SCAN_MEMO).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            disk = {}
        _SCANS[memo_key] = disk.get(memo_key) or scan_file(path, fmt, **reader)
    if remember:
        try:
            disk = json.loads((cache.root / SCAN_MEMO).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            disk = {}
        if memo_key not in disk:
            disk[memo_key] = _SCANS[memo_key]
            try:
                atomic_write_json(cache.root / SCAN_MEMO, disk)
            except OSError:  # a read-only cache still works, only slower
                pass
    return _SCANS[memo_key]


def _sources_of(cfg: DataConfig) -> list[dict]:
    """The data config as a list of sources: name, weight (normalised), format, reader
    arguments, train spec, val spec."""
    def reader(fmt, fld, col):
        return {"field": fld, "column": col, "separator": cfg.document_separator}

    if cfg.mixture:
        mixture = {name: source_config(name, s) for name, s in sorted(cfg.mixture.items())}
        total = sum(s.weight for s in mixture.values())
        return [{"name": name, "weight": s.weight / total, "format": s.format or cfg.format,
                 "reader": reader(s.format or cfg.format, s.field or cfg.field, s.column or cfg.column),
                 "train": s.train, "val": None, "key": f"data.mixture.{name}.train"}
                for name, s in mixture.items()]
    return [{"name": cfg.name, "weight": 1.0, "format": cfg.format, "reader": reader(cfg.format, cfg.field, cfg.column),
             "train": cfg.train, "val": cfg.val, "key": "data.train"}]


def _spec_files(spec, key: str, fmt: str) -> list[Path]:
    """The files of a ``data.train`` / ``data.val`` value (formats.resolve_files; ``pkg://``
    names an embedded corpus, also inside a list)."""
    items = [str(x) for x in spec] if _is_list(spec) else [str(spec)]
    out: list[Path] = []
    for item in items:
        out += [resolve_path(item, key)] if item.startswith(PKG_PREFIX) else resolve_files(item, key, fmt)
    if not out:
        raise DataError(f"{key}: an empty list of files")
    return out


def _prepare_documents(cfg: DataConfig, cache: ArtifactCache, dry_run: bool) -> Corpus:
    srcs = _sources_of(cfg)
    sources, info_sources = [], []
    for src in srcs:
        src["scans"] = {}
        for role in ("train", "val"):
            if src[role] is None:
                continue
            key = src["key"] if role == "train" else "data.val"
            scans = []
            for path in _spec_files(src[role], key, src["format"]):
                scan = _scan(cache, path, src["format"], src["reader"], remember=not dry_run)
                if scan["bad_records"] and cfg.on_bad_record == "error":
                    raise bad_record_error(key, scan["first_bad"]["where"], scan["first_bad"]["reason"])
                scans.append(scan)
                role_name = role if not cfg.mixture else f"{role}:{src['name']}"
                sources.append({"role": role_name, "path": str(path), "bytes": scan["bytes"], "digest": scan["digest"],
                                "format": src["format"]})
            docs = sum(s["documents"] for s in scans)
            if docs == 0:
                raise DataError(f"{key}: no document in {len(scans)} file(s) "
                                f"({', '.join(s['path'] for s in scans[:3])}) after skipping bad records")
            src["scans"][role] = scans
        info_sources.append({
            "name": src["name"], "format": src["format"], "weight": round(src["weight"], 6),
            "files": sum(len(v) for v in src["scans"].values()),
            "documents": sum(s["documents"] for v in src["scans"].values() for s in v),
            "document_bytes": sum(s["document_bytes"] for v in src["scans"].values() for s in v),
            "skipped_records": sum(s["bad_records"] for v in src["scans"].values() for s in v)})
    material = {"version": CORPUS_FORMAT_VERSION, "separator": cfg.document_separator,
                "val_fraction": cfg.val_fraction, "on_bad_record": cfg.on_bad_record,
                "sources": [{"name": s["name"], "weight": s["weight"], "format": s["format"],
                             "field": s["reader"]["field"] if s["format"] == "jsonl" else None,
                             "column": s["reader"]["column"] if s["format"] == "parquet" else None,
                             "train": [f["digest"] for f in s["scans"]["train"]],
                             "val": [f["digest"] for f in s["scans"].get("val", [])]} for s in srcs]}
    if cfg.mixture:
        material["seed"] = int(cfg.seed)
    key = cache.key("corpus", material)
    info = {"format": cfg.format if not cfg.mixture else "mixture", "on_bad_record": cfg.on_bad_record,
            "sources": info_sources,
            "skipped_records": sum(s["skipped_records"] for s in info_sources)}
    if info["skipped_records"]:
        log.warning("data: %d bad record(s) skipped (data.on_bad_record=skip): %s", info["skipped_records"],
                    "; ".join(f"{s['first_bad']['where']}: {s['first_bad']['reason']}" for src in srcs
                              for v in src["scans"].values() for s in v if s["first_bad"])[:500])
    where = cache.path("corpus", key)

    text_material = {**material, "mixed_text": "bytes"}  # a mixture's text: its own cache entry, built on demand
    text_dir = cache.path("corpus", cache.key("corpus", text_material)) if cfg.mixture else None

    def corpus_of(root: Path, result: dict | None) -> Corpus:
        full = dict(info)
        if result:
            full.update(result)
        if not cfg.mixture:
            return Corpus(cfg.name, root / "train.txt", root / "val.txt", sources, material, full)
        mix = [{"name": s["name"], "weight": s["weight"], "train": root / "sources" / s["name"] / "train.txt",
                "val": root / "sources" / s["name"] / "val.txt",
                "train_ends": root / "sources" / s["name"] / "train.ends.npy",  # document end offsets, bytes
                "val_ends": root / "sources" / s["name"] / "val.ends.npy"} for s in srcs]
        corpus = Corpus(cfg.name, text_dir / "train.txt", text_dir / "val.txt", sources, material, full, mix)
        if not dry_run:
            corpus._text_builder = lambda: cache.get_or_build(
                "corpus", text_material, lambda out: _write_mixed_text(root, srcs, int(cfg.seed), out))
        return corpus

    if dry_run:
        found = cache.lookup("corpus", key) if not cache.rebuild else None
        return corpus_of(where, found.manifest.get("result") if found else None)

    def build(out: Path) -> dict:
        sep = cfg.document_separator.encode("utf-8")
        results = []
        for src in srcs:
            folder = out / "sources" / src["name"] if cfg.mixture else out
            folder.mkdir(parents=True, exist_ok=True)
            results.append(_write_source(src, cfg, folder, sep, keep_ends=bool(cfg.mixture)))
        if not cfg.mixture:
            return {"splits": results[0]}
        for i, src in enumerate(srcs):
            info_sources[i]["splits"] = results[i]
        return {"sources": info_sources}

    artifact = cache.get_or_build("corpus", material, build)
    return corpus_of(artifact.path, artifact.manifest.get("result"))


def _write_mixed_text(root: Path, srcs: list[dict], seed: int, out: Path) -> dict:
    """A mixture's text (``train.txt`` / ``val.txt`` in ``out``): the sources' documents under
    ``root/sources/<name>/`` chosen by UTF-8 bytes with the mixture weights (lmrun/data/mixture.py).
    What a tokenizer is trained on; the token arrays are mixed by tokens instead."""
    weights = [s["weight"] for s in srcs]
    result = {}
    for split in ("train", "val"):
        ends = [np.load(root / "sources" / s["name"] / f"{split}.ends.npy") for s in srcs]
        files = [open(root / "sources" / s["name"] / f"{split}.txt", "rb") for s in srcs]
        try:
            def read(i, a, b, files=files):
                files[i].seek(a)
                return files[i].read(b - a)

            with open(out / f"{split}.txt", "wb") as fo:
                total = None if split == "train" else min(int(e[-1]) / w for e, w in zip(ends, weights))
                mix = write_mixture(ends, read, lambda chunks: fo.write(b"".join(chunks)), weights, seed, total)
        finally:
            for f in files:
                f.close()
        result[split] = {"bytes": mix["total"], "byte_shares": {s["name"]: m["share"]
                                                                for s, m in zip(srcs, mix["sources"])}}
    return result


def _write_source(src: dict, cfg: DataConfig, folder: Path, sep: bytes, keep_ends: bool) -> dict:
    """Stream one source's documents into ``folder/train.txt`` and ``val.txt`` (each document
    followed by the separator); without its own validation files the split is cut at the first
    document end at or after ``1 - val_fraction`` of the text. ``keep_ends``: also write each
    split's document end offsets (bytes, int64) to ``<split>.ends.npy``. Returns per split
    ``{"documents", "bytes"}`` and the skipped record counts."""
    reader = src["reader"]
    skipped: dict = {}
    train_scans, val_scans = src["scans"]["train"], src["scans"].get("val")
    total = sum(s["document_bytes"] + s["documents"] * len(sep) for s in train_scans)
    target = None if val_scans else total * (1.0 - cfg.val_fraction)
    stats = {"train": {"documents": 0, "bytes": 0}, "val": {"documents": 0, "bytes": 0}}
    ends = {"train": array("q"), "val": array("q")}
    outs = {"train": open(folder / "train.txt", "wb"), "val": open(folder / "val.txt", "wb")}
    try:
        def pump(scans, split, key):
            nonlocal target
            for scan in scans:
                for piece, end in read_documents(Path(scan["path"]), src["format"], key, cfg.on_bad_record, skipped,
                                                 **reader):
                    st = stats[split]
                    outs[split].write(piece)
                    st["bytes"] += len(piece)
                    if end:
                        outs[split].write(sep)
                        st["bytes"] += len(sep)
                        st["documents"] += 1
                        if keep_ends:
                            ends[split].append(st["bytes"])
                        if target is not None and split == "train" and st["bytes"] >= target:
                            split, target = "val", None

        pump(train_scans, "train", src["key"])
        if val_scans:
            pump(val_scans, "val", "data.val")
    finally:
        for f in outs.values():
            f.close()
    if stats["val"]["documents"] == 0 or stats["train"]["documents"] == 0:
        raise DataError(f"{src['key']}: cannot split {stats['train']['documents'] + stats['val']['documents']} "
                        f"document(s) into non-empty train and validation parts at data.val_fraction="
                        f"{cfg.val_fraction}; give more documents or validation files with data.val=PATH")
    if keep_ends:
        for split in ("train", "val"):
            np.save(folder / f"{split}.ends.npy", np.frombuffer(ends[split], dtype=np.int64))
    out = dict(stats)
    if skipped:
        out["skipped"] = skipped
    return out


def read_prefix(path: Path, max_bytes: int) -> str:
    """The first ``max_bytes`` bytes of a UTF-8 file as text, cut at a character boundary."""
    with open(path, "rb") as f:
        data = f.read(max_bytes)
    return data.decode("utf-8", errors="ignore") if len(data) == max_bytes else data.decode("utf-8")




def data_summary(corpus: Corpus) -> dict:
    """What a stage's plan shows about a streamed corpus: format, documents and document bytes
    (UTF-8, separators excluded) per source, skipped bad records, mixture weights."""
    info = corpus.info
    out = {"format": info.get("format"), "on_bad_record": info.get("on_bad_record"),
           "skipped_records": info.get("skipped_records", 0),
           "sources": [{k: s[k] for k in ("name", "format", "weight", "files", "documents", "document_bytes",
                                          "skipped_records")} for s in info.get("sources", [])]}
    if corpus.mixture:
        out["mixture"] = "documents chosen by tokens of the train split (lmrun/data/mixture.py)"
    return out


__all__ = ["DataConfig", "SourceConfig", "Corpus", "prepare_corpus", "validate_data", "source_config", "data_summary",
           "resolve_path", "read_prefix"]
