"""Verifiable tasks: questions with checkable answers, the rewards that check them, and correct
solutions to fine-tune on. ``build_task(cfg) -> Task``.

- ``arithmetic``: multi-digit integer arithmetic (``"473+58="`` -> ``"531"``), generated from a
  seed; train and test questions are disjoint (a question belongs to test iff the CRC-32 of its
  text is 0 mod 8). Small models learn it on a CPU.
- ``countdown``: reach a target from given numbers with ``+ - * /`` (TinyZero's Countdown,
  Pan et al. 2025); each puzzle is generated from a random expression, which is its solution.
- ``gsm8k``: grade-school math word problems (Cobbe et al. 2021) from JSONL files with
  ``question``/``answer`` fields; the answer's ``#### n`` is the ground truth. With the
  ``r1_zero`` template, solutions are ``<reasoning> </think> <answer> n </answer>`` and the
  reward is ``r1_zero_reward``; otherwise ``gsm8k_reward``.
"""
from __future__ import annotations

import random
import zlib
from dataclasses import dataclass
from typing import Callable

from lmrun.align.data import read_jsonl
from lmrun.align.rewards import arithmetic_reward, countdown_reward, evaluate_expression, gsm8k_reward, r1_zero_reward
from lmrun.errors import ConfigError, FormatError
from lmrun.eval.parsing import gsm8k_reference_answer

SPLITS = ("train", "test")


@dataclass
class TaskExample:
    """question: the text put into the prompt template; answer: the ground truth the reward
    checks; solution: a correct response (what SFT trains on)."""

    question: str
    answer: str
    solution: str


@dataclass
class Task:
    """A verifiable task: ``examples(split, n, seed)`` and ``reward(response, answer)``."""

    name: str
    reward: Callable[[str, str], dict]
    generate: Callable[[str, int, int], list[TaskExample]]

    def examples(self, split: str, n: int, seed: int = 0) -> list[TaskExample]:
        """``n`` examples of ``split`` (train | test), reproducible from ``seed``."""
        if split not in SPLITS:
            raise ValueError(f"split={split!r}: expected one of {SPLITS}")
        return self.generate(split, n, seed)


def _in_test(question: str) -> bool:
    return zlib.crc32(question.encode()) % 8 == 0


def _split_seed(split: str, seed: int) -> int:
    return seed * 2 + (1 if split == "test" else 0)


