"""Alignment data (masks, packing, JSONL errors), prompt templates, rewards on real GSM8K answers and
malformed outputs, and the verifiable tasks."""
from __future__ import annotations

import json

import pytest
import torch

from lmrun.align.data import build_sft_sequences, iterate_batches, read_jsonl, tokenize_prompt_and_output
from lmrun.align.prompts import format_prompt, load_prompt, prompt_names
from lmrun.align.rewards import arithmetic_reward, countdown_reward, gsm8k_reward, r1_zero_reward
from lmrun.align.tasks import arithmetic_task, countdown_task, gsm8k_task
from lmrun.errors import ConfigError, DataError, FormatError
from lmrun.eval.parsing import gsm8k_reference_answer, parse_gsm8k_response, parse_mmlu_response
from tests.conftest import FIXTURES


class CharTokenizer:
    def encode(self, text):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(map(chr, ids))


def test_tokenize_prompt_and_output_shifts_and_masks():
    out = tokenize_prompt_and_output(["ab", "c"], ["xyz", "w"], CharTokenizer(), pad_token_id=0)
    a, b, c, x, y, z, w = map(ord, "abcxyzw")
    assert out["input_ids"].tolist() == [[a, b, x, y], [c, w, 0, 0]]
    assert out["labels"].tolist() == [[b, x, y, z], [w, 0, 0, 0]]
    assert out["response_mask"].tolist() == [[False, True, True, True], [True, False, False, False]]
    assert out["input_ids"].dtype == torch.long and out["response_mask"].dtype == torch.bool
    with pytest.raises(ValueError):
        tokenize_prompt_and_output(["a"], [], CharTokenizer())


def test_sft_sequences_truncation_and_packing():
    tok = CharTokenizer()
    seqs, cut = build_sft_sequences(["ab", "cdefgh"], ["xy", "z"], tok, eos_token_id=0, context_length=5)
    # the second example's prompt fills the context: no response token fits, so it is dropped
    assert cut == 1 and seqs.pairs == [([97, 98], [120, 121, 0])]
    seqs, cut = build_sft_sequences(["abcd"], ["xyz"], tok, eos_token_id=0, context_length=5)
    assert cut == 1 and seqs.pairs == [([97, 98, 99, 100], [120, 121])]
    with pytest.raises(ValueError, match="fits"):
        build_sft_sequences(["abcdefgh"], ["x"], tok, eos_token_id=0, context_length=5)
    seqs, _ = build_sft_sequences(["ab", "c", "d"], ["xy", "z", "w"], tok, eos_token_id=0, context_length=3,
                                  packing=True)
    # stream: a b x y 0 c z 0 d w 0 -> (11 - 1) // 3 = 3 windows of 3 inputs + the next label, each starting
    # where the previous one's inputs end: [a b x | y] [y 0 c | z] [z 0 d | w]; the final 0 is dropped
    assert seqs.tokens.tolist() == [[97, 98, 120, 121], [121, 0, 99, 122], [122, 0, 100, 119]]
    assert seqs.mask.tolist() == [[False, False, True, True], [True, True, False, True], [True, True, False, True]]
    batch = seqs.batch([1])
    assert batch["input_ids"].tolist() == [[121, 0, 99]] and batch["labels"].tolist() == [[0, 99, 122]]
    assert batch["response_mask"].tolist() == [[True, False, True]]
    assert seqs.response_tokens == 2 + 2 + 2  # labels x y | 0 z | 0 w: each response token once


def test_packing_matches_the_cs336_definition():
    """input_ids = ids[i*L:(i+1)*L], labels = ids[i*L+1:(i+1)*L+1] over the stream of examples
    joined with EOS (CS336 assignment 5, packed SFT dataset); every token but the first is a
    label exactly once until the tail."""
    import random

    tok = CharTokenizer()
    rng = random.Random(0)
    prompts = ["".join(rng.choice("abcdefg") for _ in range(rng.randint(1, 9))) for _ in range(40)]
    responses = ["".join(rng.choice("uvwxyz") for _ in range(rng.randint(1, 9))) for _ in range(40)]
    ids = [t for p, r in zip(prompts, responses) for t in tok.encode(p) + tok.encode(r) + [0]]
    for L in (1, 4, 7, 16):
        seqs, _ = build_sft_sequences(prompts, responses, tok, eos_token_id=0, context_length=L, packing=True)
        n = (len(ids) - 1) // L
        assert len(seqs) == n
        b = seqs.batch(list(range(n)))
        for i in range(n):
            assert b["input_ids"][i].tolist() == ids[i * L:(i + 1) * L]
            assert b["labels"][i].tolist() == ids[i * L + 1:(i + 1) * L + 1]
        labels = [t for row in b["labels"].tolist() for t in row]
        assert labels == ids[1:n * L + 1]


