"""Continuation log-likelihoods against the closed form of a bigram model, left truncation, and
batched response generation (new-token cap, prompt cutting, seeds)."""
from __future__ import annotations

import pytest
import torch

from lmrun.eval.scoring import GenerationOptions, continuation_logprobs, fit_left, generate_responses
from tests.eval.helpers import ScriptedLM, bigram_lm


def _closed_form(table: torch.Tensor, context: list[int], cont: list[int]) -> float:
    logp = torch.log_softmax(table.double(), -1)
    prev, total = context[-1], 0.0
    for t in cont:
        total += float(logp[prev, t])
        prev = t
    return total


def test_continuation_logprobs_equal_the_bigram_closed_form():
    lm = bigram_lm(seed=1)
    table = lm.model.table.detach()
    contexts = ["Answer:", "Question: what?\nAnswer:", "x"]
    conts = [" B", " C", "yz and more"]
    got = continuation_logprobs(lm, contexts, conts, batch_size=2)  # a padded batch, then one of 1
    want = [_closed_form(table, list(c.encode()), list(x.encode())) for c, x in zip(contexts, conts)]
    assert got == pytest.approx(want, abs=1e-9)
    # the four MMLU-style letters after one prompt: only the letter's row differs
    letters = continuation_logprobs(lm, ["Answer:"] * 4, [" A", " B", " C", " D"])
    assert max(range(4), key=lambda k: letters[k]) == int(torch.log_softmax(table[32], -1)[65:69].argmax())


def test_long_contexts_keep_their_end_and_prefix_ids_come_first():
    lm = bigram_lm(context_length=8, seed=2)
    table = lm.model.table.detach()
    long = "a" * 50 + "Z:"
    assert continuation_logprobs(lm, [long], [" A"]) == pytest.approx([_closed_form(table, [58], [32, 65])])
    lm.prefix_ids = [7]  # what an HF tokenizer puts in front (BOS); an empty context is scored after it
    assert continuation_logprobs(lm, [""], ["hi"]) == pytest.approx([_closed_form(table, [7], [104, 105])])
    with pytest.raises(ValueError, match="encodes to no tokens"):
        continuation_logprobs(lm, ["a"], [""])
    with pytest.raises(ValueError, match="does not fit context_length=8"):
        continuation_logprobs(lm, ["a"], ["123456789"])
    with pytest.raises(ValueError, match="2 contexts but 1 continuations"):
        continuation_logprobs(lm, ["a", "b"], ["c"])


def test_fit_left():
    assert fit_left([1, 2, 3], 5) == ([1, 2, 3], False)
    assert fit_left([1, 2, 3, 4, 5], 3) == ([3, 4, 5], True)
    assert fit_left([0, 2, 3, 4, 5], 3, keep_prefix=[0]) == ([0, 4, 5], True)
    with pytest.raises(ValueError):
        fit_left([0, 1, 2], 1, keep_prefix=[0])


def test_generate_responses_caps_new_tokens_and_cuts_prompts_from_the_left():
    lm = ScriptedLM(lambda prompt: f"echo {len(prompt)}", context_length=64)
    prompts = ["short", "L" * 20 + "the end of a long prompt: " + "x" * 40, "mid"]
    res = generate_responses(lm, prompts, GenerationOptions(max_new_tokens=100, batch_size=2, seed=5, stop=("##",)))
    assert res.max_new_tokens == 32 and res.truncated == [False, True, False]
    assert lm.seen[0] == "short" and lm.seen[1] == prompts[1][-32:] and len(lm.seen[1]) == 32
    assert [c.text for c in res.completions] == ["echo 5", "echo 32", "echo 3"]
    assert [p.max_new_tokens for p in lm.params] == [32] * 3 and lm.params[0].stop_strings == ("##",)
    assert [p.seed for p in lm.params] == [5, 5, 7]  # one seed per batch: seed + index of its first prompt
    assert res.new_tokens == 6 + 7 + 6 and res.seconds >= 0


def test_generate_responses_through_the_engine_is_greedy_and_stops_at_eos():
    table = torch.full((257, 257), -5.0)
    table[:, ord("k")] = 0.0
    table[ord("k"), 256] = 5.0  # after "k" comes <|endoftext|>
    lm = bigram_lm(table)
    res = generate_responses(lm, ["hello", "ok"], GenerationOptions(max_new_tokens=5))
    assert [c.text for c in res.completions] == ["k", ""]  # "ok" ends with k: eos at once
    assert [c.finish_reason for c in res.completions] == ["stop", "stop"]
