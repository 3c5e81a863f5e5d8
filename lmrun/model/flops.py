"""Exact parameter counts and FLOP accounting for ``TransformerLM`` configs (no model is built).

Conventions
-----------
- A matrix product ``(m×k)·(k×n)`` costs ``2·m·k·n`` FLOPs (one multiply and one add per term).
- Only matrix products are counted: the q/k/v/output projections, the attention scores
  ``Q Kᵀ`` and the weighted sum ``softmax(·) V``, the feed-forward matrices and the LM head.
  Not counted (each O(d_model) per token, against O(d_model²) for the products): embedding
  lookups, position adds, RoPE, norms, activations and gating products, softmax, masking,
  residual and bias adds, logit soft-capping.
- ``attention_scores`` counts the full ``seq_len × seq_len`` score and value products, which
  the naive path and dense kernels compute; causal kernels that skip masked blocks do about
  half. Per token, it is that sequence's cost divided by ``seq_len`` (``4·seq_len·num_heads·d_k``
  per layer). This is the accounting of Kaplan et al. 2020 (Table 1) and Hoffmann et al. 2022
  (Appendix F) without their softmax term.
- Training ≈ 3 × forward (the backward pass costs two forward passes: gradients with respect
  to activations and to weights). Beside it, the ``6·N`` approximation per token (Kaplan et al.
  2020) with N the non-embedding parameters, and with all parameters (Hoffmann et al. 2022).
- Parameters are exact, biases and norms included; a tied LM head is counted once, with the
  embeddings. ``non_embedding`` = total − token embeddings − learned position embeddings.

Variants (``lmrun.model.variants``), each counted as its implementation computes it:

- sliding windows (kind mha): the naive and SDPA paths mask the full score matrix, so
  ``attention_scores`` is unchanged; a kernel that skips blocks outside the window would do
  about ``4·min(w, seq_len)·h·d_k`` per layer. The KV cache a window needs is bounded by w.
- MLA: the projections of the training form (down, up, RoPE key, output) and scores over
  ``nope_dim + rope_dim`` query/key and ``v_dim`` value dimensions.
- linear attention (chunked form, chunk C = min(chunk_size, seq_len)): ``attention_scores``
  ``2·C·h·(d_k + d_v)`` inside chunks plus ``attention_state`` ``4·h·d_k·d_v`` (chunk states
  and their read-out) when there is more than one chunk; sequences are zero-padded to a
  multiple of C. Independent of seq_len beyond the chunk: the sub-quadratic term.
- Hyena: projections ``2·d·(N+1)·d + 2·d·d``, ``hyena_short_conv`` ``2·(N+1)·d·k``, and
  ``hyena_fft_conv`` ``N·d·(10·log2(2T) + 6·(T+1)/T)``: per channel, a real FFT of the input and
  an inverse real FFT of length ``2T`` (``2.5·n·log2 n`` FLOPs each, half the usual
  ``5·n·log2 n`` of a complex FFT) and the complex product of ``T+1`` frequencies (6 FLOPs
  each), divided by T — O(log T) per token. Not counted: the implicit filters (an MLP over T
  positions and their FFT, once per forward pass for the whole batch), gating and skip products.
- MoE: the router ``2·d·E`` and ``top_k`` experts of width ``expert_d_ff`` per token (``ffn``: active FLOPs; dropped
  assignments under a capacity factor do less); parameters ``total`` count all experts,
  ``active`` only the ``top_k`` a token uses (+ shared experts and the router), and the
  ``6·N`` approximations use the active non-embedding parameters.

These numbers feed ``dry_run`` plans, the training logs' MFU and the scaling stage. The tests
check them against hand-derived formulas, against ``TransformerLM.num_params()`` of the built
module and against ``torch.utils.flop_counter.FlopCounterMode`` on a forward pass.
"""
from __future__ import annotations

import math

from lmrun.model.config import ModelConfig, as_model_config, is_gated, norm_params, resolved_d_ff, resolved_kv_heads
from lmrun.model.variants import expert_width, layer_windows, resolved_mla