def test_packing_shuffle_is_seeded_and_keeps_every_example():
    tok = CharTokenizer()
    prompts, responses = [f"q{i}" for i in range(9)], [chr(ord("a") + i) for i in range(9)]
    # 9 examples of 4 tokens: a stream of 36, (36 - 1) / 5 = 7 windows that use every token
    build = lambda **kw: build_sft_sequences(prompts, responses, tok, eos_token_id=0, context_length=5,  # noqa: E731
                                             packing=True, **kw)[0]
    plain = build()
    same, other = build(shuffle=True, seed=1), build(shuffle=True, seed=1)
    assert same.tokens.tolist() == other.tokens.tolist()
    assert same.tokens.tolist() != plain.tokens.tolist()
    assert build(shuffle=True, seed=2).tokens.tolist() != same.tokens.tolist()

    def stream(seqs):
        return [seqs.tokens[0, 0].item()] + [t for row in seqs.tokens[:, 1:].tolist() for t in row]

    def examples(flat):  # the stream cut at EOS (0) back into examples, as text
        out, cur = [], []
        for t in flat:
            if t == 0:
                out.append("".join(map(chr, cur)))
                cur = []
            else:
                cur.append(t)
        return out

    assert len(same) == len(plain) and examples(stream(plain)) == [p + r for p, r in zip(prompts, responses)]
    assert sorted(examples(stream(same))) == sorted(p + r for p, r in zip(prompts, responses))
    unpacked = build_sft_sequences(prompts, responses, tok, eos_token_id=0, context_length=3, shuffle=True)[0]
    assert [p for p, _ in unpacked.pairs] == [tok.encode(p) for p in prompts]  # shuffle applies to packing only


def test_iterate_batches_covers_each_epoch():
    it = iterate_batches(5, 2, seed=3)
    epoch = [next(it) for _ in range(3)]
    assert sorted(i for b in epoch for i in b) == [0, 1, 2, 3, 4] and [len(b) for b in epoch] == [2, 2, 1]
    assert [next(iterate_batches(4, 4, shuffle=False))] == [[0, 1, 2, 3]]


def test_read_jsonl_errors(tmp_path):
    good = tmp_path / "a.jsonl"
    good.write_text('{"prompt": "p", "response": "r"}\n\n{"prompt": "q", "response": "s", "extra": 1}\n')
    assert len(read_jsonl(good, ("prompt", "response"), "align.train_data")) == 2
    with pytest.raises(DataError, match="align.train_data"):
        read_jsonl(tmp_path / "missing.jsonl", ("prompt",), "align.train_data")
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"prompt": "p", "response": "r"}\n{"prompt": 3, "response": "r"}\n')
    with pytest.raises(FormatError, match="line 2"):
        read_jsonl(bad, ("prompt", "response"), "align.train_data")
    bad.write_text('{"prompt": "p"\n')
    with pytest.raises(FormatError, match="line 1 is not JSON"):
        read_jsonl(bad, ("prompt",), "x")


def test_prompt_templates():
    assert set(prompt_names()) >= {"alpaca", "r1_zero", "question_only"}
    r1 = format_prompt(load_prompt("r1_zero"), question="What is 2+2?")
    assert r1.endswith("User: What is 2+2?\nAssistant: <think>")
    assert "### Instruction:\nSay hi\n\n### Response:\n" in format_prompt(load_prompt("alpaca"), instruction="Say hi")
    with pytest.raises(ConfigError, match="needs field"):
        format_prompt(load_prompt("alpaca"), question="x")
    with pytest.raises(ConfigError, match="expected one of"):
        load_prompt("nope")


