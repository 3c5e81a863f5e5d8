"""Readers: input files -> a stream of documents, and the split of input files into shards.

A document is a dict ``{"id": str, "url": str | None, "source": str, "html": bytes}`` (WARC
responses, HTML files: the ``extract`` step turns ``html`` into ``text``) or ``{..., "text":
str}`` (WET conversion records, plain text, JSONL). Formats: WARC (fastwarc; HTTP response
records with status 200 and an HTML content type), WET (conversion records), plain text
(documents separated by ``<|endoftext|>``; without it the whole file is one document), JSONL
(one object per line with a ``text`` field; ``id``/``url`` kept when present) and HTML files
(a folder of ``.html``/``.htm`` files, one document each). Memory is one record at a time.
"""
from __future__ import annotations

import glob
import gzip
import json
import logging
import os
import zlib
from pathlib import Path
from typing import Iterator

from lmrun.errors import DataError

log = logging.getLogger(__name__)

EOT = "<|endoftext|>"
HTML_TYPES = ("text/html", "application/xhtml+xml")
HTML_SUFFIXES = (".html", ".htm", ".xhtml")


def detect_format(path: Path) -> str:
    """Format of one input file by its name: warc, wet, jsonl, html or text."""
    name = path.name.lower()
    for suffix in (".gz", ".zst"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    if name.endswith(".warc.wet") or name.endswith(".wet"):
        return "wet"
    if name.endswith(".warc") or name.endswith(".arc"):
        return "warc"
    if name.endswith(".jsonl") or name.endswith(".json"):
        return "jsonl"
    if name.endswith(HTML_SUFFIXES):
        return "html"
    return "text"


def list_input_files(inputs: list[str], fmt: str = "auto", key: str = "curate.inputs") -> list[tuple[Path, str]]:
    """Expand files, folders (recursively; with ``fmt=auto`` only files of a known web/text
    suffix) and glob patterns into a sorted, de-duplicated list of ``(path, format)``.

    Raises DataError for an input that matches nothing or an empty result."""
    out: dict[Path, str] = {}
    for item in inputs:
        item = os.path.expanduser(str(item))
        if any(ch in item for ch in "*?["):
            matches = [Path(p) for p in glob.glob(item, recursive=True)]
        else:
            matches = [Path(item)]
        found = False
        for m in matches:
            if m.is_dir():
                for p in sorted(m.rglob("*")):
                    if p.is_file() and p.stat().st_size > 0:
                        f = detect_format(p) if fmt == "auto" else fmt
                        if fmt == "auto" and f == "text" and p.suffix.lower() not in (".txt", ".text"):
                            continue  # images, css, js next to HTML pages
                        out[p.absolute()] = f
                        found = True
            elif m.is_file():
                if m.stat().st_size > 0:
                    out[m.absolute()] = detect_format(m) if fmt == "auto" else fmt
                found = True
        if not found:
            raise DataError(f"{key}: nothing found at {item}")
    if not out:
        raise DataError(f"{key}: no non-empty input files in {list(inputs)}")
    return sorted(out.items())


def shard_files(files: list[tuple[Path, str]], num_shards: int) -> list[list[tuple[Path, str]]]:
    """Split files into ``num_shards`` lists of about equal total bytes (largest file first to
    the lightest shard; ties by path), each list sorted by path. Deterministic, so every job of
    a Slurm array computes the same split. A shard may be empty when there are fewer files."""
    shards: list[list[tuple[Path, str]]] = [[] for _ in range(num_shards)]
    load = [0] * num_shards
    for path, fmt in sorted(files, key=lambda pf: (-pf[0].stat().st_size, str(pf[0]))):
        i = min(range(num_shards), key=lambda k: (load[k], k))
        shards[i].append((path, fmt))
        load[i] += path.stat().st_size
    return [sorted(s) for s in shards]


def _open_text(path: Path):
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def _gzip_members_end(f, start: int, size: int) -> tuple[int, str] | None:
    """Decompress every gzip member of ``f`` from byte ``start`` to the end (output discarded):
    None when the last member is complete, else ``(byte offset, what is wrong)``."""
    f.seek(start)
    pos = start
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    member = start
    while True:
        chunk = f.read(1 << 20)
        if not chunk:
            break
        while chunk:
            try:
                d.decompress(chunk)
            except zlib.error as e:
                return pos, f"corrupt gzip data in the member at byte {member} ({e})"
            if not d.eof:
                pos += len(chunk)
                break
            used = len(chunk) - len(d.unused_data)
            pos += used
            chunk = d.unused_data
            member = pos
            d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    if member < size and pos > member:
        return size, f"truncated at byte {size}: the gzip member at byte {member} has no end"
    return None


def _record_needs(record: bytes) -> int | None:
    """Bytes a WARC record needs (header block, blank line, Content-Length), or None if its
    header is incomplete or has no Content-Length."""
    end = record.find(b"\r\n\r\n")
    if end < 0:
        return None
    for line in record[:end].split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length" and value.strip().isdigit():
            return end + 4 + int(value.strip())
    return None


def warc_tail_problem(path: Path, last_pos: int | None) -> tuple[int, str] | None:
    """Whether a WARC file read up to the record at byte ``last_pos`` (fastwarc's
    ``stream_pos``; None: no record) is complete: None, or ``(byte offset, what is wrong)`` for a
    file cut off (a download or copy that stopped) or corrupt at its end. The message starts
    with "trailing" when every record is whole but unreadable bytes follow the last one.

    fastwarc ends its iteration silently on a truncated file, so this looks at the tail itself:
    a ``.gz`` file's last gzip member must decompress to its end (for a file compressed as one
    stream, every member is decompressed); the last record must hold the ``Content-Length``
    bytes its header announces; and nothing may follow that fastwarc did not read."""
    size = path.stat().st_size
    start = last_pos or 0
    with open(path, "rb") as f:
        f.seek(start)
        head = f.read(2)
        if head == b"\x1f\x8b":  # one gzip member per record (the WARC convention): check the last one
            f.seek(start)
            d = zlib.decompressobj(16 + zlib.MAX_WBITS)
            out, pos = bytearray(), start
            while not d.eof:
                chunk = f.read(1 << 20)
                if not chunk:
                    return size, (f"truncated at byte {size}: the record at byte {start} is cut off inside its "
                                  "gzip member")
                try:
                    out += d.decompress(chunk)
                except zlib.error as e:
                    return pos, f"corrupt gzip data in the record at byte {start} ({e})"
                pos += len(chunk)
            end = pos - len(d.unused_data)
            need = _record_needs(bytes(out))
            if last_pos is not None and (need is None or need > len(out)):
                return end, f"the record at byte {start} is incomplete ({len(out)} of {need or '?'} bytes)"
            if end < size:
                return _gzip_members_end(f, end, size) or (
                    end, f"trailing data: {size - end} bytes after the last record (byte {end}) are not WARC records")
            return None
        if path.name.lower().endswith(".gz"):  # compressed as one stream: fastwarc's positions are not offsets
            return _gzip_members_end(f, 0, size)
        if last_pos is None:
            return None
        f.seek(start)
        head = f.read(1 << 16)
        need = _record_needs(head)
        if need is None:
            return size, f"truncated at byte {size}: the record at byte {start} has an incomplete header"
        if start + need > size:
            return size, (f"truncated at byte {size}: the record at byte {start} needs {need} bytes, "
                          f"{size - start} are left")
    return None


def read_warc(path: Path, wet: bool = False, on_problem=None) -> Iterator[dict]:
    """HTML documents of a WARC file (response records, HTTP 200, HTML content type), or the
    text of a WET file's conversion records (``wet=True``). Raises DataError for a file that
    is not a WARC.

    A file cut off or corrupt at its end (fastwarc stops silently there) is detected after its
    last record (``warc_tail_problem``): ``on_problem({"path", "offset", "error"})`` is called
    (default: a warning is logged); the documents of the complete records before are yielded,
    the last record's document (its body possibly cut) is dropped. Documents are yielded one
    record late for that reason."""
    from fastwarc.warc import ArchiveIterator, WarcRecordType

    kind = WarcRecordType.conversion if wet else WarcRecordType.response
    n, last_pos, problem, pending = 0, None, None, None
    with open(path, "rb") as f:
        records = ArchiveIterator(f, parse_http=False)
        while True:
            try:
                rec = next(records, None)
            except Exception as e:  # noqa: BLE001 -- fastwarc's parse errors
                problem = (last_pos or 0, f"unreadable record after byte {last_pos or 0} ({type(e).__name__}: {e})")
                break
            if rec is None:
                break
            last_pos = rec.stream_pos
            if pending is not None:
                yield pending
                pending = None
            if rec.record_type != kind:
                continue
            n += 1
            url = rec.headers.get("WARC-Target-URI")
            rid = rec.record_id or f"{path.name}:{n}"
            if wet:
                text = rec.reader.read().decode("utf-8", errors="replace")
                pending = {"id": rid, "url": url, "source": str(path), "text": text}
                continue
            rec.parse_http()
            http = rec.http_headers
            if http is None or http.status_code != 200:
                continue
            ctype = (rec.http_content_type or "").lower()
            if not ctype.startswith(HTML_TYPES):
                continue
            body = rec.reader.read()
            if body:
                pending = {"id": rid, "url": url, "source": str(path), "html": body}
    if last_pos is None and path.stat().st_size > 0:
        with open(path, "rb") as f:
            head = f.read(4)
        if not (head.startswith(b"WARC") or head.startswith(b"\x1f\x8b")):
            raise DataError(f"{path}: not a WARC file (curate.format)")
    problem = problem or warc_tail_problem(path, last_pos)
    if problem is not None:
        if pending is not None and not problem[1].startswith("trailing"):
            problem = (problem[0], problem[1] + f"; the last record's document ({pending['id']}) is dropped")
            pending = None
        _report(on_problem, path, *problem)
    if pending is not None:
        yield pending


def _report(on_problem, path: Path, offset: int, error: str) -> None:
    item = {"path": str(path), "offset": int(offset), "error": error}
    if on_problem is None:
        log.warning("%s: %s", path, error)
    else:
        on_problem(item)


def read_text(path: Path) -> Iterator[dict]:
    """Documents of a UTF-8 text file separated by ``<|endoftext|>`` (streamed in 1 MiB
    blocks; a file without the separator is one document)."""
    buf, n = "", 0
    with _open_text(path) as f:
        while True:
            block = f.read(1 << 20)
            if not block:
                break
            buf += block
            parts = buf.split(EOT)
            buf = parts.pop()
            for p in parts:
                if p.strip():
                    yield {"id": f"{path.name}:{n}", "url": None, "source": str(path), "text": p.strip("\n")}
                n += 1
    if buf.strip():
        yield {"id": f"{path.name}:{n}", "url": None, "source": str(path), "text": buf.strip("\n")}


def read_jsonl(path: Path) -> Iterator[dict]:
    """One document per JSON line with a string ``text`` field; DataError names the line."""
    with _open_text(path) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{i}: not JSON ({e.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise DataError(f"{path}:{i}: expected an object with a string 'text' field")
            yield {"id": str(obj.get("id", f"{path.name}:{i}")), "url": obj.get("url"), "source": str(path),
                   "text": obj["text"]}


def read_html(path: Path) -> Iterator[dict]:
    """One HTML file as one document (bytes; the extract step detects the encoding); a
    ``.gz`` file (Debian compresses its larger pages, e.g. ``changelog.html.gz``) is
    decompressed. Raises DataError for a ``.gz`` file that is not gzip."""
    data = path.read_bytes()
    if path.name.lower().endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:
            raise DataError(f"{path}: not a gzip file ({e})") from None
    yield {"id": str(path), "url": path.as_uri(), "source": str(path), "html": data}


def read_documents(path: Path, fmt: str, on_problem=None) -> Iterator[dict]:
    """Documents of one input file in format ``fmt`` (see the module docstring).

    A file that ends early or is corrupt — a WARC cut off (see ``read_warc``), a ``.gz`` text or
    JSONL file whose gzip stream has no end — yields the documents before the damage and calls
    ``on_problem({"path", "offset", "error"})`` (default: a warning is logged), ``offset`` the
    byte of the file where reading stopped."""
    if fmt in ("warc", "wet"):
        yield from read_warc(path, wet=fmt == "wet", on_problem=on_problem)
        return
    if fmt == "html":
        yield from read_html(path)
        return
    try:
        yield from (read_jsonl(path) if fmt == "jsonl" else read_text(path))
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        _report(on_problem, path, path.stat().st_size, f"truncated or corrupt gzip data ({e})")
