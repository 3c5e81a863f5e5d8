"""One engine for generation: batched prompts -> completions with per-token log-probs.

``InferenceEngine(model, tokenizer=None, draft_model=None)`` and ``engine.generate(prompts,
SamplingParams(...))``; what ``stage=generate`` and alignment rollouts call.

- **Batched, cached decoding**: prompts of different lengths are left-padded into one batch,
  prefilled in one forward pass, then decoded one token per step against the preallocated
  cache of ``lmrun.inference.kv_cache`` (per-row positions; logits equal full recomputation).
  ``use_cache=False`` (and models with a mixer that has no cache: Hyena) recompute the whole
  sequence every step — the baseline.
- **Sampling**: temperature (0 = greedy), top-k (Fan et al. 2018), top-p (Holtzman et al. 2020),
  stop token ids, stop strings (need a tokenizer), ``max_new_tokens``, a seed.
- **Speculative decoding** with ``draft_model`` (Leviathan et al. 2023, "Fast Inference from
  Transformers via Speculative Decoding"; Chen et al. 2023, "Accelerating Large Language Model
  Decoding with Speculative Sampling"): the draft proposes ``speculative_k`` tokens, the target
  scores them in one pass, each draft token ``x`` is accepted with probability
  ``min(1, p(x)/q(x))``; at the first rejection a token is drawn from ``norm(max(0, p - q))``;
  after ``k`` acceptances a bonus token from ``p``. The output distribution is exactly the
  target's (``p``, after temperature/top-k/top-p); greedily (``temperature=0``) the tokens are
  exactly the target's greedy tokens. Rows are decoded one after another (batch 1).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from lmrun.inference.kv_cache import InferenceCache, forward_cached, supports_cache
from lmrun.inference.sampling import sampling_probs

FINISH_REASONS = ("stop", "length")


@dataclass
class SamplingParams:
    """How to sample. max_new_tokens: at most this many new tokens per prompt (>= 1).
    temperature: 0 = greedy (argmax), else softmax(logits / temperature). top_k: keep the k most
    likely tokens (0: all). top_p: keep the smallest set with mass >= top_p (1: all).
    stop_token_ids: ids that end a completion (kept in ``token_ids``, left out of ``text``).
    stop_strings: strings that end a completion (``text`` is cut before the string; needs a
    tokenizer). seed: seed of the sampling generator (None: nondeterministic)."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    seed: int | None = 0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens}: expected an integer >= 1")
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"temperature={self.temperature}, top_k={self.top_k}, top_p={self.top_p}: expected "
                             "temperature >= 0, top_k >= 0 and 0 < top_p <= 1")


@dataclass
class Completion:
    """One prompt's result. token_ids: the new token ids; text: their decoded text (None without a
    tokenizer); logprobs: ``log p(token)`` under the model's raw distribution (temperature 1, no
    filters: what policy-gradient methods need), one per token, nats; finish_reason: ``stop`` (a
    stop token or string) or ``length`` (``max_new_tokens`` reached)."""

    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    text: str | None = None
    finish_reason: str = "length"


@dataclass
class GenerationStats:
    """Counts and times of the last ``generate`` call (seconds, tokens). ``proposed`` /
    ``accepted``: draft tokens proposed and accepted (speculative decoding)."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    target_passes: int = 0
    proposed: int = 0
    accepted: int = 0

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.proposed if self.proposed else None

    def as_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("prompt_tokens", "new_tokens", "prefill_s", "decode_s", "target_passes",
                                           "proposed", "accepted")}
        d["acceptance_rate"] = self.acceptance_rate
        d["decode_tokens_per_s"] = self.new_tokens / self.decode_s if self.decode_s > 0 else None
        return d


def speculative_accept(p: torch.Tensor, q: torch.Tensor, drafts: list[int],
                       generator: torch.Generator | None = None) -> tuple[int, int]:
    """Accept/reject ``k`` draft tokens (Leviathan et al. 2023, Algorithm 1; Chen et al. 2023).

    p ``(k+1, vocab)``: the target's sampling distributions after the prefix and after each
    draft token; q ``(k, vocab)``: the draft's distributions the drafts were drawn from;
    drafts: the ``k`` draft ids. Returns ``(n, token)``: the first ``n`` drafts are accepted and
    ``token`` follows them (drawn from ``norm(max(0, p_n - q_n))`` after a rejection, from
    ``p_k`` after ``k`` acceptances). The emitted tokens are distributed exactly as sampling from
    ``p`` token by token; one-hot ``p`` and ``q`` (greedy) accept a draft iff it is p's argmax."""
    k = len(drafts)
    for i, d in enumerate(drafts):
        ratio = float(p[i, d]) / float(q[i, d])
        if ratio >= 1 or float(torch.rand((), generator=generator, device=p.device)) < ratio:
            continue
        residual = (p[i] - q[i]).clamp_min(0)
        total = float(residual.sum())
        residual = residual / total if total > 0 else p[i]
        return i, int(torch.multinomial(residual, 1, generator=generator))
    return k, int(torch.multinomial(p[k], 1, generator=generator))


