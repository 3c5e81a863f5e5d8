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

These numbers feed ``dry_run`` plans, the training logs' MFU and the scaling stage. The tests
check them against hand-derived formulas, against ``TransformerLM.num_params()`` of the built
module and against ``torch.utils.flop_counter.FlopCounterMode`` on a forward pass.
"""
from __future__ import annotations

from lmrun.model.config import ModelConfig, as_model_config, is_gated, norm_params, resolved_d_ff, resolved_kv_heads


def count_params(cfg: ModelConfig) -> dict[str, int]:
    """Exact parameter counts by component.

    Returns ``{token_embeddings, position_embeddings, attention, ffn, norms, lm_head, embedding,
    non_embedding, total}``: ``attention``, ``ffn``, ``norms`` summed over all layers
    (``norms`` includes ``ln_final``; ``attention`` includes QK-norm weights); ``lm_head`` is 0
    when tied. Accepts a ModelConfig or the composed ``cfg.model`` node.
    """
    cfg = as_model_config(cfg)
    d, L, V, h = cfg.d_model, cfg.num_layers, cfg.vocab_size, cfg.num_heads
    kvh, d_ff, d_k = resolved_kv_heads(cfg), resolved_d_ff(cfg), cfg.d_model // cfg.num_heads
    attn = d * h * d_k + 2 * d * kvh * d_k + h * d_k * d
    if cfg.bias:
        attn += h * d_k + 2 * kvh * d_k + d
    if cfg.attention.qk_norm:
        attn += 2 * d_k
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
    return out


def forward_flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> dict[str, int]:
    """Forward FLOPs per token for sequences of ``seq_len`` tokens (default: context_length).

    Returns ``{attention_projections, attention_scores, ffn, lm_head, total}`` (all layers):
    projections ``2·d·(2·h·d_k + 2·kv_heads·d_k)`` per layer, scores ``4·seq_len·h·d_k`` per
    layer, FFN ``2·(3 or 2)·d·d_ff`` per layer, LM head ``2·d·vocab_size``. See the module
    docstring for what is not counted.
    """
    cfg = as_model_config(cfg)
    T = int(seq_len if seq_len is not None else cfg.context_length)
    d, L, V, h = cfg.d_model, cfg.num_layers, cfg.vocab_size, cfg.num_heads
    kvh, d_ff, d_k = resolved_kv_heads(cfg), resolved_d_ff(cfg), cfg.d_model // cfg.num_heads
    out = {
        "attention_projections": L * 2 * d * (2 * h * d_k + 2 * kvh * d_k),
        "attention_scores": L * 4 * T * h * d_k,
        "ffn": L * 2 * (3 if is_gated(cfg.ffn.kind) else 2) * d * d_ff,
        "lm_head": 2 * d * V,
    }
    out["total"] = sum(out.values())
    return out


def training_flops(cfg: ModelConfig, tokens: int, seq_len: int | None = None) -> dict[str, int]:
    """FLOPs to train on ``tokens`` tokens: ``{"exact": 3·forward·tokens, "six_nd": 6·N·tokens}``
    with N the non-embedding parameters."""
    fwd = forward_flops_per_token(cfg, seq_len)["total"]
    return {"exact": 3 * fwd * int(tokens), "six_nd": 6 * count_params(cfg)["non_embedding"] * int(tokens)}


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
    parts = [f"{cfg.norm.placement}-{cfg.norm.kind}" if cfg.norm.kind != "none" else "no norm",
             cfg.ffn.kind, cfg.position.kind if cfg.position.kind != "none" else "NoPE",
             f"attention {cfg.attention.impl}" + (" +qk-norm" if cfg.attention.qk_norm else "")]
    if cfg.tie_embeddings:
        parts.append("tied")
    if cfg.logit_softcap is not None:
        parts.append(f"softcap {cfg.logit_softcap:g}")
    return (f"{cfg.name}/{cfg.size}: d_model {cfg.d_model}, {cfg.num_layers} layers, {cfg.num_heads} heads{kv}, "
            f"d_ff {resolved_d_ff(cfg)}, vocab {cfg.vocab_size}, context {cfg.context_length}; " + ", ".join(parts))


def model_summary(cfg: ModelConfig, seq_len: int | None = None) -> dict:
    """Everything a plan or a log needs about a model's size and cost, JSON-serialisable.

    Returns ``{architecture, params (count_params), params_human, seq_len,
    forward_flops_per_token (by component + total), forward_flops_share (fractions),
    train_flops_per_token (3 × forward), six_n_flops_per_token (6 × non-embedding params),
    six_n_total_flops_per_token (6 × all params)}``.
    """
    cfg = as_model_config(cfg)
    T = int(seq_len if seq_len is not None else cfg.context_length)
    params = count_params(cfg)
    fwd = forward_flops_per_token(cfg, T)
    return {
        "architecture": describe(cfg),
        "params": params,
        "params_human": f"{human(params['total'])} total, {human(params['non_embedding'])} non-embedding",
        "seq_len": T,
        "forward_flops_per_token": fwd,
        "forward_flops_share": {k: round(v / fwd["total"], 4) for k, v in fwd.items() if k != "total"},
        "train_flops_per_token": 3 * fwd["total"],
        "six_n_flops_per_token": 6 * params["non_embedding"],
        "six_n_total_flops_per_token": 6 * params["total"],
    }
