"""Answer extraction from model outputs, shared by task evaluations (``lmrun.eval``) and rewards
(``lmrun.align.rewards``).

- GSM8K (Cobbe et al. 2021, "Training Verifiers to Solve Math Word Problems"): reference answers
  end ``#### <number>``; a response's answer is its last number (commas, ``$`` and a trailing
  ``.`` removed; ``72.0`` equals ``72``), as in the CS336 assignment 5 baseline.
- MMLU (Hendrycks et al. 2021): a response's answer is the letter after "answer is"
  (``The correct answer is B``), else a lone leading letter (``B`` / ``(B)`` / ``B.``).
"""
from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?|-?\$?\.\d+")
_ANSWER_IS = re.compile(r"answer\s*(?:is|:)\s*:?\s*\(?\s*([A-D])\b", re.IGNORECASE)
_LEADING_LETTER = re.compile(r"^\s*\(?([A-D])\)?(?:[.:)\s]|$)")


def normalize_number(text: str) -> str | None:
    """Canonical form of a number string: ``"1,234.50"`` -> ``"1234.5"``, ``"$72"`` -> ``"72"``,
    ``"72.0"`` -> ``"72"``, ``"-.5"`` -> ``"-0.5"``. None when ``text`` is not a number."""
    s = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        value = Decimal(s)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def gsm8k_reference_answer(answer: str) -> str:
    """The number after ``####`` in a GSM8K reference solution, normalised. ValueError when the
    solution has no ``####`` line or it holds no number."""
    if "####" not in answer:
        raise ValueError("GSM8K reference answer has no '####' line")
    value = normalize_number(answer.rsplit("####", 1)[1])
    if value is None:
        raise ValueError(f"GSM8K reference answer is not a number: {answer.rsplit('####', 1)[1].strip()!r}")
    return value


def parse_gsm8k_response(text: str) -> str | None:
    """The last number in ``text``, normalised (see ``normalize_number``); None when there is
    none."""
    found = _NUMBER.findall(text or "")
    for candidate in reversed(found):
        value = normalize_number(candidate)
        if value is not None:
            return value
    return None


def numbers_equal(a: str | None, b: str | None) -> bool:
    """Whether two number strings are the same value (``"0.50"`` == ``"0.5"``, ``"1,000"`` ==
    ``"1000"``); False when either is None or not a number."""
    if a is None or b is None:
        return False
    na, nb = normalize_number(a), normalize_number(b)
    return na is not None and na == nb


def parse_mmlu_response(text: str, options: list[str] | None = None) -> str | None:
    """The option letter (``A``–``D``) a response chose, or None. ``"The correct answer is B"``
    and ``"Answer: (C)"`` parse; so does a response that starts with a lone letter. With
    ``options`` given, a response that is exactly one option's text maps to its letter."""
    text = text or ""
    m = _ANSWER_IS.search(text)
    if m:
        return m.group(1).upper()
    m = _LEADING_LETTER.match(text)
    if m:
        return m.group(1).upper()
    if options:
        stripped = text.strip().rstrip(".").lower()
        for letter, option in zip("ABCD", options):
            if stripped == str(option).strip().rstrip(".").lower():
                return letter
    return None
