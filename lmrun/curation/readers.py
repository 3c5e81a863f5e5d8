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
import os
from pathlib import Path
from typing import Iterator

from lmrun.errors import DataError

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


def read_warc(path: Path, wet: bool = False) -> Iterator[dict]:
    """HTML documents of a WARC file (response records, HTTP 200, HTML content type), or the
    text of a WET file's conversion records (``wet=True``). Raises DataError for a file that
    is not a WARC."""
    from fastwarc.warc import ArchiveIterator, WarcRecordType

    kind = WarcRecordType.conversion if wet else WarcRecordType.response
    n = 0
    with open(path, "rb") as f:
        for rec in ArchiveIterator(f, record_types=kind, parse_http=not wet):
            n += 1
            url = rec.headers.get("WARC-Target-URI")
            rid = rec.record_id or f"{path.name}:{n}"
            if wet:
                text = rec.reader.read().decode("utf-8", errors="replace")
                yield {"id": rid, "url": url, "source": str(path), "text": text}
                continue
            http = rec.http_headers
            if http is None or http.status_code != 200:
                continue
            ctype = (rec.http_content_type or "").lower()
            if not ctype.startswith(HTML_TYPES):
                continue
            body = rec.reader.read()
            if body:
                yield {"id": rid, "url": url, "source": str(path), "html": body}
    if n == 0 and path.stat().st_size > 0:
        with open(path, "rb") as f:
            head = f.read(4)
        if not (head.startswith(b"WARC") or head.startswith(b"\x1f\x8b")):
            raise DataError(f"{path}: not a WARC file (curate.format)")


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


def read_documents(path: Path, fmt: str) -> Iterator[dict]:
    """Documents of one input file in format ``fmt`` (see the module docstring)."""
    if fmt in ("warc", "wet"):
        yield from read_warc(path, wet=fmt == "wet")
    elif fmt == "jsonl":
        yield from read_jsonl(path)
    elif fmt == "html":
        yield from read_html(path)
    else:
        yield from read_text(path)
