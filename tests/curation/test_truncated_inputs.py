"""Issue 25 F7: an input cut off (a truncated ``.warc.gz``) is reported — a warning naming the
file and byte, ``read_errors``/``truncated_files`` in report.json — and ``curate.strict=true``
makes it an error. fastwarc alone ends such a file silently."""
from __future__ import annotations

import gzip
import json

import pytest

from lmrun.cli import main
from lmrun.curation.readers import read_documents, warc_tail_problem
from tests.conftest import REPO

IANA = REPO / "examples" / "iana.warc.gz"  # 343 records, one gzip member each, 16 HTML responses
FAST = ["logger=none", "progress=false", "curate.steps=[extract]", "curate.num_workers=1"]


def _read(path, fmt="warc"):
    problems = []
    docs = list(read_documents(path, fmt, on_problem=problems.append))
    return docs, problems


def test_the_whole_file_reads_clean():
    docs, problems = _read(IANA)
    assert len(docs) == 16 and problems == []
    assert warc_tail_problem(IANA, 786354) is None


@pytest.mark.parametrize("keep", [100, 1000, 0.25, 0.5, 0.9, -200, -10, -1])
def test_truncated_warc_gz_is_reported_with_its_offset(tmp_path, keep):
    data = IANA.read_bytes()
    cut = int(len(data) * keep) if isinstance(keep, float) else keep if keep > 0 else len(data) + keep
    path = tmp_path / "cut.warc.gz"
    path.write_bytes(data[:cut])
    docs, problems = _read(path)
    whole = _read(IANA)[0]
    full = {d["id"]: d["html"] for d in whole}
    assert len(problems) == 1, problems
    p = problems[0]
    assert p["path"] == str(path) and p["offset"] == cut and f"truncated at byte {cut}" in p["error"]
    assert all(full[d["id"]] == d["html"] for d in docs)  # only whole documents: the cut one is dropped
    assert [d["id"] for d in docs] == [d["id"] for d in whole[:len(docs)]]


def test_uncompressed_and_single_stream_warcs(tmp_path):
    raw = gzip.decompress(IANA.read_bytes())
    plain = tmp_path / "a.warc"
    plain.write_bytes(raw[: len(raw) // 2])
    docs, problems = _read(plain)
    assert len(problems) == 1 and f"truncated at byte {len(raw) // 2}" in problems[0]["error"]
    assert "needs" in problems[0]["error"]
    one = gzip.compress(raw)  # the whole file as one gzip stream
    whole = tmp_path / "one.warc.gz"
    whole.write_bytes(one)
    assert len(_read(whole)[0]) == 16 and _read(whole)[1] == []
    whole.write_bytes(one[: len(one) // 2])
    docs, problems = _read(whole)
    assert len(problems) == 1 and problems[0]["offset"] == len(one) // 2


def test_trailing_garbage_and_gzip_text(tmp_path):
    bad = tmp_path / "tail.warc.gz"
    bad.write_bytes(IANA.read_bytes() + b"\x1f\x8b\x08garbage")
    docs, problems = _read(bad)
    assert len(docs) == 16 and len(problems) == 1
    text = tmp_path / "t.txt.gz"
    text.write_bytes(gzip.compress(("one<|endoftext|>two<|endoftext|>" * 2000).encode())[:-40])
    docs, problems = _read(text, "text")
    assert len(problems) == 1 and "gzip" in problems[0]["error"]
    assert problems[0]["offset"] == text.stat().st_size


def test_default_reader_warns(tmp_path, caplog):
    path = tmp_path / "cut.warc.gz"
    path.write_bytes(IANA.read_bytes()[:5000])
    with caplog.at_level("WARNING"):
        list(read_documents(path, "warc"))
    assert f"{path}: truncated at byte 5000" in caplog.text


def test_curate_reports_truncation_and_strict_fails(tmp_path, capsys):
    path = tmp_path / "crawl.warc.gz"
    data = IANA.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    args = ["stage=curate", f"curate.inputs=[{path}]", f"curate.output_dir={out}", *FAST]
    assert main(args) == 0
    warned = [x for x in capsys.readouterr().err.splitlines() if "[WARNING]" in x]
    assert len(warned) == 1 and f"{path}: truncated at byte {len(data) // 2}" in warned[0]
    report = json.loads((out / "report.json").read_text())
    assert report["truncated_files"] == 1
    (e,) = report["read_errors"]
    assert e["path"] == str(path) and e["offset"] == len(data) // 2
    assert "cut off or corrupt" in (out / "report.md").read_text()
    # strict, on the completed (skipped) shard of the non-strict run: the recorded problem fails it
    assert main(args + ["curate.strict=true"]) == 1
    err = capsys.readouterr().err
    assert f"{path}: truncated at byte {len(data) // 2}" in err and "curate.strict=true" in err
    # strict, fresh: the shard stops at the damaged file
    out2 = tmp_path / "out2"
    assert main(["stage=curate", f"curate.inputs=[{path}]", f"curate.output_dir={out2}", *FAST,
                 "curate.strict=true"]) == 1
    err = capsys.readouterr().err
    assert "truncated at byte" in err and "Traceback" not in err
    assert not (out2 / "report.json").exists() and not (out2 / "shards" / "00000" / "shard.json").exists()


def test_whole_file_has_no_read_errors(tmp_path):
    out = tmp_path / "out"
    assert main(["stage=curate", f"curate.inputs=[{IANA}]", f"curate.output_dir={out}", *FAST,
                 "curate.strict=true"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["truncated_files"] == 0 and report["read_errors"] == [] and report["read"]["docs"] == 16


def test_dry_run_states_the_policy(capsys):
    assert main(["stage=curate", f"curate.inputs=[{IANA}]", "dry_run=true", "curate.strict=true"]) == 0
    assert "damaged_inputs: fail the run (curate.strict=true)" in capsys.readouterr().out
