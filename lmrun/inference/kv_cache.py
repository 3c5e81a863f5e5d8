"""Preallocated decoding caches for every token mixer of ``TransformerLM`` and the cached forward pass.

A batch of prompts of different lengths is **left-padded** to a common length ``L``: row ``b``
has ``pad[b]`` padding slots, then its tokens. All rows write the same cache slot at each step
(one write pointer ``length``), and each row's tokens get **per-row positions**
``slot - pad[b]`` (RoPE, learned and sinusoidal positions alike), so a row's logits equal those
of the model run on that row alone. Padding slots are masked out of every attention; a padding
query attends to itself only (finite, ignored).

Per mixer (``TransformerLM`` layer ``i``, ``layers.{i}.attn``):

- ``MultiHeadSelfAttention`` (MHA, GQA, MQA): keys and values side by side, ``kv (batch,
  capacity, 2·n_kv_heads, head_dim)`` (``k``/``v``: its ``(batch, n_kv_heads, capacity,
  head_dim)`` views), i.e. ``2·n_kv_heads·head_dim`` numbers per token and layer (Pope et al.
  2022, "Efficiently Scaling Transformer Inference"). With a sliding ``window`` w the cache is a ring
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
from torch import nn

from lmrun.inference.quantize import Int8Linear
from lmrun.model.attention import MultiHeadSelfAttention
from lmrun.model.ffn import MLP, GatedFFN, SwiGLU
from lmrun.model.layers import Embedding, Linear
from lmrun.model.linear_attention import LinearAttention, feature_map
from lmrun.model.mla import MultiHeadLatentAttention
from lmrun.model.norms import RMSNorm


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
        self.dtype = dtype
        self.pad = (torch.zeros(batch, dtype=torch.long, device=device) if pad is None
                    else pad.to(device=device, dtype=torch.long))
        self.layers: list[dict] = []
        for layer in model.layers:
            m = layer.attn
            if isinstance(m, MultiHeadSelfAttention):
                kvh = m.n_kv_heads
                if m.window is None:  # keys and values of a slot side by side: one write per step
                    kv = torch.zeros(batch, capacity, 2 * kvh, m.d_k, device=device, dtype=dtype)
                    entry = {"kind": "kv", "kv": kv, "k": kv[:, :, :kvh].transpose(1, 2),
                             "v": kv[:, :, kvh:].transpose(1, 2)}
                else:  # ring buffer: which slot each position holds (-1: empty)
                    shape = (batch, kvh, min(capacity, m.window + slack), m.d_k)
                    entry = {"kind": "ring", "k": torch.zeros(shape, device=device, dtype=dtype),
                             "v": torch.zeros(shape, device=device, dtype=dtype),
                             "slots": torch.full(shape[2:3], -1, dtype=torch.long, device=device)}
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

        # per-slot tables, built once so that a decode step only slices them (no arange, no copy)
        slots = torch.arange(capacity, device=device)
        self.pos_table = (slots[None, :] - self.pad[:, None]).clamp_min(0)  # (batch, capacity)
        self.min_pad = int(self.pad.min()) if batch else 0
        self.has_pad = bool((self.pad > 0).any())
        # (batch, 1, 1, capacity): may a single new query read slot j (False on padding slots)
        self.key_ok = (slots[None, :] >= self.pad[:, None])[:, None, None] if self.has_pad else None
        self._rot: dict = {}
        self._plan = None

    def positions(self, s: int) -> torch.Tensor:
        """Positions ``(batch, s)`` of the next ``s`` slots: ``slot - pad`` (0 on padding); a view of
        ``pos_table``. ValueError when fewer than ``s`` slots are left."""
        if self.length + s > self.capacity:
            raise ValueError(f"the cache holds {self.capacity} slots; {self.length + s} are needed")
        return self.pos_table[:, self.length:self.length + s]

    def rotations(self, rope) -> torch.Tensor:
        """RoPE rotations ``e^{i·pos·θ_k}`` of every slot, complex ``(batch, capacity, d_k/2)``
        (complex64; complex128 for a float64 model), for ``rope`` (a ``RotaryEmbedding``): the
        values ``RotaryEmbedding.forward`` builds from its cos/sin tables, computed once per cache."""
        key = id(rope)
        if key not in self._rot:
            wide = torch.float64 if self.dtype == torch.float64 else torch.float32
            pos = self.pos_table.clamp_max(rope.max_seq_len - 1)  # slots past the context are never read
            self._rot[key] = torch.complex(rope.cos[pos].to(wide), rope.sin[pos].to(wide))
        return self._rot[key]

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

    def reset(self) -> None:
        """Empty the cache for a new sequence with the same batch size and padding (keeps the
        tensors and the resolved model, ``_Plan``): any mixer, unlike ``truncate(0)``."""
        self.length = 0
        for entry in self.layers:
            if entry["kind"] == "ring":
                entry["slots"] = torch.full_like(entry["slots"], -1)
            elif entry["kind"] == "recurrent":
                entry["S"], entry["z"] = torch.zeros_like(entry["S"]), torch.zeros_like(entry["z"])

    def nbytes(self) -> int:
        """Bytes held by the cache tensors (the memory of the cache; views counted once)."""
        seen, total = set(), 0
        for e in self.layers:
            for t in e.values():
                if isinstance(t, torch.Tensor) and t.is_floating_point():
                    storage = t.untyped_storage()
                    if storage.data_ptr() not in seen:
                        seen.add(storage.data_ptr())
                        total += storage.nbytes()
        return total


def _mask(cache: InferenceCache, key_slots: torch.Tensor, s: int, window: int | None) -> torch.Tensor:
    """Boolean ``(batch, 1, s, n_keys)``: may the query at slot ``length + i`` read ``key_slots[j]``."""
    q = torch.arange(cache.length, cache.length + s, device=key_slots.device)[:, None]
    k = key_slots[None, :]
    ok = (k <= q) & (k >= 0)
    if window is not None:
        ok = ok & (k > q - window)
    ok = ok[None] & (k[None] >= cache.pad[:, None, None])
    return (ok | (k == q)[None])[:, None]


# --- decode-step building blocks ----------------------------------------------------------------
# A decode step of a small model is a few dozen tiny tensor ops, so its time is per-op overhead
# (module calls, autograd bookkeeping, aranges, index builds, dtype copies), not arithmetic. Each
# module is therefore resolved once per cache (``_Plan``) into a plain function over its tensors,
# on 2-D activations ``(batch·s, d_model)``: ``mm`` with the transposed weight for ``Linear``,
# residual adds fused into the output matmuls (``addmm``), RMSNorm as one fused LayerNorm kernel,
# RoPE rotations and positions sliced from per-cache tables, the padding mask precomputed, and
# (small models) the q/k/v and w1/w3 weights concatenated so one matmul replaces two or three.
# Modules it does not recognise (int8 linears, MoE, LayerNorm, ...) are called as they are.

_WIDE = {torch.complex64: torch.float32, torch.complex128: torch.float64}


def _mm(x: torch.Tensor, wt: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """``x (n, d_in) @ wt (d_in, d_out) (+ b)``: one ``mm`` / ``addmm``."""
    return torch.mm(x, wt) if b is None else torch.addmm(b, x, wt)


def _int8(mod):
    """``x (n, d_in) -> mod(x)`` for an ``Int8Linear`` as one ``torch._weight_int8pack_mm`` (what its
    forward runs, without the module call and the scale cast), or None where its forward takes
    another route (float64 weights, builds without the kernel)."""
    if type(mod) is not Int8Linear or mod.dtype not in (torch.float32, torch.bfloat16, torch.float16) \
            or not hasattr(torch, "_weight_int8pack_mm"):
        return None
    q, scales, b = mod.qweight, mod.scales.to(mod.dtype), mod.bias

    def f(x):
        if x.dtype != scales.dtype:
            return mod(x)
        y = torch._weight_int8pack_mm(x, q, scales)
        return y if b is None else y + b
    return f


def _linear(mod):
    """``x (n, d_in) -> mod(x) (n, d_out)``; a ``Linear`` becomes one ``mm`` with its transposed weight."""
    if type(mod) is Linear:
        wt, b = mod.weight.t(), mod.bias
        return lambda x: _mm(x, wt, b)
    return _int8(mod) or mod


def _linear_add(mod, doubled: bool = False):
    """``(res, x) -> res + mod(x)`` on 2-D tensors; a bias-free ``Linear`` is one ``addmm``.
    ``doubled`` (a bias-free ``Linear`` only): ``res`` is the doubled residual ``[r, -r]``
    ``(n, 2·d_out)`` and gets ``[y, -y]`` (weights ``[W; -W]``)."""
    if type(mod) is Linear and mod.bias is None:
        w = mod.weight
        wt = (torch.cat([w, torch.neg(w)]) if doubled else w).t()
        return lambda res, x: torch.addmm(res, x, wt)
    if doubled:
        raise ValueError("a doubled residual needs bias-free Linear output projections")
    lin = _linear(mod)
    return lambda res, x: res + lin(x)


def _norm_doubled(mod: RMSNorm):
    """``[x, -x] (n, 2d) -> RMSNorm(x) (n, d)`` (a view): the LayerNorm kernel alone, no concatenation
    (see ``_norm``)."""
    w, eps, d = mod.weight, mod.eps, mod.weight.shape[0]
    w2 = torch.cat([w, w])
    return lambda x2: F.layer_norm(x2, (2 * d,), w2, None, eps).narrow(-1, 0, d)


def _norm(mod):
    """``x (..., d) -> mod(x)`` for a norm module; ``nn.Identity`` is skipped. An ``RMSNorm``
    (impl torch, float32/float64 input of its weight's dtype) is one fused LayerNorm kernel:
    ``[x, -x]`` has mean 0 and variance ``mean(x²)``, so the first half of
    ``layer_norm([x, -x], weight=[w, w], eps)`` is ``x / sqrt(mean(x²) + eps) · w`` (equal to
    ``RMSNorm`` up to rounding; 4 small ops instead of 7)."""
    if isinstance(mod, nn.Identity):
        return lambda x: x
    if type(mod) is RMSNorm and mod.impl == "torch":
        w, eps, d = mod.weight, mod.eps, mod.weight.shape[0]
        w2 = torch.cat([w, w])

        def f(x):
            if x.dtype != w.dtype or x.dtype not in (torch.float32, torch.float64):
                return mod(x)
            return F.layer_norm(torch.cat([x, torch.neg(x)], dim=-1), (2 * d,), w2, None, eps).narrow(-1, 0, d)
        return f
    return mod


def _rotate(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """RoPE as ``RotaryEmbedding.forward`` computes it: pairs ``(x[2k], x[2k+1])`` as complex numbers
    times ``rot``. x ``(..., d_k)``, rot complex ``(..., d_k/2)`` broadcastable -> x's shape and dtype."""
    wide = _WIDE[rot.dtype]
    xw = x if x.dtype == wide else x.to(wide)
    if xw.stride(-1) != 1 or xw.storage_offset() % 2 or any(st % 2 for st in xw.stride()[:-1]):
        xw = xw.contiguous()
    out = torch.view_as_real(torch.view_as_complex(xw.unflatten(-1, (-1, 2))) * rot).flatten(-2)
    return out if out.dtype == x.dtype else out.to(x.dtype)


def _ffn_add(mod, fuse: bool, doubled: bool = False):
    """``(res, x) -> res + mod(x)`` (2-D) for a feed-forward module: gated (``w2(act(w1 x) * w3 x)``,
    w1 and w3 in one matmul when ``fuse`` and they are bias-free ``Linear`` s) and ungated MLPs of
    ``Linear`` / ``Int8Linear`` layers as plain ops; anything else (MoE) is called as it is."""
    lins = [lin for lin in (getattr(mod, n, None) for n in ("w1", "w2", "w3")) if lin is not None]
    if type(mod) not in (GatedFFN, SwiGLU, MLP) or any(type(lin) not in (Linear, Int8Linear) for lin in lins):
        return lambda res, x: res + mod(x)
    act, out, l1 = (F.silu if mod.activation == "silu" else mod.act), _linear_add(mod.w2, doubled), _linear(mod.w1)
    if type(mod) is MLP:
        return lambda res, x: out(res, act(l1(x)))
    if fuse and all(type(lin) is Linear and lin.bias is None for lin in lins):
        w13t = torch.cat([mod.w1.weight, mod.w3.weight]).t()

        def f(res, x):
            a, g = torch.mm(x, w13t).chunk(2, dim=-1)
            return out(res, act(a).mul_(g))
        return f
    l3 = _linear(mod.w3)
    return lambda res, x: out(res, act(l1(x)).mul_(l3(x)))


class _Step:
    """What every layer of one ``forward_cached`` call shares: batch ``b``, new tokens ``s``, slots
    ``t0 .. t1-1``, the RoPE rotations of those slots per table (``rots[i]`` complex ``(b, s, 1,
    d_k/2)``) and the attention mask of full (non-window) layers (None: every filled slot)."""

    __slots__ = ("b", "mask", "rots", "s", "t0", "t1")

    def __init__(self, b, s, t0, t1, rots, mask):
        self.b, self.s, self.t0, self.t1, self.rots, self.mask = b, s, t0, t1, rots, mask


def _mha(m: MultiHeadSelfAttention, cache: InferenceCache, entry: dict, fuse: bool, rope_index: int | None,
         doubled: bool = False):
    """``(res, x, st) -> res + attention(x)`` for the new tokens ``x (b·s, d_model)`` at slots
    ``st.t0 .. st.t1-1``: writes their keys/values into ``entry`` and attends over the cache.
    ``rope_index``: which of ``st.rots`` this layer's RoPE uses (None: no RoPE).

    Fast path (fused q/k/v, no QK-norm, float32/float64, full attention): the rotation is applied
    in place to the q and k heads of the ``qkv`` product, whose k and v heads are then adjacent
    and go into the cache (``(b, capacity, 2·n_kv_heads, d_k)``) in one copy."""
    h, kvh, d_k = m.num_heads, m.n_kv_heads, m.d_k
    gqa = kvh != h
    out_add = _linear_add(m.output_proj, doubled)
    qn = _norm(m.q_norm) if m.q_norm is not None else None
    kn = _norm(m.k_norm) if m.k_norm is not None else None
    projs = (m.q_proj, m.k_proj, m.v_proj)
    wqkv = bqkv = None
    if fuse and all(type(p) is Linear for p in projs):
        wqkv = torch.cat([p.weight for p in projs]).t()
        bqkv = torch.cat([p.bias for p in projs]) if m.q_proj.bias is not None else None
    lq, lk, lv = (_linear(p) for p in projs)
    kT, vT = entry["k"], entry["v"]  # (b, kvh, slots, d_k)

    if wqkv is not None and qn is None and entry["kind"] == "kv" and cache.dtype in (torch.float32, torch.float64):
        kv, H = entry["kv"], h + 2 * kvh

        def fast(res, x, st):
            b, s, t0, t1 = st.b, st.s, st.t0, st.t1
            qkv = _mm(x, wqkv, bqkv).view(b, s, H, d_k)
            if rope_index is not None:
                torch.view_as_complex(qkv.view(b, s, H, d_k // 2, 2)).narrow(2, 0, h + kvh).mul_(st.rots[rope_index])
            q, k_v = qkv.split_with_sizes([h, 2 * kvh], dim=2)
            kv.narrow(1, t0, s).copy_(k_v)
            out = F.scaled_dot_product_attention(q.transpose(1, 2), kT.narrow(2, 0, t1),
                                                 vT.narrow(2, 0, t1), attn_mask=st.mask, enable_gqa=gqa)
            out = out.reshape(b, h * d_k) if s == 1 else out.transpose(1, 2).reshape(b * s, h * d_k)
            return out_add(res, out)
        return fast

    def f(res, x, st):
        b, s, t0, t1 = st.b, st.s, st.t0, st.t1
        if wqkv is not None:
            qkv = _mm(x, wqkv, bqkv).view(b, s, h + 2 * kvh, d_k)
            q, k, v = qkv.split([h, kvh, kvh], dim=2)
        else:
            q, k, v = lq(x).view(b, s, h, d_k), lk(x).view(b, s, kvh, d_k), lv(x).view(b, s, kvh, d_k)
        if qn is not None:
            q, k = qn(q), kn(k)
        if rope_index is not None:
            rot = st.rots[rope_index]  # (b, s, 1, d_k/2): broadcast over heads
            q, k = _rotate(q, rot), _rotate(k, rot)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (b, heads, s, d_k)
        if entry["kind"] == "kv":
            kT.narrow(2, t0, s).copy_(k)
            vT.narrow(2, t0, s).copy_(v)
            keys, values, mask = kT.narrow(2, 0, t1), vT.narrow(2, 0, t1), st.mask
        else:  # ring buffer: attend over the old contents and the new tokens, then write the new ones
            new_slots = torch.arange(t0, t1, device=x.device)
            keys, values = torch.cat([kT, k], dim=2), torch.cat([vT, v], dim=2)
            key_slots = torch.cat([entry["slots"], new_slots])
            size = entry["slots"].shape[0]
            keep = slice(max(0, s - size), s)
            idx = new_slots[keep] % size
            kT.index_copy_(2, idx, k[:, :, keep])
            vT.index_copy_(2, idx, v[:, :, keep])
            entry["slots"].index_copy_(0, idx, new_slots[keep])
            mask = _mask(cache, key_slots, s, m.window)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=gqa)
        return out_add(res, out.transpose(1, 2).reshape(b * s, h * d_k))
    return f


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


def _mixer(m, cache: InferenceCache, entry: dict, fuse: bool, rope_index: int | None, doubled: bool):
    """``(res, x, st) -> res + mixer(x)`` (x, res ``(b·s, d_model)``, st a ``_Step``) for a layer's
    token mixer and its cache entry."""
    if entry["kind"] in ("kv", "ring"):
        return _mha(m, cache, entry, fuse, rope_index, doubled)
    step = _mla_step if entry["kind"] == "latent" else _linear_step

    def f(res, x, st):
        pos = cache.pos_table[:, st.t0:st.t1]
        return res + step(m, x.view(st.b, st.s, -1), pos, cache, entry).reshape(st.b * st.s, -1)
    return f


def _block(layer, cache: InferenceCache, entry: dict, fuse: bool, rope_index: int | None, doubled: bool):
    """``(x, st) -> x`` after one ``TransformerBlock``, x ``(b·s, d_model)`` (``doubled``: ``[x, -x]
    (b·s, 2·d_model)``; eval mode: dropout is the identity)."""
    mix = _mixer(layer.attn, cache, entry, fuse, rope_index, doubled)
    ffn = _ffn_add(layer.ffn, fuse, doubled)
    if doubled:
        ln1, ln2 = _norm_doubled(layer.ln1), _norm_doubled(layer.ln2)

        def f(x2, st):
            x2 = mix(x2, ln1(x2), st)
            return ffn(x2, ln2(x2))
    elif layer.norm_placement == "pre":
        ln1, ln2 = _norm(layer.ln1), _norm(layer.ln2)

        def f(x, st):
            x = mix(x, ln1(x), st)
            return ffn(x, ln2(x))
    elif layer.norm_placement == "post":
        ln1, ln2 = _norm(layer.ln1), _norm(layer.ln2)

        def f(x, st):
            x = ln1(mix(x, x, st))
            return ln2(ffn(x, x))
    else:
        def f(x, st):
            x = mix(x, x, st)
            return ffn(x, x)
    return f


# Concatenate q/k/v and w1/w3 weights (a copy, once per cache) only while that copy is small: it
# saves a few matmul calls per layer, which matters only where per-op overhead dominates.
FUSE_MAX_BYTES = 64 * 2**20


def _plain_rms(mod, dtype) -> bool:
    return type(mod) is RMSNorm and mod.impl == "torch" and mod.weight.dtype == dtype


def _doubles(model, cache: InferenceCache) -> bool:
    """Can the residual stream be carried doubled, ``[x, -x]``? Then every RMSNorm is the LayerNorm
    kernel alone (``_norm``'s identity without its concatenation): a Llama-style model — pre-norm
    RMSNorm blocks and final norm (float32/float64), plain token embedding, RoPE or no positions,
    softmax attention and feed-forward layers with bias-free ``Linear`` output projections."""
    dtype = cache.dtype
    if dtype not in (torch.float32, torch.float64) or model.position not in ("rope", "none"):
        return False
    if type(model.token_embeddings) is not Embedding or not _plain_rms(model.ln_final, dtype):
        return False
    for layer, entry in zip(model.layers, cache.layers):
        if layer.norm_placement != "pre" or not (_plain_rms(layer.ln1, dtype) and _plain_rms(layer.ln2, dtype)):
            return False
        out = layer.attn.output_proj if entry["kind"] in ("kv", "ring") else None
        ffn = layer.ffn
        if type(out) is not Linear or out.bias is not None or type(ffn) not in (GatedFFN, SwiGLU, MLP):
            return False
        if any(type(lin) is not Linear or lin.bias is not None
               for lin in (getattr(ffn, n, None) for n in ("w1", "w2", "w3")) if lin is not None):
            return False
    return True


class _Plan:
    """``model`` resolved for ``cache``: one function per block, embedding, final norm, LM head.
    ``doubled``: the residual stream is carried as ``[x, -x]`` (small Llama-style models)."""

    def __init__(self, model, cache: InferenceCache):
        self.model = model
        fuse = sum(p.numel() * p.element_size() for p in model.parameters()) <= FUSE_MAX_BYTES
        self.doubled = doubled = fuse and _doubles(model, cache)
        self.rot_tables: list[torch.Tensor] = []  # per RotaryEmbedding of a softmax-attention layer
        ropes: dict[int, int] = {}
        self.blocks = []
        for layer, entry in zip(model.layers, cache.layers):
            rope, index = getattr(layer.attn, "rope", None), None
            if entry["kind"] in ("kv", "ring") and rope is not None:
                if id(rope) not in ropes:
                    ropes[id(rope)] = len(self.rot_tables)
                    self.rot_tables.append(cache.rotations(rope)[:, :, None])  # (b, capacity, 1, d_k/2)
                index = ropes[id(rope)]
            self.blocks.append(_block(layer, cache, entry, fuse, index, doubled))
        emb = model.token_embeddings  # ids (b·s,) -> (b·s, d_model), doubled: (b·s, 2·d_model)
        if doubled:
            w = torch.cat([emb.weight, torch.neg(emb.weight)], dim=1)
            self.embed = lambda ids: w.index_select(0, ids)
        else:
            self.embed = (lambda ids, w=emb.weight: w.index_select(0, ids)) if type(emb) is Embedding else emb
        self.ln_final = _norm_doubled(model.ln_final) if doubled else _norm(model.ln_final)
        self.head = _linear(model.lm_head)


def forward_cached(model, token_ids: torch.Tensor, cache: InferenceCache) -> torch.Tensor:
    """Run ``model`` (a ``TransformerLM`` in eval mode) on the next ``s`` tokens of every row.

    token_ids integer ``(batch, s)`` -> logits ``(batch, s, vocab_size)`` (inference-mode tensors);
    the cache is extended by ``s`` slots. The same function as ``model(row)`` on each row's
    unpadded tokens (tested for every mixer). Raises ValueError when a position would reach
    ``context_length`` or the cache is full. The model's modules are resolved into plain functions
    at the first call on a cache (``_Plan``, some of it concatenated copies of weights): a cache
    serves one model, and changes to its parameters or modules after that call are not seen (the
    engine makes a new cache for every ``generate``)."""
    if torch.is_inference_mode_enabled():  # the engine's loop: no context switch per step
        return _forward_cached(model, token_ids, cache)
    with torch.inference_mode():
        return _forward_cached(model, token_ids, cache)


def _forward_cached(model, token_ids: torch.Tensor, cache: InferenceCache) -> torch.Tensor:
    b, s = token_ids.shape
    t0, t1 = cache.length, cache.length + s
    if t1 > cache.capacity:
        raise ValueError(f"the cache holds {cache.capacity} slots; {t1} are needed")
    if t1 - 1 - cache.min_pad >= model.context_length:
        raise ValueError(f"position {t1 - 1 - cache.min_pad} is beyond context_length={model.context_length}")
    plan = cache._plan
    if plan is None or plan.model is not model:
        plan = cache._plan = _Plan(model, cache)
    if s == 1:  # one new query per row reads every filled slot but the padding ones
        mask = cache.key_ok.narrow(-1, 0, t1) if cache.has_pad else None
    else:
        mask = _mask(cache, torch.arange(t1, device=token_ids.device), s, None)
    st = _Step(b, s, t0, t1, [r.narrow(1, t0, s) for r in plan.rot_tables], mask)
    x = plan.embed(token_ids.reshape(b * s))  # (b·s, d_model) from here on
    if model.position in ("learned", "sinusoidal"):
        table = model.position_embeddings if model.position == "learned" else model.position_table
        x = x + table(cache.pos_table[:, t0:t1]).reshape(b * s, -1).to(x.dtype)
    for block in plan.blocks:
        x = block(x, st)
    cache.length = t1
    logits = plan.head(plan.ln_final(x)).view(b, s, -1)
    if model.logit_softcap is not None:
        logits = model.logit_softcap * torch.tanh(logits / model.logit_softcap)
    return logits
