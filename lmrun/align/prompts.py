"""Prompt templates as files (``lmrun/align/prompts/<name>.prompt``, Python ``str.format`` fields):

- ``alpaca``: the Alpaca instruction template (Taori et al. 2023), field ``{instruction}``.
- ``r1_zero``: the DeepSeek-R1-Zero reasoning template (DeepSeek-AI 2025), field ``{question}``;
  the model continues after ``Assistant: <think>`` and answers inside ``<answer>…</answer>``.
- ``question_only``: ``{question}`` as is.

``load_prompt(name_or_path)`` reads one (a name above, or any file path);
``format_prompt(template, **fields)`` fills it.
"""
from __future__ import annotations

import string
from pathlib import Path

from lmrun.errors import ConfigError, DataError

PROMPTS_DIR = Path(__file__).resolve().parent / "prompts"


def prompt_names() -> list[str]:
    """The built-in template names."""
    return sorted(p.stem for p in PROMPTS_DIR.glob("*.prompt"))


def load_prompt(name_or_path: str) -> str:
    """A template's text: a built-in name (``alpaca``, ``r1_zero``, ``question_only``) or a file
    path. ConfigError for an unknown name, DataError for an unreadable file."""
    builtin = PROMPTS_DIR / f"{name_or_path}.prompt"
    if builtin.is_file():
        return builtin.read_text(encoding="utf-8")
    path = Path(name_or_path).expanduser()
    if path.suffix or "/" in name_or_path:
        if not path.is_file():
            raise DataError(f"prompt template {name_or_path}: no such file")
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"prompt template {name_or_path}: cannot read it ({e})") from None
    raise ConfigError(f"prompt template {name_or_path!r}: expected one of {prompt_names()} or a file path")


def template_fields(template: str) -> list[str]:
    """The ``{field}`` names a template uses, in order."""
    return [f for _, f, _, _ in string.Formatter().parse(template) if f]


def format_prompt(template: str, **fields: str) -> str:
    """``template`` with its fields filled; ConfigError naming a field the template needs and
    ``fields`` lacks."""
    missing = [f for f in template_fields(template) if f not in fields]
    if missing:
        raise ConfigError(f"prompt template needs field(s) {missing}; got {sorted(fields)}")
    return template.format(**{f: fields[f] for f in template_fields(template)})
