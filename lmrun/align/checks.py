"""Pre-flight checks of the alignment stages' inputs, run by their ``plan(cfg)`` before the CLI
writes anything: every JSONL file the stage will read is validated in full (streamed), and
every model it will load must open as a checkpoint. A bad input is one line (DataError,
FormatError or ConfigError: exit 2) and no run directory is created.

The weights themselves are not read here: a checkpoint is opened with ``torch.load(...,
mmap=True, weights_only=True)``, which needs the zip directory at the end of the file (so a
truncated file fails) but maps the tensors without copying them. Integrity of the tensor bytes
is checked where they are loaded (``lmrun.train.checkpoint``)."""
from __future__ import annotations

import json
from pathlib import Path

from lmrun.errors import ConfigError, DataError, FormatError

# The record fields each stage's JSONL files need (lmrun/align/data.py read_jsonl).
SFT_KEYS = ("prompt", "response")
DPO_KEYS = ("prompt", "chosen", "rejected")
GSM8K_KEYS = ("question", "answer")


def open_checkpoint(path: Path, key: str, value: str) -> dict:
    """The checkpoint dict of ``path`` with its tensors memory-mapped (nothing copied).
    FormatError naming ``key=value`` and the file when it is truncated, corrupt, not a
    checkpoint, or not one written by an lmrun stage (lacks ``model``, ``iteration``,
    ``model_config`` or ``tokenizer``)."""
    import torch

    where = f"{key}={value}" + ("" if Path(value).expanduser().absolute() == path else f" ({path})")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 -- zip, pickle and weights_only errors come in many types
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        reason = reason if len(reason) <= 160 else reason[:157] + "..."
        raise FormatError(f"{where}: not a readable checkpoint (truncated or corrupt?): {reason}") from None
    missing = [k for k in ("model", "iteration", "model_config", "tokenizer")
               if not isinstance(obj, dict) or k not in obj]
    if missing:
        raise FormatError(f"{where}: not an lmrun checkpoint (lacks {', '.join(missing)})")
    return obj


def check_model(value: str, key: str) -> dict:
    """What a dry run shows of the model at ``value`` (config key ``key``), after checking that
    it can be loaded: an lmrun checkpoint file or run directory (opens as a checkpoint, its
    tokenizer files exist), or a Hugging Face model directory (its ``config.json`` parses).
    Returns ``{path, kind: lmrun|hf[, step]}``. DataError for a missing path or tokenizer file,
    FormatError for a truncated or foreign file."""
    from lmrun.eval.hf import is_hf_model_dir
    from lmrun.eval.models import HF_RUN_SUBDIR
    from lmrun.train.loading import checkpoint_tokenizer_files, resolve_checkpoint

    p = Path(value).expanduser()
    if not p.exists():
        raise DataError(f"{key}={value}: no such checkpoint file or run directory")
    if p.is_dir() and not (p / "config.json").is_file() and (p / HF_RUN_SUBDIR / "config.json").is_file():
        p = p / HF_RUN_SUBDIR
    if is_hf_model_dir(p):
        try:
            json.loads((p / "config.json").read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise FormatError(f"{key}={value}: {p / 'config.json'} is not a readable JSON file ({e})") from None
        return {"path": str(p.absolute()), "kind": "hf"}
    path = resolve_checkpoint(str(p), key)
    facts = open_checkpoint(path, key, value)
    checkpoint_tokenizer_files(facts, path)
    return {"path": str(path), "kind": "lmrun", "step": int(facts["iteration"])}


def check_task_files(cfg, stage: str, train_data: bool) -> dict:
    """Validate the GSM8K JSONL files a stage will read (``align.task.name=gsm8k``): the test
    split always (held-out accuracy), the train split unless the stage reads ``train_data``
    instead (sft, dpo). ConfigError when a needed path is unset; DataError/FormatError as
    ``scan_jsonl``. Returns ``{config key: records}`` of the files checked."""
    from lmrun.align.data import count_jsonl

    t = cfg.align.task
    if t.name != "gsm8k":
        return {}
    out = {}
    for split in ("train", "test"):
        if split == "train" and train_data and stage in ("sft", "dpo"):
            continue
        path = t[f"{split}_path"]
        if not path:
            raise ConfigError(f"align.task.{split}_path: the GSM8K {split} JSONL is required for task=gsm8k "
                              f"(stage={stage})")
        out[f"align.task.{split}_path"] = count_jsonl(path, GSM8K_KEYS, f"align.task.{split}_path")
    return out


def check_align_inputs(cfg, stage: str, keys: tuple[str, ...] | None = None) -> dict:
    """Check everything alignment stage ``stage`` will read, before anything is written: the
    policy ``align.model`` (and, for dpo, ``align.reference``), the prompt template,
    ``align.train_data``/``align.val_data`` when set (records with string ``keys``), and the
    task's files. Returns the facts a plan shows: ``{"model": …, ["reference": …,] "records":
    {config key: number of records}}``. Raises DataError, FormatError or ConfigError (one line)."""
    from lmrun.align.data import count_jsonl
    from lmrun.align.prompts import load_prompt

    a = cfg.align
    out = {"model": check_model(a.model, "align.model")}
    if stage == "dpo" and a.reference:
        out["reference"] = check_model(a.reference, "align.reference")
    load_prompt(a.prompt_template)
    records = {}
    if keys is not None:
        for name in ("train_data", "val_data"):
            if a[name]:
                records[f"align.{name}"] = count_jsonl(a[name], keys, f"align.{name}")
    records.update(check_task_files(cfg, stage, bool(a.train_data)))
    out["records"] = records
    return out
