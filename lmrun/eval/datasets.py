"""Readers of the task evaluation sets, in the formats CS336 assignment 5 ships them
(``../shared/data/alignment``). Each returns a list of dicts; a missing, empty or malformed file
raises DataError / FormatError with one line naming the file (and line or row).

- GSM8K (Cobbe et al. 2021): JSONL, ``{"question": ..., "answer": "... #### 18"}`` per line.
- MMLU (Hendrycks et al. 2021): CSV without a header, ``question,A,B,C,D,answer-letter``; a
  folder holds one ``<subject>_test.csv`` (or ``_dev``/``_val``) per subject.
- AlpacaEval (Li et al. 2023): JSONL (or a JSON list) of ``{"instruction", "output", "generator",
  "dataset"}``; ``output`` is the reference model's answer.
- SimpleSafetyTests (Vidgen et al. 2023): CSV with a header ``id,harm_area,counter,category,
  prompts_final``.
"""
from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

from lmrun.errors import DataError, FormatError
from lmrun.eval.parsing import gsm8k_reference_answer

LETTERS = "ABCD"


def _file(path: str | Path, key: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"{key}={path}: no such file")
    if p.stat().st_size == 0:
        raise DataError(f"{key}={path}: the file is empty")
    return p


def _text(p: Path) -> str:
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{p}: not UTF-8 text (byte {e.start})") from None


def read_json_records(path: str | Path, key: str = "evaluate.data_path") -> list[tuple[int, dict]]:
    """``(line number, object)`` for each non-blank line of a JSONL file, or for each element of
    a JSON list (line number = index + 1). FormatError for a line that is not a JSON object."""
    p = _file(path, key)
    text = _text(p)
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise FormatError(f"{p}: not valid JSON ({e.msg} at line {e.lineno})") from None
        pairs = list(enumerate(items, 1))
    else:
        pairs = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                pairs.append((i, json.loads(line)))
            except json.JSONDecodeError as e:
                raise FormatError(f"{p}:{i}: not JSON ({e.msg})") from None
    for i, obj in pairs:
        if not isinstance(obj, dict):
            raise FormatError(f"{p}:{i}: expected a JSON object, got {type(obj).__name__}")
    if not pairs:
        raise DataError(f"{key}={path}: no records in the file")
    return pairs


def _need(p: Path, i: int, obj: dict, fields: tuple[str, ...]) -> None:
    for f in fields:
        if not isinstance(obj.get(f), str) or not obj[f].strip():
            raise FormatError(f"{p}:{i}: expected a non-empty string field {f!r}")


def load_gsm8k(path: str | Path, limit: int | None = None) -> list[dict]:
    """GSM8K problems -> ``{"question", "answer" (worked solution), "reference" (its normalised
    number)}``; the first ``limit`` (None: all). FormatError for a line without question/answer or
    whose answer has no ``#### <number>``."""
    p = Path(path).expanduser()
    out = []
    for i, obj in read_json_records(path):
        _need(p, i, obj, ("question", "answer"))
        try:
            ref = gsm8k_reference_answer(obj["answer"])
        except ValueError as e:
            raise FormatError(f"{p}:{i}: {e}") from None
        out.append({"question": obj["question"], "answer": obj["answer"], "reference": ref})
        if limit is not None and len(out) >= limit:
            break
    return out


_SUBJECT = re.compile(r"^(.*?)(?:_(?:test|dev|val))?$")


