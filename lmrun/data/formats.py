"""Document readers for the corpus formats researchers use: plain text, JSONL and Parquet.

Each reader streams one file and yields its documents as UTF-8 ``bytes`` pieces, never the
whole file, so memory is bounded by the largest record (a JSONL line, a Parquet batch, a text
line), not by the file:

- ``text``: documents are separated by the document separator (e.g. ``<|endoftext|>``); the
  file's end also ends a document. A record (for errors) is a line.
- ``jsonl``: one JSON object per line; the document is the string under ``field`` (default
  ``text``). Blank lines are ignored.
- ``parquet``: the string (or UTF-8 binary) column ``column`` (default ``text``), read in
  record batches with pyarrow; local files only. A record is a row (counted from 1).

Bad records — a JSONL line that is not JSON, an object without the field, a non-string value,
a missing column, an empty shard (no documents at all), text that is not valid UTF-8 — are
reported as :class:`BadRecord` (file, line/row, reason). :func:`scan_file` counts them and
digests the file; :func:`read_documents` raises :class:`DataError` at the first one, or skips
it with ``on_bad_record="skip"``.

``resolve_files`` turns ``data.train`` (a file, a directory, a glob or a list of these) into a
sorted list of files.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lmrun.errors import DataError

FORMATS = ("text", "jsonl", "parquet")
BAD_RECORD_POLICIES = ("error", "skip")
#: file name endings picked from a directory, per format (any non-hidden file for text)
EXTENSIONS = {"text": None, "jsonl": (".jsonl", ".json", ".ndjson"), "parquet": (".parquet", ".pq")}
#: Parquet rows read per batch (bounds memory: one batch of strings at a time)
PARQUET_BATCH_ROWS = 4096
#: Parquet read buffer (bytes): reads stream through it, so memory does not grow with the file
PARQUET_BUFFER_BYTES = 1 << 20
_BLOCK = 1 << 20


@dataclass
class BadRecord:
    """A record that cannot be a document: where it is (1-based line or row) and why."""

    path: Path
    unit: str  # "line" or "row" or "file"
    number: int
    reason: str

    def where(self) -> str:
        return str(self.path) if self.unit == "file" else f"{self.path} {self.unit} {self.number}"


class _Skip(Exception):
    pass


def resolve_files(spec, key: str, fmt: str) -> list[Path]:
    """The files ``spec`` names: a path to a file, a directory (its files with the format's
    endings, recursively, sorted), a glob pattern (``*``, ``?``, ``[``; ``**`` recurses; sorted)
    or a list of these (in the order given). Raises DataError naming ``key`` for a path that does
    not exist or a directory / glob that matches no file."""
    items = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    if not items:
        raise DataError(f"{key}: an empty list of files")
    out: list[Path] = []
    for item in items:
        item = os.path.expanduser(str(item))
        if any(c in item for c in "*?["):
            found = [Path(p).absolute() for p in sorted(glob.glob(item, recursive=True)) if os.path.isfile(p)]
            if not found:
                raise DataError(f"{key}: no file matches the pattern {item}")
        elif os.path.isdir(item):
            ends = EXTENSIONS[fmt]
            found = sorted(p.absolute() for p in Path(item).rglob("*") if p.is_file()
                           and not any(part.startswith(".") for part in p.relative_to(item).parts)
                           and (ends is None or p.name.lower().endswith(ends)))
            if not found:
                what = "file" if ends is None else "file ending in " + "/".join(ends)
                raise DataError(f"{key}: the directory {item} holds no {what}")
        elif os.path.isfile(item):
            found = [Path(item).absolute()]
        else:
            raise DataError(f"{key}: file not found: {Path(item).absolute()}")
        out += found
    return out


# ----------------------------------------------------------------------------------------------
# readers: (piece bytes, ends a document) or BadRecord
# ----------------------------------------------------------------------------------------------
def _text_pieces(path: Path, separator: bytes, hasher) -> Iterator[tuple[bytes, bool] | BadRecord]:
    pending = False  # a document has started and not ended
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if hasher is not None:
                hasher.update(line)
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                yield BadRecord(path, "line", number, f"not valid UTF-8 (byte {e.start} of the line)")
                continue
            parts = line.split(separator)
            for i, part in enumerate(parts):
                last = i == len(parts) - 1
                if part:
                    pending = True
                    yield part, False
                if not last and pending:
                    yield b"", True
                    pending = False
    if pending:
        yield b"", True


def _jsonl_pieces(path: Path, field: str, hasher) -> Iterator[tuple[bytes, bool] | BadRecord]:
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if hasher is not None:
                hasher.update(line)
            if not line.strip():
                continue
            try:
                obj = json.loads(line.rstrip(b"\r\n"))
            except UnicodeDecodeError as e:
                yield BadRecord(path, "line", number, f"not valid UTF-8 (byte {e.start} of the line)")
                continue
            except json.JSONDecodeError as e:
                yield BadRecord(path, "line", number, f"not JSON ({e.msg}: column {e.colno})")
                continue
            if not isinstance(obj, dict):
                yield BadRecord(path, "line", number,
                                f"a JSON {type(obj).__name__}, not an object with a {field!r} field")
                continue
            if field not in obj:
                yield BadRecord(path, "line", number, f"no field {field!r} (fields: {', '.join(list(obj)[:8])}); "
                                                      "set data.field")
                continue
            value = obj[field]
            if not isinstance(value, str):
                yield BadRecord(path, "line", number, f"field {field!r} is a JSON {type(value).__name__}, not a string")
                continue
            try:
                data = value.encode("utf-8")
            except UnicodeEncodeError:
                yield BadRecord(path, "line", number, f"field {field!r} is not valid UTF-8 (an unpaired \\u escape)")
                continue
            if data:
                yield data, True


def _parquet_pieces(path: Path, column: str, hasher) -> Iterator[tuple[bytes, bool] | BadRecord]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if hasher is not None:
        with open(path, "rb") as f:
            while block := f.read(_BLOCK):
                hasher.update(block)
    try:
        # buffered reads, no pre-buffering: without these, iter_batches keeps the whole file's
        # column chunks allocated (peak memory ~ the file's size: 545 MB for a 545 MB file)
        pf = pq.ParquetFile(path, buffer_size=PARQUET_BUFFER_BYTES, pre_buffer=False)
    except (pa.ArrowException, OSError) as e:
        yield BadRecord(path, "file", 0, f"not a Parquet file ({str(e).splitlines()[0]})")
        return
    names = pf.schema_arrow.names
    if column not in names:
        yield BadRecord(path, "file", 0, f"no column {column!r} (columns: {', '.join(names[:8])}); set data.column")
        return
    if pf.metadata.num_rows == 0:
        yield BadRecord(path, "file", 0, "empty shard: no rows")
        return
    kind = pf.schema_arrow.field(column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_binary(kind)
            or pa.types.is_large_binary(kind)):
        yield BadRecord(path, "file", 0, f"column {column!r} has type {kind}, not string")
        return
    row = 0
    for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[column]):
        arr = batch.column(0)
        if pa.types.is_string(kind) or pa.types.is_large_string(kind):
            arr = arr.cast(pa.large_binary())  # bytes as stored: invalid UTF-8 is checked below, per row
        for value in arr.to_pylist():
            row += 1
            if value is None:
                yield BadRecord(path, "row", row, f"column {column!r} is null")
                continue
            try:
                value.decode("utf-8")
            except UnicodeDecodeError as e:
                yield BadRecord(path, "row", row, f"column {column!r} is not valid UTF-8 (byte {e.start})")
                continue
            if value:
                yield value, True


def iter_pieces(path: Path, fmt: str, *, field: str = "text", column: str = "text", separator: str = "<|endoftext|>",
                hasher=None) -> Iterator[tuple[bytes, bool] | BadRecord]:
    """The raw reader: yields ``(piece, ends_document)`` (UTF-8 bytes, documents in order; a
    text document may come in several pieces, the last one's flag True) and :class:`BadRecord`
    for records that cannot be read, then a BadRecord "empty shard" when the file held no
    document. ``hasher`` (a hashlib object) is fed the file's bytes on the way."""
    if fmt == "text":
        gen = _text_pieces(path, separator.encode("utf-8"), hasher)
    elif fmt == "jsonl":
        gen = _jsonl_pieces(path, field, hasher)
    elif fmt == "parquet":
        gen = _parquet_pieces(path, column, hasher)
    else:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    docs = 0
    file_error = False
    for item in gen:
        if isinstance(item, BadRecord):
            file_error |= item.unit == "file"
        elif item[1]:
            docs += 1
        yield item
    if docs == 0 and not file_error:
        yield BadRecord(path, "file", 0, "empty shard: no document in it")


def bad_record_error(key: str, where: str, reason: str) -> DataError:
    """The one-line DataError for a bad record of ``data.train`` (or another ``key``) at
    ``where`` (file, and line or row)."""
    return DataError(f"{key}: {where}: {reason} (fix it, or set data.on_bad_record=skip to skip such records)")


def read_documents(path: Path, fmt: str, key: str, on_bad_record: str = "error", skipped: dict | None = None,
                   **reader_args) -> Iterator[tuple[bytes, bool]]:
    """:func:`iter_pieces` without the bad records: raises the one-line DataError naming ``key``,
    the file and line/row at the first, or (``on_bad_record="skip"``) counts each in ``skipped``
    (reason -> count; a whole bad file counts once) and goes on."""
    for item in iter_pieces(path, fmt, **reader_args):
        if isinstance(item, BadRecord):
            if on_bad_record != "skip":
                raise bad_record_error(key, item.where(), item.reason)
            if skipped is not None:
                reason = item.reason.split(" (")[0]
                skipped[reason] = skipped.get(reason, 0) + 1
            continue
        yield item


def scan_file(path: Path, fmt: str, **reader_args) -> dict:
    """One streaming pass over a file: its content digest (BLAKE2b-128 of the bytes), byte size,
    documents, document bytes (UTF-8, without separators), and bad records (count, and the first
    one's location and reason). Memory O(largest record)."""
    h = hashlib.blake2b(digest_size=16)
    docs = doc_bytes = bad = 0
    first_bad = None
    for item in iter_pieces(path, fmt, hasher=h, **reader_args):
        if isinstance(item, BadRecord):
            bad += 1
            if first_bad is None:
                first_bad = {"where": item.where(), "reason": item.reason}
            continue
        doc_bytes += len(item[0])
        docs += item[1]
    return {"path": str(path), "bytes": path.stat().st_size, "digest": h.hexdigest(), "documents": docs,
            "document_bytes": doc_bytes, "bad_records": bad, "first_bad": first_bad}


__all__ = ["FORMATS", "BAD_RECORD_POLICIES", "BadRecord", "resolve_files", "iter_pieces", "read_documents", "scan_file",
           "bad_record_error"]
