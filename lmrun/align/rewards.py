"""Verifiable rewards: ``reward_fn(response, ground_truth) -> {"reward", "format_reward",
"answer_reward"}`` (floats in [0, 1]).

- ``gsm8k_reward``: the response's last number equals the reference (``lmrun.eval.parsing``).
- ``arithmetic_reward``: the response starts with the right number.
- ``r1_zero_reward``: DeepSeek-R1-Zero format (``… </think> <answer> … </answer>``) and the
  answer inside the tags (CS336 assignment 5's ``r1_zero_reward_fn``, with numeric grading):
  reward 1 only when both the format and the answer are right.
- ``countdown_reward``: the response is an arithmetic expression over the given numbers (each
  used at most once, ``+ - * /`` and parentheses) that evaluates to the target (TinyZero's
  Countdown task, Pan et al. 2025).
"""
from __future__ import annotations

import ast
import operator
import re
from collections import Counter
from fractions import Fraction

from lmrun.eval.parsing import normalize_number, numbers_equal, parse_gsm8k_response

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def _result(format_ok: bool, answer_ok: bool) -> dict:
    return {"reward": float(format_ok and answer_ok), "format_reward": float(format_ok),
            "answer_reward": float(answer_ok)}


def gsm8k_reward(response: str, ground_truth: str) -> dict:
    """1 when the last number of ``response`` equals ``ground_truth`` (a number string, or a GSM8K
    reference solution ending ``#### n``). ``format_reward``: the response holds a number."""
    truth = ground_truth.rsplit("####", 1)[1] if "####" in ground_truth else ground_truth
    predicted = parse_gsm8k_response(response)
    return _result(predicted is not None, numbers_equal(predicted, truth))


_LEADING_NUMBER = re.compile(r"\s*(-?\d[\d,]*(?:\.\d+)?)")


def arithmetic_reward(response: str, ground_truth: str) -> dict:
    """1 when ``response`` starts (after whitespace) with a number equal to ``ground_truth``;
    text after it is ignored, so a model that keeps writing after its answer is graded on the
    answer. ``format_reward``: the response starts with a number."""
    m = _LEADING_NUMBER.match(response or "")
    return _result(m is not None, m is not None and numbers_equal(m.group(1), ground_truth))


def r1_zero_reward(response: str, ground_truth: str) -> dict:
    """R1-Zero format and answer reward. The response continues a prompt that ends with
    ``<think>``; the format is right when it contains ``</think> <answer>`` followed later by
    ``</answer>``. The answer (text inside the last ``<answer>…</answer>``) is right when its
    last number equals the ground truth's number, or, for non-numeric truths, when the
    whitespace- and case-normalised strings are equal."""
    if "</think> <answer>" not in response or "</answer>" not in response.split("</think> <answer>", 1)[1]:
        return _result(False, False)
    tags = _ANSWER_TAG.findall(response)
    answer = tags[-1] if tags else ""
    truth = ground_truth.rsplit("####", 1)[1] if "####" in ground_truth else ground_truth
    if normalize_number(truth) is not None:
        ok = numbers_equal(parse_gsm8k_response(answer), truth)
    else:
        ok = " ".join(answer.split()).lower() == " ".join(truth.split()).lower()
    return _result(True, ok)


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def _evaluate(node, used: list[int]) -> Fraction:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body, used)
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        left, right = _evaluate(node.left, used), _evaluate(node.right, used)
        if isinstance(node.op, ast.Div) and right == 0:
            raise ZeroDivisionError
        return Fraction(_OPS[type(node.op)](left, right))
    if isinstance(node, ast.Constant) and type(node.value) is int:
        used.append(node.value)
        return Fraction(node.value)
    raise ValueError("not an arithmetic expression")


def evaluate_expression(text: str) -> tuple[Fraction, list[int]]:
    """Exact value of an integer expression with ``+ - * /`` and parentheses, and the integer
    literals it uses. ValueError for anything else, ZeroDivisionError for a division by 0."""
    used: list[int] = []
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        raise ValueError(f"not an arithmetic expression: {text!r}") from None
    return _evaluate(tree, used), used


def countdown_reward(response: str, ground_truth: str) -> dict:
    """Countdown: ``ground_truth`` is ``"<target>|<n1> <n2> …"``; the first line of ``response``
    (up to ``=`` if present) must be an expression of integers with ``+ - * /`` and parentheses
    that uses only the given numbers, each at most as often as given, and equals the target
    exactly (rational arithmetic). ``format_reward``: the expression parses and uses only given
    numbers."""
    target_text, numbers_text = ground_truth.split("|", 1)
    target, numbers = Fraction(int(target_text)), Counter(int(x) for x in numbers_text.split())
    expr = response.strip().split("\n", 1)[0].split("=", 1)[0].strip()
    if not expr or not re.fullmatch(r"[\d\s+\-*/()]+", expr):
        return _result(False, False)
    try:
        value, used = evaluate_expression(expr)
    except (ValueError, ZeroDivisionError, RecursionError):
        return _result(False, False)
    if Counter(used) - numbers:
        return _result(False, False)
    return _result(True, value == target)


REWARDS = {"arithmetic": arithmetic_reward, "gsm8k": gsm8k_reward, "r1_zero": r1_zero_reward, "countdown": countdown_reward}