def _mixer_linears(cfg: ModelConfig) -> list[tuple[int, int]]:
    """``(d_in, d_out)`` of every linear layer of one layer's token mixer."""
    d, h = cfg.d_model, cfg.num_heads
    kvh, d_k, kind = resolved_kv_heads(cfg), cfg.d_model // cfg.num_heads, cfg.attention.kind
    if kind == "mla":
        m = resolved_mla(cfg)
        qk = m["nope_dim"] + m["rope_dim"]
        q = [(d, m["q_rank"]), (m["q_rank"], h * qk)] if m["q_rank"] else [(d, h * qk)]
        rope = [(d, m["rope_dim"])] if m["rope_dim"] else []
        return q + [(d, m["kv_rank"])] + rope + [(m["kv_rank"], h * m["nope_dim"]), (m["kv_rank"], h * m["v_dim"]),
                                                 (h * m["v_dim"], d)]
    if kind == "hyena":
        return [(d, (cfg.attention.hyena.order + 1) * d), (d, d)]
    return [(d, h * d_k), (d, kvh * d_k), (d, kvh * d_k), (h * d_k, d)]


def _mixer_other_params(cfg: ModelConfig) -> int:
    """Parameters of one token mixer besides its linear layers (norms, filters)."""
    a, d_k = cfg.attention, cfg.d_model // cfg.num_heads
    if a.kind == "mla":
        m = resolved_mla(cfg)
        return m["kv_rank"] + m["q_rank"]  # the latent RMSNorms
    if a.kind == "hyena":
        c, d = a.hyena, cfg.d_model
        filt = (c.filter_emb_dim + 1) * c.filter_dim + (c.filter_dim + 1) * c.filter_dim + c.filter_dim * c.order * d
        return (c.order + 1) * d * c.short_kernel + filt + c.filter_dim + c.order * d  # + freq, skip
    return 2 * d_k if a.qk_norm else 0


def _expert_params(cfg: ModelConfig, d_ff: int) -> int:
    """Parameters of one SwiGLU expert of width d_ff."""
    return 3 * cfg.d_model * d_ff + ((2 * d_ff + cfg.d_model) if cfg.bias else 0)


def count_params(cfg: ModelConfig) -> dict[str, int]:
    """Exact parameter counts by component.

    Returns ``{token_embeddings, position_embeddings, attention, ffn, norms, lm_head, embedding,
    non_embedding, total, active, active_non_embedding}``: ``attention`` (the token mixer,
    whatever its kind), ``ffn``, ``norms`` summed over all layers (``norms`` includes
    ``ln_final``; ``attention`` includes QK-norm and MLA latent-norm weights); ``lm_head`` is 0
    when tied. ``active``: the parameters one token uses — ``total`` minus the routed experts
    it does not visit (MoE; equal to ``total`` for dense models). Accepts a ModelConfig or the
    composed ``cfg.model`` node.
    """
    cfg = as_model_config(cfg)
    d, L, V = cfg.d_model, cfg.num_layers, cfg.vocab_size
    d_ff = resolved_d_ff(cfg)
    attn = sum(i * o + (o if cfg.bias else 0) for i, o in _mixer_linears(cfg)) + _mixer_other_params(cfg)
    inactive = 0
    if cfg.ffn.kind == "moe":
        m = cfg.ffn.moe
        w = expert_width(m, d_ff)
        ffn = m.num_experts * _expert_params(cfg, w) + m.num_experts * d
        ffn += _expert_params(cfg, m.shared_experts * w) if m.shared_experts else 0
        inactive = L * (m.num_experts - m.top_k) * _expert_params(cfg, w)
    else:
        gated = is_gated(cfg.ffn.kind)
        ffn = (3 if gated else 2) * d * d_ff
        if cfg.bias:
            ffn += (2 * d_ff if gated else d_ff) + d
    one_norm = norm_params(cfg.norm.kind, d)
    block_norms = 2 * one_norm if cfg.norm.placement != "none" else 0
    final_norm = one_norm if cfg.norm.final else 0
    out = {
        "token_embeddings": V * d,
        "position_embeddings": cfg.context_length * d if cfg.position.kind == "learned" else 0,
        "attention": L * attn,
        "ffn": L * ffn,
        "norms": L * block_norms + final_norm,
        "lm_head": 0 if cfg.tie_embeddings else V * d,
    }
    out["embedding"] = out["token_embeddings"] + out["position_embeddings"]
    out["total"] = sum(out[k] for k in ("embedding", "attention", "ffn", "norms", "lm_head"))
    out["non_embedding"] = out["total"] - out["embedding"]
    out["active"] = out["total"] - inactive
    out["active_non_embedding"] = out["non_embedding"] - inactive
    return out


