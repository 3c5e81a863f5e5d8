"""Preallocated decoding caches for every token mixer of ``TransformerLM`` and the cached forward pass.

A batch of prompts of different lengths is **left-padded** to a common length ``L``: row ``b``
has ``pad[b]`` padding slots, then its tokens. All rows write the same cache slot at each step
(one write pointer ``length``), and each row's tokens get **per-row positions**
``slot - pad[b]`` (RoPE, learned and sinusoidal positions alike), so a row's logits equal those
of the model run on that row alone. Padding slots are masked out of every attention; a padding
query attends to itself only (finite, ignored).

Per mixer (``TransformerLM`` layer ``i``, ``layers.{i}.attn``):

- ``MultiHeadSelfAttention`` (MHA, GQA, MQA): keys and values ``(batch, n_kv_heads, capacity,
  head_dim)``, i.e. ``2·n_kv_heads·head_dim`` numbers per token and layer (Pope et al. 2022,
  "Efficiently Scaling Transformer Inference"). With a sliding ``window`` w the cache is a ring
  buffer of ``w + slack`` slots (Mistral 7B's rolling buffer cache, Jiang et al. 2023): memory
  is bounded by the window whatever the length; ``slack`` extra slots allow rolling back up to
  ``slack`` tokens (speculative decoding).
- ``MultiHeadLatentAttention`` (DeepSeek-V2): only the latent ``c_kv`` ``(batch, capacity,
  kv_rank)`` and the shared RoPE key ``(batch, capacity, rope_dim)``; attention in the absorbed
  form (queries mapped into the latent space).
- ``LinearAttention`` (Katharopoulos et al. 2020): the recurrent state ``S (batch, heads, d_k,
  d_v)`` and normaliser ``z (batch, heads, d_k)``, O(1) in the length. It cannot be rolled back
  (``truncate`` raises ValueError), so it does not serve as a speculative-decoding target or
  draft.
- ``HyenaOperator``: no cache. Its long convolutions have no constant-size state in this form,
  so ``supports_cache`` is False and the engine recomputes the whole sequence every step.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lmrun.model.attention import MultiHeadSelfAttention
from lmrun.model.linear_attention import LinearAttention, feature_map
from lmrun.model.mla import MultiHeadLatentAttention


def supports_cache(model) -> bool:
    """True when every layer's token mixer has a cache here (everything but Hyena)."""
    return all(isinstance(layer.attn, (MultiHeadSelfAttention, MultiHeadLatentAttention, LinearAttention))
               for layer in model.layers)


class InferenceCache:
    """The decoding state of one ``TransformerLM`` for a batch of left-padded sequences.

    ``InferenceCache(model, batch, capacity, pad=None, slack=0)``: preallocates every layer's
    cache for ``capacity`` slots (padding included) on the model's device and dtype; ``pad``
    integer ``(batch,)`` (default zeros) — padding slots at the start of each row; ``slack``:
    extra ring-buffer slots for sliding-window layers (how far ``truncate`` may roll back).
    ``length`` is the number of slots filled. Raises ValueError for a model with a mixer that
    has no cache (Hyena).
    """

    def __init__(self, model, batch: int, capacity: int, pad: torch.Tensor | None = None, slack: int = 0):
        if not supports_cache(model):
            raise ValueError("this model has a token mixer without a KV cache (Hyena): decode without the cache")
        p = next(model.parameters())
        device, dtype = p.device, p.dtype
        self.batch, self.capacity, self.length, self.slack = batch, capacity, 0, slack
        self.pad = (torch.zeros(batch, dtype=torch.long, device=device) if pad is None
                    else pad.to(device=device, dtype=torch.long))
        self.layers: list[dict] = []
        for layer in model.layers:
            m = layer.attn
            if isinstance(m, MultiHeadSelfAttention):
                size = capacity if m.window is None else min(capacity, m.window + slack)
                shape = (batch, m.n_kv_heads, size, m.d_k)
                entry = {"kind": "kv", "k": torch.zeros(shape, device=device, dtype=dtype),
                         "v": torch.zeros(shape, device=device, dtype=dtype)}
                if m.window is not None:  # ring buffer: which slot each position holds (-1: empty)
                    entry["kind"] = "ring"
                    entry["slots"] = torch.full((size,), -1, dtype=torch.long, device=device)
                self.layers.append(entry)
            elif isinstance(m, MultiHeadLatentAttention):
                self.layers.append({"kind": "latent",
                                    "c": torch.zeros(batch, capacity, m.kv_rank, device=device, dtype=dtype),
                                    "kr": torch.zeros(batch, capacity, m.rope_dim, device=device, dtype=dtype)})
            else:
                h = m.num_heads
                self.layers.append({"kind": "recurrent",
                                    "S": torch.zeros(batch, h, m.d_k, m.d_k, device=device, dtype=dtype),
                                    "z": torch.zeros(batch, h, m.d_k, device=device, dtype=dtype)})

    def positions(self, s: int) -> torch.Tensor:
        """Positions ``(batch, s)`` of the next ``s`` slots: ``slot - pad`` (0 on padding)."""
        slots = torch.arange(self.length, self.length + s, device=self.pad.device)
        return (slots[None, :] - self.pad[:, None]).clamp_min(0)

    def truncate(self, length: int) -> None:
        """Forget every slot from ``length`` on (speculative decoding's rollback). ValueError for a
        recurrent state, or a ring buffer asked to roll back further than its slack."""
        if length > self.length or length < 0:
            raise ValueError(f"truncate({length}): the cache holds {self.length} slots")
        for entry in self.layers:
            if entry["kind"] == "recurrent":
                raise ValueError("a linear-attention state cannot be rolled back (no speculative decoding)")
            if entry["kind"] == "ring":
                if self.length - length > self.slack:
                    raise ValueError(f"rolling a sliding-window cache back {self.length - length} slots needs "
                                     f"slack >= that (slack={self.slack})")
                entry["slots"][entry["slots"] >= length] = -1
        self.length = length

    def nbytes(self) -> int:
        """Bytes held by the cache tensors (the memory of the cache)."""
        return sum(t.numel() * t.element_size() for e in self.layers for t in e.values() if isinstance(t, torch.Tensor)
                   and t.is_floating_point())


