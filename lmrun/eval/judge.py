"""A pairwise judge that works with any ``CausalLM`` — our small checkpoints as well as a local
Hugging Face model — without parsing free text: AlpacaEval-style win rates from the judge's
log-likelihoods.

For an instruction and two outputs the judge reads ``JUDGE_TEMPLATE`` (AlpacaEval's
"which output is better, Output (a) or Output (b)" comparison, Li et al. 2023, kept short so
that small judges with a context of 128 tokens have room for the texts) and we compare the
log-probabilities of the two answers ``" (a)"`` and ``" (b)"`` after it;
``p(model) = softmax(logp_a, logp_b)`` of the model's slot. Judges (LLMs and small LMs alike)
prefer a position, so each pair is judged twice, the model's output first and then second, and
the two probabilities are averaged (Zheng et al. 2023, "Judging LLM-as-a-Judge", swap
augmentation; AlpacaEval 2 likewise averages a judge's token probabilities into a "weighted"
win rate). The win rate is the mean of that preference over instructions, in percent; a pair
where both orders pick the same output is position-consistent.

Outputs that do not fit the judge's context are cut at their end; the instruction and both
outputs share the room so that neither output is favoured (``fit_texts``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from lmrun.eval.scoring import continuation_logprobs

JUDGE_TEMPLATE = (
    "Which output better follows the instruction: more helpful, accurate and harmless?\n\n"
    "Instruction: {instruction}\n\n"
    "Output (a): {output_a}\n\n"
    "Output (b): {output_b}\n\n"
    "Better output:"
)
CHOICES = (" (a)", " (b)")


@dataclass
class Judgement:
    """One instruction judged in both orders. p_model_first / p_model_second: the judge's
    probability of the model's output with it in slot (a) / slot (b); preference: their mean
    (0..1, 0.5 = tie); consistent: both orders chose the same output; truncated: texts were cut."""

    p_model_first: float
    p_model_second: float
    truncated: bool

    @property
    def preference(self) -> float:
        return 0.5 * (self.p_model_first + self.p_model_second)

    @property
    def consistent(self) -> bool:
        return (self.p_model_first > 0.5) == (self.p_model_second > 0.5)


def fit_texts(judge, texts: list[str], budget: int) -> tuple[list[str], bool]:
    """Cut the ends of ``texts`` so that their tokens total at most ``budget``: every text keeps
    ``min(its length, c)`` tokens with the largest common cap ``c`` (short texts stay whole, the
    long ones are cut to equal length) -> ``(texts, whether any was cut)``."""
    ids = [judge.encode(t) for t in texts]
    if sum(len(x) for x in ids) <= budget:
        return list(texts), False
    lo, hi = 0, max(len(x) for x in ids)
    while lo < hi:  # the largest c with sum(min(len, c)) <= budget
        c = (lo + hi + 1) // 2
        if sum(min(len(x), c) for x in ids) <= budget:
            lo = c
        else:
            hi = c - 1
    return [t if len(x) <= lo else judge.decode(x[:lo]) for t, x in zip(texts, ids)], True


def _two_way(la: float, lb: float) -> float:
    """softmax([la, lb])[0], stable."""
    m = max(la, lb)
    return math.exp(la - m) / (math.exp(la - m) + math.exp(lb - m))


def text_budget(judge) -> int:
    """Tokens left for the instruction and the two outputs in the judge's context. ValueError
    when fewer than 3 are left (the judge's context is too short for ``JUDGE_TEMPLATE``)."""
    empty = JUDGE_TEMPLATE.format(instruction="", output_a="", output_b="")
    fixed = len(getattr(judge, "prefix_ids", []) or []) + len(judge.encode(empty)) + max(
        len(judge.encode(c)) for c in CHOICES) + 8  # slack: tokens may merge across the field boundaries
    budget = int(judge.context_length) - fixed
    if budget < 3:
        raise ValueError(f"the judge's context ({judge.context_length} tokens) cannot hold the judge prompt "
                         f"({fixed} tokens) and the texts")
    return budget


def judge_pairs(judge, instructions: list[str], outputs: list[str], references: list[str],
                batch_size: int = 16, bar: bool = False) -> list[Judgement]:
    """The judge's preference for ``outputs[i]`` over ``references[i]`` on ``instructions[i]``,
    in both orders (4 scored sequences per instruction). judge: a ``CausalLM``; bar: a progress
    bar on a terminal (progress lines are logged either way). Raises ValueError when the judge's
    context cannot hold the template and the answer."""
    budget = text_budget(judge)
    contexts, conts, cut = [], [], []
    for ins, out, ref in zip(instructions, outputs, references, strict=True):
        (ins, out, ref), was_cut = fit_texts(judge, [ins, out, ref], budget)
        cut.append(was_cut)
        for a, b in ((out, ref), (ref, out)):
            prompt = JUDGE_TEMPLATE.format(instruction=ins, output_a=a, output_b=b)
            contexts += [prompt, prompt]
            conts += list(CHOICES)
    lp = continuation_logprobs(judge, contexts, conts, batch_size, desc="judging", bar=bar)
    result = []
    for i in range(len(instructions)):
        a1, b1, a2, b2 = lp[4 * i:4 * i + 4]
        # order 1: the model's output is (a); order 2: it is (b)
        result.append(Judgement(p_model_first=_two_way(a1, b1), p_model_second=_two_way(b2, a2), truncated=cut[i]))
    return result


def win_rate(judgements: list[Judgement]) -> dict:
    """``win_rate``: mean preference in percent; ``win_rate_discrete``: percent of instructions
    where the mean preference is above 0.5 (ties count half); ``position_consistency``: fraction
    of pairs where both orders chose the same output; ``judge_truncated``: pairs cut to fit."""
    n = len(judgements)
    if n == 0:
        return {}
    prefs = [j.preference for j in judgements]
    return {"win_rate": 100.0 * sum(prefs) / n,
            "win_rate_discrete": 100.0 * sum(1.0 if p > 0.5 else 0.5 if p == 0.5 else 0.0 for p in prefs) / n,
            "position_consistency": sum(j.consistent for j in judgements) / n,
            "judge_truncated": sum(j.truncated for j in judgements)}