def greedy_accept(best: list[int], drafts: list[int]) -> tuple[int, int]:
    """``speculative_accept`` for greedy decoding (one-hot ``p`` and ``q``), without tensors: best,
    the target's argmax ids after the prefix and after each of the ``k`` drafts (``k+1`` ids).
    Drafts are kept while they equal ``best``; returns ``(n, best[n])``."""
    n = 0
    while n < len(drafts) and drafts[n] == best[n]:
        n += 1
    return n, best[n]


class _Row:
    """One completion in progress: appends tokens and applies the stop rules."""

    def __init__(self, prompt: list[int], params: SamplingParams, tokenizer):
        self.c = Completion(prompt_ids=list(prompt))
        self.params, self.tok, self.done = params, tokenizer, False
        self.cut: int | None = None  # text length where a stop string starts

    def push(self, token: int, logprob: float) -> bool:
        c, p = self.c, self.params
        c.token_ids.append(token)
        c.logprobs.append(logprob)
        if token in p.stop_token_ids:
            c.finish_reason, self.done = "stop", True
        elif p.stop_strings and self.tok is not None:
            text = self.tok.decode(c.token_ids)
            hits = [i for i in (text.find(s) for s in p.stop_strings) if i >= 0]
            if hits:
                self.cut, c.finish_reason, self.done = min(hits), "stop", True
        if not self.done and len(c.token_ids) >= p.max_new_tokens:
            c.finish_reason, self.done = "length", True
        return self.done

    def finish(self) -> Completion:
        c = self.c
        if self.tok is not None:
            ids = c.token_ids[:-1] if c.token_ids and c.token_ids[-1] in self.params.stop_token_ids else c.token_ids
            text = self.tok.decode(ids)
            c.text = text[: self.cut] if self.cut is not None else text
        return c