def no_carry_sum(numbers: list[int]) -> int:
    """The sum a careless adder writes when dropping every carry: each decimal digit is the sum
    of the operands' digits mod 10 (``58 + 67`` -> ``15``)."""
    out, place = 0, 1
    width = max(len(str(n)) for n in numbers)
    for _ in range(width):
        out += (sum(n // place % 10 for n in numbers) % 10) * place
        place *= 10
    return out


def arithmetic_task(digits: int = 2, operands: int = 2, operations: str = "+", carry_error_rate: float = 0.0) -> Task:
    """Distinct questions ``a op b (op c …)=`` with operands of 1..``digits`` digits (uniform over
    the number of digits, then over values) and operations drawn from ``operations`` (any of
    ``+-*``); answer: the exact integer result. ConfigError when fewer than ``n`` distinct
    questions of the split exist.

    ``carry_error_rate`` models a careless teacher (addition only): in the *train* split, a
    question whose sum needs a carry gets the carry-dropping answer (``no_carry_sum``) as its
    solution with this probability — noisy demonstrations, as SFT data from people or weaker
    models are; the answer (what rewards check) stays exact."""
    if not 0 <= carry_error_rate <= 1 or (carry_error_rate and operations != "+"):
        raise ConfigError(f"arithmetic task: carry_error_rate={carry_error_rate}: expected 0..1, and operations='+' "
                          "when it is above 0")
    if digits < 1 or operands < 2 or not operations or set(operations) - set("+-*"):
        raise ConfigError(f"arithmetic task: digits={digits}, operands={operands}, operations={operations!r}: "
                          "expected digits >= 1, operands >= 2, operations from '+-*'")

    def generate(split: str, n: int, seed: int) -> list[TaskExample]:
        rng = random.Random(_split_seed(split, seed))
        out: list[TaskExample] = []
        seen: set[str] = set()
        tries = 0
        while len(out) < n:
            tries += 1
            if tries > 100 * n + 10_000:
                raise ConfigError(f"arithmetic task: cannot draw {n} distinct {split} questions with digits={digits}, "
                                  f"operands={operands}, operations={operations!r} (too few exist)")
            nums = [rng.randint(0 if d == 1 else 10 ** (d - 1), 10 ** d - 1)
                    for d in (rng.randint(1, digits) for _ in range(operands))]
            ops = [rng.choice(operations) for _ in range(operands - 1)]
            q = str(nums[0]) + "".join(o + str(x) for o, x in zip(ops, nums[1:])) + "="
            if q in seen or _in_test(q) != (split == "test"):
                continue
            seen.add(q)
            value = str(int(evaluate_expression(q[:-1])[0]))
            solution = value
            if carry_error_rate and split == "train":
                careless = str(no_carry_sum(nums))
                if careless != value and random.Random(zlib.crc32(q.encode()) + seed).random() < carry_error_rate:
                    solution = careless
            out.append(TaskExample(q, value, solution))
        return out

    return Task("arithmetic", arithmetic_reward, generate)


def _countdown_puzzle(rng: random.Random, count: int, max_number: int) -> tuple[list[int], int, str]:
    while True:
        nums = [rng.randint(1, max_number) for _ in range(count)]
        exprs = [(str(x), x) for x in nums]
        while len(exprs) > 1:
            i, j = rng.sample(range(len(exprs)), 2)
            (ea, va), (eb, vb) = exprs[i], exprs[j]
            op = rng.choice("+-*/")
            if op == "/" and (vb == 0 or va % vb):
                op = "+"
            if op == "-" and va < vb:
                (ea, va), (eb, vb) = (eb, vb), (ea, va)
            value = {"+": va + vb, "-": va - vb, "*": va * vb, "/": va // vb if vb else 0}[op]
            exprs = [e for k, e in enumerate(exprs) if k not in (i, j)] + [(f"({ea}{op}{eb})", value)]
        expr, target = exprs[0]
        if 0 < target <= 1000:
            return nums, target, expr[1:-1] if expr.startswith("(") else expr


def countdown_task(count: int = 3, max_number: int = 20) -> Task:
    """Puzzles ``"Numbers: 3 7 12. Target: 33. Expression:"`` over ``count`` numbers in
    1..``max_number`` whose target (1..1000) is reached by a random expression using each
    number once; answer ``"<target>|<numbers>"`` for ``countdown_reward``."""
    if count < 2 or max_number < 2:
        raise ConfigError(f"countdown task: count={count}, max_number={max_number}: expected both >= 2")

    def generate(split: str, n: int, seed: int) -> list[TaskExample]:
        rng = random.Random(_split_seed(split, seed))
        out: list[TaskExample] = []
        while len(out) < n:
            nums, target, expr = _countdown_puzzle(rng, count, max_number)
            q = f"Numbers: {' '.join(map(str, nums))}. Target: {target}. Expression:"
            if _in_test(q) != (split == "test"):
                continue
            out.append(TaskExample(q, f"{target}|{' '.join(map(str, nums))}", " " + expr))
        return out

    return Task("countdown", countdown_reward, generate)


def gsm8k_task(train_path: str | None, test_path: str | None, r1_zero: bool) -> Task:
    """GSM8K from JSONL files (``question``, ``answer`` ending ``#### n``); examples are the first
    ``n`` rows after a seeded shuffle."""
    paths = {"train": train_path, "test": test_path}

    def generate(split: str, n: int, seed: int) -> list[TaskExample]:
        path = paths[split]
        if not path:
            raise ConfigError(f"align.task.{split}_path: the GSM8K {split} JSONL is required for task=gsm8k")
        rows = read_jsonl(path, ("question", "answer"), f"align.task.{split}_path")
        random.Random(_split_seed(split, seed)).shuffle(rows)
        out = []
        for row in rows[:n]:
            try:
                truth = gsm8k_reference_answer(row["answer"])
            except ValueError as e:
                raise FormatError(f"align.task.{split}_path={path}: {e}") from None
            reasoning = row["answer"].rsplit("####", 1)[0].strip()
            solution = (f" {reasoning} </think> <answer> {truth} </answer>" if r1_zero
                        else f"{reasoning}\n#### {truth}")
            out.append(TaskExample(row["question"], truth, solution))
        return out

    return Task("gsm8k", r1_zero_reward if r1_zero else gsm8k_reward, generate)


TASKS = ("arithmetic", "countdown", "gsm8k")


def build_task(cfg, template_name: str = "question_only") -> Task:
    """The task of an ``align.task`` config node (``name`` one of ``TASKS``)."""
    if cfg.name == "arithmetic":
        return arithmetic_task(int(cfg.digits), int(cfg.operands), str(cfg.operations), float(cfg.carry_error_rate))
    if cfg.name == "countdown":
        return countdown_task(int(cfg.count), int(cfg.max_number))
    if cfg.name == "gsm8k":
        return gsm8k_task(cfg.train_path, cfg.test_path, r1_zero=template_name == "r1_zero")
    raise ConfigError(f"align.task.name={cfg.name!r}: expected one of {TASKS}")