def _gsm8k_rows():
    return [json.loads(x) for x in (FIXTURES / "align_gsm8k_train_head.jsonl").read_text().splitlines()]


def test_gsm8k_parsing_and_reward_on_real_answers():
    rows = _gsm8k_rows()
    assert [gsm8k_reference_answer(r["answer"]) for r in rows] == ["72", "10", "5"]
    for r in rows:  # a reference solution, graded against itself, is correct
        assert gsm8k_reward(r["answer"], r["answer"])["reward"] == 1.0
    assert parse_gsm8k_response("She earned $1,234.50 in total.") == "1234.5"
    assert gsm8k_reward("The answer is 72.0", "72")["reward"] == 1.0
    assert gsm8k_reward("no idea", "72") == {"reward": 0.0, "format_reward": 0.0, "answer_reward": 0.0}
    assert gsm8k_reward("71", "#### 72")["format_reward"] == 1.0
    with pytest.raises(ValueError):
        gsm8k_reference_answer("no marker")
    assert parse_mmlu_response("The correct answer is C") == "C" and parse_mmlu_response("maybe") is None


def test_r1_zero_reward_format_and_answer():
    ok = " 48/2 = 24, 48+24 = 72 </think> <answer> 72 </answer>"
    assert r1_zero_reward(ok, "72") == {"reward": 1.0, "format_reward": 1.0, "answer_reward": 1.0}
    assert r1_zero_reward(ok.replace("72 </answer>", "71 </answer>"), "72")["format_reward"] == 1.0
    assert r1_zero_reward(ok.replace("72 </answer>", "71 </answer>"), "72")["reward"] == 0.0
    for malformed in (" 72", " </think> 72", "<answer> 72 </answer>", " </think> <answer> 72", ""):
        assert r1_zero_reward(malformed, "72")["format_reward"] == 0.0
    assert r1_zero_reward(" x </think> <answer> Paris </answer>", "paris")["reward"] == 1.0


def test_arithmetic_and_countdown_rewards():
    assert arithmetic_reward(" 531<junk", "531")["reward"] == 1.0
    assert arithmetic_reward("5310", "531")["reward"] == 0.0 and arithmetic_reward("x", "1")["format_reward"] == 0.0
    assert countdown_reward(" (14/2)*13", "91|13 14 2")["reward"] == 1.0
    assert countdown_reward("14*13/2 = 91", "91|13 14 2")["reward"] == 1.0
    assert countdown_reward("14*14", "196|13 14 2")["format_reward"] == 0.0  # 14 used twice
    assert countdown_reward("14+13", "91|13 14 2") == {"reward": 0.0, "format_reward": 1.0, "answer_reward": 0.0}
    for bad in ("import os", "13/(14-14)", "2**10", "", "(13"):
        assert countdown_reward(bad, "91|13 14 2")["reward"] == 0.0


def test_tasks_are_reproducible_disjoint_and_verifiable(tmp_path):
    t = arithmetic_task(digits=3, operands=2, operations="+-")
    train, test = t.examples("train", 400, 0), t.examples("test", 100, 0)
    assert train == t.examples("train", 400, 0) and train != t.examples("train", 400, 1)
    assert not {e.question for e in train} & {e.question for e in test}
    assert all(t.reward(e.solution, e.answer)["reward"] == 1.0 for e in train + test)
    assert all(e.question.endswith("=") for e in test)
    c = countdown_task(count=4, max_number=30)
    assert all(c.reward(e.solution, e.answer)["reward"] == 1.0 for e in c.examples("train", 50, 0))
    g = gsm8k_task(str(FIXTURES / "align_gsm8k_train_head.jsonl"), None, r1_zero=True)
    ex = g.examples("train", 3, 0)
    assert sorted(e.answer for e in ex) == ["10", "5", "72"]
    assert all(g.reward(e.solution, e.answer)["reward"] == 1.0 for e in ex)
    with pytest.raises(ConfigError, match="test_path"):
        g.examples("test", 1, 0)
    with pytest.raises(ConfigError):
        arithmetic_task(digits=1).examples("test", 500, 0)