class InferenceEngine:
    """Generate from a ``TransformerLM`` (eval mode, no gradients).

    model: the (target) model; tokenizer: optional, with ``encode(str) -> list[int]`` and
    ``decode(ids) -> str`` (needed for string prompts, ``text`` and stop strings); draft_model:
    enables speculative decoding (same vocabulary); speculative_k: draft tokens per round;
    use_cache: False recomputes the whole sequence every step (the no-cache baseline).
    ``generate`` raises ValueError for an empty prompt, a prompt plus ``max_new_tokens`` longer
    than the context, or a speculative model pair whose caches cannot roll back (linear attention).
    ``last_stats`` holds the ``GenerationStats`` of the last call.
    """

    def __init__(self, model, tokenizer=None, draft_model=None, *, speculative_k: int = 4, use_cache: bool = True):
        if speculative_k < 1:
            raise ValueError(f"speculative_k={speculative_k}: expected an integer >= 1")
        self.model, self.tokenizer, self.draft = model.eval(), tokenizer, draft_model
        if draft_model is not None:
            draft_model.eval()
            if draft_model.vocab_size != model.vocab_size:
                raise ValueError(f"draft vocabulary {draft_model.vocab_size} != target vocabulary {model.vocab_size}")
            for m in (model, draft_model):
                if not supports_cache(m) or any(layer.attn.__class__.__name__ == "LinearAttention" for layer in m.layers):
                    raise ValueError("speculative decoding needs models whose caches can roll back (softmax attention "
                                     "or MLA; not linear attention or Hyena)")
        self.k, self.use_cache = speculative_k, use_cache
        self.device = next(model.parameters()).device
        self.last_stats = GenerationStats()

    # --- helpers -------------------------------------------------------------------------------
    def _ids(self, prompts) -> list[list[int]]:
        ids = []
        for p in prompts:
            if isinstance(p, str):
                if self.tokenizer is None:
                    raise ValueError("string prompts need a tokenizer")
                p = self.tokenizer.encode(p)
            p = [int(t) for t in p]
            if not p:
                raise ValueError("every prompt must hold at least one token")
            ids.append(p)
        return ids

    def _generator(self, params: SamplingParams) -> torch.Generator | None:
        if params.seed is None:
            return None
        return torch.Generator(device=self.device).manual_seed(int(params.seed))

    @staticmethod
    def _choose(logits: torch.Tensor, params: SamplingParams, gen) -> tuple[torch.Tensor, torch.Tensor]:
        """logits (b, vocab) -> tokens (b,), raw log-probs of those tokens (b,), float64 nats.
        Greedy is the argmax of the logits (the first on ties, as of ``sampling_probs``' one-hot)."""
        if params.temperature == 0:
            tokens = logits.argmax(-1)
        else:
            probs = sampling_probs(logits, params.temperature, params.top_k, params.top_p)
            tokens = torch.multinomial(probs, 1, generator=gen)[:, 0]
        logp = torch.log_softmax(logits, -1, dtype=torch.float64).gather(-1, tokens[:, None]).view(-1)
        return tokens, logp

    # --- generation ------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, prompts, params: SamplingParams | None = None, on_token=None) -> list[Completion]:
        """prompts: a list of strings or of token-id lists -> one ``Completion`` per prompt, in
        order. ``on_token(row, token_id)`` is called as each token is accepted (streaming)."""
        params = params or SamplingParams()
        ids = self._ids(prompts)
        ctx = self.model.context_length
        for p in ids:
            if len(p) + params.max_new_tokens > ctx:
                raise ValueError(f"a prompt of {len(p)} tokens + max_new_tokens={params.max_new_tokens} exceeds "
                                 f"context_length={ctx}")
        self.last_stats = GenerationStats(prompt_tokens=sum(len(p) for p in ids))
        rows = [_Row(p, params, self.tokenizer) for p in ids]
        gen = self._generator(params)
        if self.draft is not None:  # rows one after another, reusing one cache per model
            cap = max(len(p) for p in ids) + params.max_new_tokens + self.k + 1
            caches = (InferenceCache(self.model, 1, cap, slack=self.k + 1),
                      InferenceCache(self.draft, 1, cap, slack=self.k + 1))
            for i, row in enumerate(rows):
                self._speculative(row, params, gen, lambda t, i=i: on_token and on_token(i, t), caches)
        elif self.use_cache and supports_cache(self.model):
            self._cached(rows, params, gen, on_token)
        else:
            self._uncached(rows, params, gen, on_token)
        self.last_stats.new_tokens = sum(len(r.c.token_ids) for r in rows)
        return [r.finish() for r in rows]

    def _push_all(self, rows, tokens, logp, on_token) -> None:
        tokens, logp = tokens.tolist(), logp.tolist()  # one host transfer each per step
        for i, row in enumerate(rows):
            if not row.done:
                row.push(tokens[i], logp[i])
                if on_token is not None:
                    on_token(i, tokens[i])

    def _cached(self, rows: list[_Row], params, gen, on_token) -> None:
        st = self.last_stats
        lengths = [len(r.c.prompt_ids) for r in rows]
        L, b = max(lengths), len(rows)
        batch = torch.zeros(b, L, dtype=torch.long)
        for i, r in enumerate(rows):
            batch[i, L - lengths[i]:] = torch.tensor(r.c.prompt_ids)
        pad = torch.tensor([L - n for n in lengths])
        t0 = time.perf_counter()
        cache = InferenceCache(self.model, b, L + params.max_new_tokens, pad)
        logits = forward_cached(self.model, batch.to(self.device), cache)[:, -1]
        tokens, logp = self._choose(logits, params, gen)
        tokens.tolist()  # synchronise before the clock
        st.prefill_s, st.target_passes = time.perf_counter() - t0, 1
        t0 = time.perf_counter()
        while True:
            self._push_all(rows, tokens, logp, on_token)
            if all(r.done for r in rows):
                break
            logits = forward_cached(self.model, tokens[:, None], cache)[:, -1]
            st.target_passes += 1
            tokens, logp = self._choose(logits, params, gen)
        st.decode_s = time.perf_counter() - t0

    def _uncached(self, rows: list[_Row], params, gen, on_token) -> None:
        """Full recomputation every step: one batched forward when all prompts have one length,
        else one forward per row (the model has no padding mask)."""
        st = self.last_stats
        same = len({len(r.c.prompt_ids) for r in rows}) == 1

        def last_logits():
            if same:
                seqs = torch.tensor([r.c.prompt_ids + r.c.token_ids for r in rows], device=self.device)
                return self.model(seqs)[:, -1]
            return torch.cat([self.model(torch.tensor([r.c.prompt_ids + r.c.token_ids], device=self.device))[:, -1]
                              for r in rows])

        t0 = time.perf_counter()
        tokens, logp = self._choose(last_logits(), params, gen)
        tokens.tolist()
        st.prefill_s, st.target_passes = time.perf_counter() - t0, 1
        t0 = time.perf_counter()
        while True:
            self._push_all(rows, tokens, logp, on_token)
            if all(r.done for r in rows):
                break
            for r in rows:  # a finished row gets a placeholder token so the batch stays rectangular
                if r.done and same:
                    r.c.token_ids.append(r.c.token_ids[-1])
            tokens, logp = self._choose(last_logits(), params, gen)
            for r in rows:
                if r.done and same:
                    r.c.token_ids.pop()
            st.target_passes += 1
        st.decode_s = time.perf_counter() - t0

    def _speculative(self, row: _Row, params, gen, on_token, caches) -> None:
        st, k = self.last_stats, self.k
        target, draft = self.model, self.draft
        seq = list(row.c.prompt_ids)
        tc, dc = caches
        tc.reset()
        dc.reset()
        t0 = time.perf_counter()
        if len(seq) > 1:  # invariant: both caches hold seq[:-1]
            forward_cached(target, torch.tensor([seq[:-1]], device=self.device), tc)
            forward_cached(draft, torch.tensor([seq[:-1]], device=self.device), dc)
        st.prefill_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        probs = lambda logits: sampling_probs(logits, params.temperature, params.top_k, params.top_p)
        greedy = params.temperature == 0
        while not row.done:
            kk = min(k, params.max_new_tokens - len(row.c.token_ids))
            feed, qs, drafts = seq[dc.length:], [], []
            for _ in range(kk):
                q = forward_cached(draft, torch.tensor([feed], device=self.device), dc)[0, -1]
                if greedy:
                    d = int(q.argmax())
                else:
                    q = probs(q)
                    d = int(torch.multinomial(q, 1, generator=gen))
                    qs.append(q)
                drafts.append(d)
                feed = [d]
            base = len(seq)
            logits = forward_cached(target, torch.tensor([seq[tc.length:] + drafts], device=self.device), tc)[0]
            logits = logits[-(kk + 1):]
            st.target_passes += 1
            if greedy:
                n, t = greedy_accept(logits.argmax(-1).tolist(), drafts)
            else:
                n, t = speculative_accept(probs(logits), torch.stack(qs), drafts, gen)
            st.proposed += kk
            st.accepted += n
            out = drafts[:n] + [t]
            logp = torch.log_softmax(logits[: n + 1], -1, dtype=torch.float64)
            tc.truncate(base + n)
            dc.truncate(min(dc.length, base + n))
            for j, tok in enumerate(out):
                seq.append(tok)
                on_token(tok)
                if row.push(tok, float(logp[j, tok])):
                    break
        st.decode_s += time.perf_counter() - t0
