"""Answer extraction on real GSM8K solutions and MMLU-style responses, and on malformed outputs."""
from __future__ import annotations

import json

import pytest

from lmrun.eval.parsing import (gsm8k_reference_answer, normalize_number, numbers_equal, parse_gsm8k_response,
                                parse_mmlu_response)
from lmrun.eval.tasks import gsm8k_answer
from tests.eval.helpers import FIXTURES

REAL = [json.loads(x) for x in (FIXTURES / "align_gsm8k_test_head.jsonl").read_text().splitlines()]


def test_reference_answers_of_real_gsm8k_solutions():
    refs = [gsm8k_reference_answer(r["answer"]) for r in REAL]
    assert refs[:4] == ["18", "3", "70000", "540"] and refs[17] == "57500" and len(refs) == 20
    # a real worked solution read as a response: its last number is the answer after ####
    assert all(numbers_equal(parse_gsm8k_response(r["answer"]), ref) for r, ref in zip(REAL, refs))
    # the "####" line removed: the last number of the working is still the answer in these solutions
    assert parse_gsm8k_response(REAL[2]["answer"].rsplit("####", 1)[0]) == "70000"  # "$70,000" in the text


@pytest.mark.parametrize("answer", ["no marker here 12", "#### twelve", "####"])
def test_malformed_reference_answers_raise(answer):
    with pytest.raises(ValueError, match="GSM8K reference answer"):
        gsm8k_reference_answer(answer)


@pytest.mark.parametrize("response, parsed", [
    ("She makes $18 every day.", "18"),
    ("The profit is $70,000.", "70000"),
    ("1,234.50 dollars", "1234.5"),
    ("It is 72.0", "72"),
    ("Temperature drops to -3 degrees.", "-3"),
    ("half: .5", "0.5"),
    ("", None),
    ("I do not know.", None),
    (None, None),
    ("Answer: eighteen", None),
    ("3 apples and 4 pears, so 7.", "7"),
])
def test_parse_gsm8k_response(response, parsed):
    assert parse_gsm8k_response(response) == parsed


def test_r1_zero_answers_use_the_answer_tag():
    # the text after the last <answer> (R1-zero format, the stop string "</answer>" already cut)
    assert gsm8k_answer("<think> 16 - 3 - 4 = 9 eggs, 9 * 2 = 18 </think> <answer> 18") == "18"
    assert gsm8k_answer("<think> 2 + 2 = 4, so 5? </think> <answer> 4 </answer> then 99") == "4"
    assert gsm8k_answer("reasoning 12 then <answer>") is None  # an empty answer is no answer
    assert gsm8k_answer("no tags, the answer is 42") == "42"


def test_numbers_equal_and_normalize():
    assert numbers_equal("0.50", "0.5") and numbers_equal("1,000", "1000") and numbers_equal("$5", "5.00")
    assert not numbers_equal("5", "6") and not numbers_equal(None, "5") and not numbers_equal("x", "x")
    assert normalize_number("inf") is None and normalize_number("-.5") == "-0.5"


@pytest.mark.parametrize("response, letter", [
    ("The correct answer is B", "B"),
    ("The correct answer is (c).", "C"),
    ("Answer: D", "D"),
    ("A. paralysis of the facial muscles.", "A"),
    ("(B)", "B"),
    ("B", "B"),
    ("Based on anatomy, the answer is A because ...", "A"),
    ("I think it's probably a nerve issue", None),
    ("", None),
    ("E", None),
    ("Bladder", None),
])
def test_parse_mmlu_response(response, letter):
    assert parse_mmlu_response(response) == letter


def test_parse_mmlu_response_by_option_text():
    options = ["Bladder", "Kidney", "Ureter", "Urethra"]
    assert parse_mmlu_response("Kidney.", options) == "B" and parse_mmlu_response("urethra", options) == "D"
    assert parse_mmlu_response("the kidney, surely", options) is None