def _mask(cache: InferenceCache, key_slots: torch.Tensor, s: int, window: int | None) -> torch.Tensor:
    """Boolean ``(batch, 1, s, n_keys)``: may the query at slot ``length + i`` read ``key_slots[j]``."""
    q = torch.arange(cache.length, cache.length + s, device=key_slots.device)[:, None]
    k = key_slots[None, :]
    ok = (k <= q) & (k >= 0)
    if window is not None:
        ok = ok & (k > q - window)
    ok = ok[None] & (k[None] >= cache.pad[:, None, None])
    return (ok | (k == q)[None])[:, None]


def _mha_step(m: MultiHeadSelfAttention, x: torch.Tensor, pos: torch.Tensor, cache: InferenceCache,
              entry: dict) -> torch.Tensor:
    b, s, _ = x.shape
    h, kvh, d_k = m.num_heads, m.n_kv_heads, m.d_k
    q = m.q_proj(x).view(b, s, h, d_k).transpose(1, 2)
    k = m.k_proj(x).view(b, s, kvh, d_k).transpose(1, 2)
    v = m.v_proj(x).view(b, s, kvh, d_k).transpose(1, 2)
    if m.q_norm is not None:
        q, k = m.q_norm(q), m.k_norm(k)
    if m.rope is not None:
        q, k = m.rope(q, pos[:, None]), m.rope(k, pos[:, None])
    t0, t1 = cache.length, cache.length + s
    new_slots = torch.arange(t0, t1, device=x.device)
    if entry["kind"] == "kv":
        if t1 > cache.capacity:
            raise ValueError(f"the cache holds {cache.capacity} slots; {t1} are needed")
        entry["k"][:, :, t0:t1], entry["v"][:, :, t0:t1] = k, v
        keys, values = entry["k"][:, :, :t1], entry["v"][:, :, :t1]
        key_slots = torch.arange(t1, device=x.device)
    else:  # ring buffer: attend over the old contents and the new tokens, then write the new ones
        keys, values = torch.cat([entry["k"], k], dim=2), torch.cat([entry["v"], v], dim=2)
        key_slots = torch.cat([entry["slots"], new_slots])
        size = entry["slots"].shape[0]
        keep = slice(max(0, s - size), s)
        idx = new_slots[keep] % size
        entry["k"].index_copy_(2, idx, k[:, :, keep])
        entry["v"].index_copy_(2, idx, v[:, :, keep])
        entry["slots"].index_copy_(0, idx, new_slots[keep])
    mask = _mask(cache, key_slots, s, m.window)
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=kvh != h)
    return m.output_proj(out.transpose(1, 2).reshape(b, s, h * d_k))


def _mla_step(m: MultiHeadLatentAttention, x: torch.Tensor, pos: torch.Tensor, cache: InferenceCache,
              entry: dict) -> torch.Tensor:
    """The absorbed form of ``MultiHeadLatentAttention.absorbed_forward`` over a preallocated
    latent cache, with the padding mask."""
    s = x.shape[1]
    h, r, n = m.num_heads, m.kv_rank, m.nope_dim
    t0, t1 = cache.length, cache.length + s
    if t1 > cache.capacity:
        raise ValueError(f"the cache holds {cache.capacity} slots; {t1} are needed")
    q_nope, q_rope = m._queries(x, pos[:, None])
    c_new, kr_new = m._latents(x, pos[:, None])
    entry["c"][:, t0:t1] = c_new
    c = entry["c"][:, :t1]
    w_uk = m.k_up_proj.weight.view(h, n, r)
    q_lat = torch.einsum("bhsn,hnr->bhsr", q_nope, w_uk)
    scores = torch.matmul(q_lat, c.unsqueeze(1).transpose(-2, -1))  # (b, h, s, t1)
    if m.k_up_proj.bias is not None:
        scores = scores + (q_nope * m.k_up_proj.bias.view(h, 1, n)).sum(-1, keepdim=True)
    if m.rope_dim:
        entry["kr"][:, t0:t1] = kr_new[:, 0]
        scores = scores + torch.matmul(q_rope, entry["kr"][:, None, :t1].transpose(-2, -1))
    if scores.dtype in (torch.float16, torch.bfloat16):
        scores = scores.float()
    scores = scores / math.sqrt(n + m.rope_dim)
    mask = _mask(cache, torch.arange(t1, device=x.device), s, None)
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1).to(c.dtype)
    o_lat = torch.matmul(probs, c.unsqueeze(1))  # (b, h, s, r)
    w_uv = m.v_up_proj.weight.view(h, m.v_dim, r)
    w_o = m.output_proj.weight.view(m.d_model, h, m.v_dim)
    y = torch.einsum("bhsr,hrd->bsd", o_lat, torch.einsum("dhv,hvr->hrd", w_o, w_uv))
    if m.v_up_proj.bias is not None:
        y = y + m.v_up_proj.bias @ m.output_proj.weight.T
    if m.output_proj.bias is not None:
        y = y + m.output_proj.bias
    return y