def kv_cache_per_token(cfg: ModelConfig, seq_len: int | None = None) -> dict[str, int]:
    """Numbers a decoder caches per token of context, all layers, at ``seq_len`` tokens of
    context (default: context_length): ``{"elements": per token, "state_elements": fixed per
    sequence}``. mha: ``2·kv_heads·d_k`` per layer (a window w caps the cached tokens at w:
    counted as ``2·kv_heads·d_k·min(w, T)/T``); mla: ``kv_rank + rope_dim`` (absorbed form);
    linear attention: a fixed ``h·d_k·(d_k + 1)`` state per layer; Hyena: the inputs of its N
    long convolutions, ``N·d`` per token per layer (without distilling them into a recurrence)."""
    cfg = as_model_config(cfg)
    T = int(seq_len if seq_len is not None else cfg.context_length)
    kind, d_k = cfg.attention.kind, cfg.d_model // cfg.num_heads
    per_token, state = 0.0, 0
    for w in layer_windows(cfg):
        if kind == "mla":
            m = resolved_mla(cfg)
            per_token += m["kv_rank"] + m["rope_dim"]
        elif kind == "linear":
            state += cfg.num_heads * d_k * (d_k + 1)
        elif kind == "hyena":
            per_token += cfg.attention.hyena.order * cfg.d_model
        else:
            per_token += 2 * resolved_kv_heads(cfg) * d_k * (min(w, T) / T if w is not None else 1)
    return {"elements": int(round(per_token)), "state_elements": state}


