"""The engine: filters against brute force, batched/cached decoding against the plain sampler,
stop rules, log-probs, and speculative decoding's exactness."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from lmrun.inference import (
    InferenceEngine,
    SamplingParams,
    greedy_accept,
    sample,
    speculative_accept,
    top_k_filter,
    top_p_filter,
)
from lmrun.model.transformer import TransformerLM

VOCAB = 23


def tiny(seed=0, vocab=VOCAB, d_model=16, layers=2, scale=2.0, **kw):
    torch.manual_seed(seed)
    m = TransformerLM(vocab, 48, d_model, layers, 4, 32, **kw).double().eval()
    for p in m.parameters():
        p.data.mul_(scale)
        p.requires_grad_(False)
    return m


class CharTokenizer:
    """id i <-> the i-th letter (a stand-in for BPE in stop-string tests)."""

    alphabet = "abcdefghijklmnopqrstuvw"

    def encode(self, text):
        return [self.alphabet.index(c) for c in text]

    def decode(self, ids):
        return "".join(self.alphabet[i] for i in ids)


def test_top_k_and_top_p_against_brute_force():
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        probs = torch.softmax(torch.randn(9, generator=gen, dtype=torch.float64) * 2, -1)
        k = int(torch.randint(1, 9, (), generator=gen))
        p = float(torch.rand((), generator=gen, dtype=torch.float64))
        kept_k = set(sorted(range(9), key=lambda i: -float(probs[i]))[:k])
        order = sorted(range(9), key=lambda i: -float(probs[i]))  # smallest prefix with mass >= p
        mass, kept_p = 0.0, set()
        for i in order:
            kept_p.add(i)
            mass += float(probs[i])
            if mass >= p:
                break
        for out, kept in ((top_k_filter(probs, k), kept_k), (top_p_filter(probs, p), kept_p)):
            assert {i for i in range(9) if out[i] > 0} == kept
            ref = torch.where(torch.tensor([i in kept for i in range(9)]), probs, 0.0)
            torch.testing.assert_close(out, ref / ref.sum())


@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_batch_equals_plain_sampler_per_prompt(use_cache):
    model = tiny()
    prompts = [[1, 2, 3, 4, 5], [7], [3, 9, 11]]
    out = InferenceEngine(model, use_cache=use_cache).generate(prompts, SamplingParams(max_new_tokens=12,
                                                                                     temperature=0))
    for p, c in zip(prompts, out):
        assert c.token_ids == sample(model, p, 12, context_length=48, temperature=0)
        assert c.finish_reason == "length" and len(c.logprobs) == 12
        # log-probs are those of the raw model at each step
        full = torch.log_softmax(model(torch.tensor([p + c.token_ids]))[0], -1)
        ref = [float(full[len(p) - 1 + j, t]) for j, t in enumerate(c.token_ids)]
        np.testing.assert_allclose(c.logprobs, ref, rtol=1e-9)


def test_weights_changed_between_generate_calls_are_used():
    """Each ``generate`` resolves the model afresh (RL rollouts after a policy update)."""
    model, other = tiny(seed=0), tiny(seed=1)
    engine, params = InferenceEngine(model), SamplingParams(max_new_tokens=8, temperature=0)
    before = engine.generate([[1, 2, 3]], params)[0]
    with torch.no_grad():
        model.load_state_dict(other.state_dict())
    after = engine.generate([[1, 2, 3]], params)[0]
    ref = InferenceEngine(other, use_cache=False).generate([[1, 2, 3]], params)[0]
    assert after.token_ids == ref.token_ids and after.token_ids != before.token_ids
    np.testing.assert_allclose(after.logprobs, ref.logprobs, rtol=1e-9)


def test_sampling_is_seeded_and_cache_does_not_change_samples():
    model = tiny(scale=1.0)
    params = SamplingParams(max_new_tokens=10, temperature=0.9, top_k=10, top_p=0.95, seed=5)
    prompts = [[1, 2], [4, 5]]  # equal lengths: the uncached baseline batches them the same way
    a = InferenceEngine(model).generate(prompts, params)
    b = InferenceEngine(model).generate(prompts, params)
    c = InferenceEngine(model, use_cache=False).generate(prompts, params)
    d = InferenceEngine(model).generate(prompts, SamplingParams(max_new_tokens=10, temperature=0.9, seed=6))
    assert [x.token_ids for x in a] == [x.token_ids for x in b] == [x.token_ids for x in c]
    assert [x.token_ids for x in a] != [x.token_ids for x in d]


def test_top_k_one_is_greedy():
    model = tiny()
    greedy = InferenceEngine(model).generate([[3, 4]], SamplingParams(max_new_tokens=8, temperature=0))[0]
    topk = InferenceEngine(model).generate([[3, 4]], SamplingParams(max_new_tokens=8, temperature=1.5, top_k=1))[0]
    assert greedy.token_ids == topk.token_ids


def test_stop_tokens_and_strings():
    model = tiny()
    tok = CharTokenizer()
    engine = InferenceEngine(model, tok)
    free = engine.generate(["abc"], SamplingParams(max_new_tokens=20, temperature=0))[0]
    assert free.finish_reason == "length" and free.text == tok.decode(free.token_ids)
    stop_id = free.token_ids[4]
    first = free.token_ids.index(stop_id)
    c = engine.generate(["abc"], SamplingParams(max_new_tokens=20, temperature=0, stop_token_ids=(stop_id,)))[0]
    assert c.finish_reason == "stop" and c.token_ids == free.token_ids[: first + 1]
    assert c.text == tok.decode(free.token_ids[:first])  # the stop token's text is left out
    stop = free.text[5:7]
    at = free.text.index(stop)
    c = engine.generate(["abc"], SamplingParams(max_new_tokens=20, temperature=0, stop_strings=("zz", stop)))[0]
    assert c.finish_reason == "stop" and c.text == free.text[:at]
    assert c.token_ids == free.token_ids[: at + len(stop)]  # each letter is one token here


def test_errors():
    model = tiny()
    with pytest.raises(ValueError, match="context_length"):
        InferenceEngine(model).generate([[1] * 40], SamplingParams(max_new_tokens=10))
    with pytest.raises(ValueError, match="at least one token"):
        InferenceEngine(model).generate([[]])
    with pytest.raises(ValueError, match="tokenizer"):
        InferenceEngine(model).generate(["abc"])
    with pytest.raises(ValueError, match="roll back"):
        InferenceEngine(model, draft_model=tiny(attention_kind="linear"))


@pytest.mark.parametrize("k", [1, 3, 6])
@pytest.mark.parametrize("kw", [{}, {"windows": [4, None, 4]}, {"attention_kind": "mla"}])
def test_greedy_speculative_equals_target_greedy(k, kw):
    target = tiny(seed=0, layers=3, **kw)
    draft = tiny(seed=1, layers=1, d_model=8)
    prompts = [[1, 2, 3], [5], [2, 2, 2, 2, 2, 9]]
    params = SamplingParams(max_new_tokens=15, temperature=0)
    ref = InferenceEngine(target).generate(prompts, params)
    engine = InferenceEngine(target, draft_model=draft, speculative_k=k)
    out = engine.generate(prompts, params)
    assert [c.token_ids for c in out] == [c.token_ids for c in ref]
    for a, b in zip(out, ref):
        np.testing.assert_allclose(a.logprobs, b.logprobs, rtol=1e-9)
    st = engine.last_stats
    assert st.proposed > 0 and 0 <= st.accepted <= st.proposed
    # the target itself as its draft: every greedy proposal is accepted
    same = InferenceEngine(target, draft_model=target, speculative_k=k)
    assert [c.token_ids for c in same.generate(prompts, params)] == [c.token_ids for c in ref]
    assert same.last_stats.acceptance_rate == 1.0


def test_greedy_accept_equals_speculative_accept_on_one_hot_distributions():
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        k, vocab = int(torch.randint(1, 5, (), generator=gen)), 4
        best = torch.randint(0, vocab, (k + 1,), generator=gen).tolist()
        drafts = torch.randint(0, vocab, (k,), generator=gen).tolist()
        p = torch.nn.functional.one_hot(torch.tensor(best), vocab).double()
        q = torch.nn.functional.one_hot(torch.tensor(drafts), vocab).double()
        assert greedy_accept(best, drafts) == speculative_accept(p, q, drafts, gen)


def test_speculative_accept_emits_the_target_distribution():
    """Monte Carlo over fixed p, q: the first emitted token ~ p_0, and the token after an accepted
    first draft ~ p_1 (p does not depend on the prefix here). The draft's own q is rejected by the
    same test, so the test has power."""
    gen = torch.Generator().manual_seed(0)
    V, k, trials = 5, 2, 20000
    p = torch.softmax(torch.randn(k + 1, V, generator=gen, dtype=torch.float64) * 1.5, -1)
    q = torch.softmax(torch.randn(k, V, generator=gen, dtype=torch.float64) * 1.5, -1)
    first, second, drafted = np.zeros(V), np.zeros(V), np.zeros(V)
    for _ in range(trials):
        drafts = [int(torch.multinomial(q[i], 1, generator=gen)) for i in range(k)]
        n, t = speculative_accept(p, q, drafts, gen)
        out = drafts[:n] + [t]
        first[out[0]] += 1
        drafted[drafts[0]] += 1
        if len(out) > 1:
            second[out[1]] += 1
    assert chisquare(first, p[0].numpy() * trials).pvalue > 1e-3
    assert chisquare(second, p[1].numpy() * second.sum()).pvalue > 1e-3
    assert chisquare(drafted, p[0].numpy() * trials).pvalue < 1e-6


def test_speculative_sampling_matches_target_sequence_distribution():
    """End to end on a 4-token vocabulary: the distribution of 2-token continuations sampled with
    speculative decoding equals the target's exact one (enumerated), chi-square at a fixed seed."""
    target, draft = tiny(seed=0, vocab=4, scale=1.5), tiny(seed=3, vocab=4, layers=1, d_model=8, scale=1.5)
    prompt = [1, 2]
    params = SamplingParams(max_new_tokens=2, temperature=0.8, top_p=0.97, seed=11)
    from lmrun.inference.sampling import sampling_probs

    exact = {}
    p1 = sampling_probs(target(torch.tensor([prompt]))[0, -1], 0.8, 0, 0.97)
    for a, b in itertools.product(range(4), repeat=2):
        p2 = sampling_probs(target(torch.tensor([prompt + [a]]))[0, -1], 0.8, 0, 0.97)
        exact[(a, b)] = float(p1[a] * p2[b])
    n = 800
    engine = InferenceEngine(target, draft_model=draft, speculative_k=2)
    counts = {key: 0 for key in exact}
    for c in engine.generate([prompt] * n, params):
        counts[tuple(c.token_ids)] += 1
    keys = [key for key in exact if exact[key] > 0]
    assert sum(counts[key] for key in exact if exact[key] == 0) == 0  # filtered tokens never appear
    obs = np.array([counts[key] for key in keys], dtype=float)
    assert chisquare(obs, np.array([exact[key] for key in keys]) * n).pvalue > 1e-3
    assert 0 < engine.last_stats.acceptance_rate < 1