def load_mmlu(path: str | Path, limit: int | None = None) -> list[dict]:
    """MMLU questions from a CSV file or a folder of ``*.csv`` files (sorted by name) ->
    ``{"subject", "question", "options" (4 strings), "answer" (A-D)}``; the subject comes from the
    file name (``college_physics_test.csv`` -> ``college_physics``). limit: the first N questions
    of each file (None: all). FormatError for a row without 6 fields or with an answer not A-D."""
    p = Path(path).expanduser()
    if p.is_dir():
        files = sorted(p.glob("*.csv"))
        if not files:
            raise DataError(f"evaluate.data_path={path}: no *.csv files in this folder")
    else:
        files = [_file(path, "evaluate.data_path")]
    out = []
    for f in files:
        subject = _SUBJECT.match(f.stem).group(1)
        reader = csv.reader(io.StringIO(_text(f), newline=""))
        n = 0
        for row in reader:
            r = reader.line_num
            if not row or not any(x.strip() for x in row):
                continue
            if len(row) != 6:
                raise FormatError(f"{f}: row {r}: expected 6 fields (question, A, B, C, D, answer), got {len(row)}")
            answer = row[5].strip().upper()
            if answer not in LETTERS:
                raise FormatError(f"{f}: row {r}: the answer is {row[5]!r}, expected one of A, B, C, D")
            out.append({"subject": subject, "question": row[0], "options": row[1:5], "answer": answer})
            n += 1
            if limit is not None and n >= limit:
                break
    if not out:
        raise DataError(f"evaluate.data_path={path}: no questions")
    return out


def load_alpaca_eval(path: str | Path, limit: int | None = None) -> list[dict]:
    """AlpacaEval instructions -> ``{"instruction", "reference" (the file's ``output``, or None),
    "reference_generator", "dataset"}``; the first ``limit``. FormatError for a record without an
    instruction."""
    p = Path(path).expanduser()
    out = []
    for i, obj in read_json_records(path):
        _need(p, i, obj, ("instruction",))
        out.append({"instruction": obj["instruction"],
                    "reference": obj["output"] if isinstance(obj.get("output"), str) else None,
                    "reference_generator": obj.get("generator"), "dataset": obj.get("dataset", "")})
        if limit is not None and len(out) >= limit:
            break
    return out


def load_reference_outputs(path: str | Path) -> dict[str, dict]:
    """instruction -> ``{"output", "generator"}`` from a JSON list or JSONL of AlpacaEval-format
    records (e.g. another run's ``alpaca_eval_outputs.json``). FormatError for a record without
    instruction or output."""
    p = Path(path).expanduser()
    out = {}
    for i, obj in read_json_records(path, key="evaluate.reference_outputs"):
        if not isinstance(obj.get("instruction"), str) or not isinstance(obj.get("output"), str):
            raise FormatError(f"{p}:{i}: expected string fields 'instruction' and 'output'")
        out[obj["instruction"]] = {"output": obj["output"], "generator": obj.get("generator")}
    return out


def load_safety(path: str | Path, limit: int | None = None) -> list[dict]:
    """SimpleSafetyTests prompts -> ``{"id", "harm_area", "category", "prompt"}``; the first
    ``limit``. The prompt column is ``prompts_final`` (or ``prompt``). FormatError for a file
    without that column or a row with an empty prompt."""
    p = _file(path, "evaluate.data_path")
    reader = csv.DictReader(io.StringIO(_text(p), newline=""))
    fields = reader.fieldnames or []
    column = next((c for c in ("prompts_final", "prompt") if c in fields), None)
    if column is None:
        raise FormatError(f"{p}: expected a CSV header with a 'prompts_final' (or 'prompt') column, got {fields}")
    out = []
    for row in reader:
        r = reader.line_num
        prompt = (row.get(column) or "").strip()
        if not prompt:
            raise FormatError(f"{p}: row {r}: empty prompt")
        out.append({"id": row.get("id") or str(len(out) + 1), "harm_area": row.get("harm_area") or "",
                    "category": row.get("category") or "", "prompt": prompt})
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise DataError(f"evaluate.data_path={path}: no prompts")
    return out


LOADERS = {"gsm8k": load_gsm8k, "mmlu": load_mmlu, "alpaca_eval": load_alpaca_eval, "safety": load_safety}


def load_task_data(task: str, path: str | Path, limit: int | None = None) -> list[dict]:
    """The examples of ``task`` (gsm8k, mmlu, alpaca_eval, safety) from ``path``."""
    if not Path(path).expanduser().exists():
        raise DataError(f"evaluate.data_path={path}: no such file or folder")
    return LOADERS[task](path, limit)