def _linear_attention_flops(cfg: ModelConfig, T: int) -> tuple[int, int]:
    """(scores, state) FLOPs per token of one chunked linear-attention layer at length T."""
    h, d_k = cfg.num_heads, cfg.d_model // cfg.num_heads
    C = min(int(cfg.attention.linear.chunk_size), T)
    padded = -(-T // C) * C
    scores = 2 * C * h * (d_k + d_k) * padded
    state = 4 * h * d_k * d_k * padded if padded > C else 0
    return int(round(scores / T)), int(round(state / T))


def _hyena_fft_flops(cfg: ModelConfig, T: int) -> int:
    """FLOPs per token of one Hyena layer's long convolutions (see the module docstring)."""
    n = 2 * T
    per_channel = 2 * 2.5 * n * math.log2(n) + 6 * (n // 2 + 1)
    return int(round(cfg.attention.hyena.order * cfg.d_model * per_channel / T))


def forward_flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> dict[str, int]:
    """Forward FLOPs per token for sequences of ``seq_len`` tokens (default: context_length).

    Returns ``{attention_projections, attention_scores, ffn, lm_head, total}`` (all layers):
    projections ``2·d·(2·h·d_k + 2·kv_heads·d_k)`` per layer, scores ``4·seq_len·h·d_k`` per
    layer, FFN ``2·(3 or 2)·d·d_ff`` per layer, LM head ``2·d·vocab_size``. Variants change
    these terms and add ``attention_state`` (linear attention), ``hyena_short_conv`` and
    ``hyena_fft_conv`` (Hyena), ``router`` (MoE; ``ffn`` then counts ``top_k`` experts and the
    shared ones). See the module docstring for what is not counted.
    """
    cfg = as_model_config(cfg)
    T = int(seq_len if seq_len is not None else cfg.context_length)
    d, L, V, h = cfg.d_model, cfg.num_layers, cfg.vocab_size, cfg.num_heads
    d_ff, d_k, kind = resolved_d_ff(cfg), cfg.d_model // cfg.num_heads, cfg.attention.kind
    out = {"attention_projections": L * sum(2 * i * o for i, o in _mixer_linears(cfg))}
    if kind == "mla":
        m = resolved_mla(cfg)
        out["attention_scores"] = L * 2 * T * h * (m["nope_dim"] + m["rope_dim"] + m["v_dim"])
    elif kind == "linear":
        scores, state = _linear_attention_flops(cfg, T)
        out["attention_scores"] = L * scores
        if state:
            out["attention_state"] = L * state
    elif kind == "hyena":
        out["hyena_short_conv"] = L * 2 * (cfg.attention.hyena.order + 1) * d * cfg.attention.hyena.short_kernel
        out["hyena_fft_conv"] = L * _hyena_fft_flops(cfg, T)
    else:
        out["attention_scores"] = L * 4 * T * h * d_k
    if cfg.ffn.kind == "moe":
        m = cfg.ffn.moe
        out["router"] = L * 2 * d * m.num_experts
        out["ffn"] = L * 2 * 3 * d * expert_width(m, d_ff) * (m.top_k + m.shared_experts)
    else:
        out["ffn"] = L * 2 * (3 if is_gated(cfg.ffn.kind) else 2) * d * d_ff
    out["lm_head"] = 2 * d * V
    out["total"] = sum(out.values())
    return out


def training_flops(cfg: ModelConfig, tokens: int, seq_len: int | None = None) -> dict[str, int]:
    """FLOPs to train on ``tokens`` tokens: ``{"exact": 3·forward·tokens, "six_nd": 6·N·tokens}``
    with N the active non-embedding parameters (all non-embedding parameters for dense models)."""
    fwd = forward_flops_per_token(cfg, seq_len)["total"]
    return {"exact": 3 * fwd * int(tokens), "six_nd": 6 * count_params(cfg)["active_non_embedding"] * int(tokens)}


def mfu(tokens_per_second: float, train_flops_per_token: float, peak_flops_per_second: float) -> float:
    """Model FLOPs utilisation: achieved training FLOP/s over the hardware's peak FLOP/s
    (Chowdhery et al. 2022, PaLM, Appendix B)."""
    return tokens_per_second * train_flops_per_token / peak_flops_per_second


def human(n: float, unit: str = "") -> str:
    """``124439808`` -> ``"124.44M"`` (K, M, G, T, P)."""
    for scale, suffix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{suffix}{unit}"
    return f"{n:g}{unit}"


def describe(cfg: ModelConfig) -> str:
    """One line naming the architecture: preset/size, shape and components."""
    cfg = as_model_config(cfg)
    kv = f", {resolved_kv_heads(cfg)} kv heads" if resolved_kv_heads(cfg) != cfg.num_heads else ""
    a = cfg.attention
    if a.kind == "mla":
        m = resolved_mla(cfg)
        mixer = f"MLA {a.impl} (kv rank {m['kv_rank']}, q rank {m['q_rank']}, rope dim {m['rope_dim']})"
    elif a.kind == "linear":
        mixer = f"linear attention ({a.linear.feature_map}, chunk {a.linear.chunk_size})"
    elif a.kind == "hyena":
        mixer = f"Hyena order {a.hyena.order}"
    else:
        mixer = f"attention {a.impl}" + (" +qk-norm" if a.qk_norm else "")
        if a.window is not None:
            mixer += f", window {a.window}" + (f" (every {a.global_every}th layer global)" if a.global_every else "")
    ffn = cfg.ffn.kind
    if ffn == "moe":
        m = cfg.ffn.moe
        ffn = (f"moe {m.num_experts}x top-{m.top_k} (expert d_ff {expert_width(m, resolved_d_ff(cfg))})" + (f" +{m.shared_experts} shared" if m.shared_experts else "")
               + (f", capacity {m.capacity_factor:g}" if m.capacity_factor is not None else ", dropless"))
    parts = [f"{cfg.norm.placement}-{cfg.norm.kind}" if cfg.norm.kind != "none" else "no norm",
             ffn, cfg.position.kind if cfg.position.kind != "none" else "NoPE", mixer]
    if cfg.tie_embeddings:
        parts.append("tied")
    if cfg.logit_softcap is not None:
        parts.append(f"softcap {cfg.logit_softcap:g}")
    heads = "" if a.kind == "hyena" else f", {cfg.num_heads} heads{kv}"  # Hyena has no heads
    return (f"{cfg.name}/{cfg.size}: d_model {cfg.d_model}, {cfg.num_layers} layers{heads}, "
            f"d_ff {resolved_d_ff(cfg)}, vocab {cfg.vocab_size}, context {cfg.context_length}; " + ", ".join(parts))


def model_summary(cfg: ModelConfig, seq_len: int | None = None) -> dict:
    """Everything a plan or a log needs about a model's size and cost, JSON-serialisable.

    Returns ``{architecture, params (count_params), params_human, seq_len,
    forward_flops_per_token (by component + total), forward_flops_share (fractions),
    train_flops_per_token (3 × forward), six_n_flops_per_token (6 × active non-embedding
    params), six_n_total_flops_per_token (6 × all active params), kv_cache_per_token}``.
    """
    cfg = as_model_config(cfg)
    T = int(seq_len if seq_len is not None else cfg.context_length)
    params = count_params(cfg)
    fwd = forward_flops_per_token(cfg, T)
    active = f", {human(params['active'])} active" if params["active"] != params["total"] else ""
    return {
        "architecture": describe(cfg),
        "params": params,
        "params_human": f"{human(params['total'])} total, {human(params['non_embedding'])} non-embedding{active}",
        "seq_len": T,
        "forward_flops_per_token": fwd,
        "forward_flops_share": {k: round(v / fwd["total"], 4) for k, v in fwd.items() if k != "total"},
        "train_flops_per_token": 3 * fwd["total"],
        "six_n_flops_per_token": 6 * params["active_non_embedding"],
        "six_n_total_flops_per_token": 6 * params["active"],
        "kv_cache_per_token": kv_cache_per_token(cfg, T),
    }