def _linear_step(m: LinearAttention, x: torch.Tensor, pos: torch.Tensor, cache: InferenceCache,
                 entry: dict) -> torch.Tensor:
    """A chunk of ``s`` tokens against the recurrent state: the state's contribution plus the
    causal quadratic form inside the chunk; padding tokens add nothing to the state."""
    b, s, _ = x.shape
    h, kvh, d_k = m.num_heads, m.n_kv_heads, m.d_k
    q = m.q_proj(x).view(b, s, h, d_k).transpose(1, 2)
    k = m.k_proj(x).view(b, s, kvh, d_k).transpose(1, 2)
    v = m.v_proj(x).view(b, s, kvh, d_k).transpose(1, 2)
    fq, fk = feature_map(q, m.feature_map), feature_map(k, m.feature_map)
    if m.rope is not None:
        rq, rk = m.rope(fq, pos[:, None]), m.rope(fk, pos[:, None])
    else:
        rq, rk = fq, fk
    if kvh != h:
        fk, rk, v = (t.repeat_interleave(h // kvh, dim=1) for t in (fk, rk, v))
    slots = torch.arange(cache.length, cache.length + s, device=x.device)
    valid = (slots[None, :] >= cache.pad[:, None]).to(x.dtype)[:, None, :, None]  # (b, 1, s, 1)
    fk, rk, v = fk * valid, rk * valid, v * valid
    S, z = entry["S"], entry["z"]
    num = torch.matmul(rq, S) + torch.matmul(torch.matmul(rq, rk.transpose(-2, -1)).tril(), v)
    den = (fq * z[:, :, None]).sum(-1, keepdim=True) + torch.matmul(fq, fk.transpose(-2, -1)).tril().sum(
        -1, keepdim=True)
    out = num / (den + m.eps)
    entry["S"] = S + torch.matmul(rk.transpose(-2, -1), v)
    entry["z"] = z + fk.sum(-2)
    return m.output_proj(out.transpose(1, 2).reshape(b, s, h * d_k))


_STEPS = {"kv": _mha_step, "ring": _mha_step, "latent": _mla_step, "recurrent": _linear_step}


@torch.no_grad()
def forward_cached(model, token_ids: torch.Tensor, cache: InferenceCache) -> torch.Tensor:
    """Run ``model`` (a ``TransformerLM`` in eval mode) on the next ``s`` tokens of every row.

    token_ids integer ``(batch, s)`` -> logits ``(batch, s, vocab_size)``; the cache is
    extended by ``s`` slots. The same function as ``model(row)`` on each row's unpadded tokens
    (tested for every mixer). Raises ValueError when a position would reach ``context_length``
    or the cache is full."""
    s = token_ids.shape[1]
    pos = cache.positions(s)
    if int(pos.max()) >= model.context_length:
        raise ValueError(f"position {int(pos.max())} is beyond context_length={model.context_length}")
    x = model.token_embeddings(token_ids)
    if model.position in ("learned", "sinusoidal"):
        table = model.position_embeddings if model.position == "learned" else model.position_table
        x = x + table(pos).to(x.dtype)
    for layer, entry in zip(model.layers, cache.layers):
        step = _STEPS[entry["kind"]]

        def mixer(y, layer=layer, entry=entry, step=step):
            return step(layer.attn, y, pos, cache, entry)

        if layer.norm_placement == "pre":
            x = x + mixer(layer.ln1(x))
            x = x + layer.ffn(layer.ln2(x))
        elif layer.norm_placement == "post":
            x = layer.ln1(x + mixer(x))
            x = layer.ln2(x + layer.ffn(x))
        else:
            x = x + mixer(x)
            x = x + layer.ffn(x)
    cache.length += s
    logits = model.lm_head(model.ln_final(x))
    if model.logit_softcap is not None:
        logits = model.logit_softcap * torch.tanh(logits / model.logit_softcap)
    return logits
