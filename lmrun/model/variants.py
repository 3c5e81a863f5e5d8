"""Config schemas of the architecture variants beyond the dense baseline, their validation and
resolved sizes (no torch import: the CLI composes and validates with these, and
``lmrun.model.flops`` counts from them without building a model).

- ``model.attention.kind``: ``mha`` (softmax attention, GQA/MQA with ``model.n_kv_heads``,
  optionally sliding-window with ``model.attention.window`` and ``global_every``), ``mla``
  (multi-head latent attention, ``model.attention.mla``; ``lmrun.model.mla``), ``linear``
  (causal linear attention, ``model.attention.linear``; ``lmrun.model.linear_attention``),
  ``hyena`` (the attention-free Hyena operator, ``model.attention.hyena``; ``lmrun.model.hyena``).
- ``model.ffn.kind=moe``: a mixture of SwiGLU experts, ``model.ffn.moe`` (``lmrun.model.moe``).

Presets: ``conf/model/attention/{mla,sliding_window,local_global,linear,hyena}.yaml``,
``conf/model/ffn/moe.yaml`` and the model presets ``gqa``, ``mla``, ``sliding_window``,
``linear_attention``, ``moe``, ``hyena`` in ``conf/model/``.
"""
from __future__ import annotations

from dataclasses import dataclass

from lmrun.errors import check, check_choice

ATTENTION_KINDS = ["mha", "mla", "linear", "hyena"]
FEATURE_MAPS = ["elu", "relu"]
#: attention implementations that take an explicit (sliding-window) mask or serve MLA
MASKED_IMPLS = ["naive", "sdpa"]


@dataclass
class MLAConfig:
    """``model.attention.mla``: multi-head latent attention (DeepSeek-AI 2024, DeepSeek-V2, §2.1).

    kv_lora_rank: width ``d_c`` of the joint key/value latent ``c_kv = W_DKV x`` — the only
        per-head-free tensor the KV cache keeps besides the RoPE key; null: ``4·head_dim``
        (DeepSeek-V2: 512 = 4·128).
    q_lora_rank: width ``d_c'`` of the query latent; 0: queries are projected directly from x
        (DeepSeek-V2-Lite); > 0: ``q = W_UQ RMSNorm(W_DQ x)``.
    rope_head_dim: ``d_h^R``, the width of the decoupled RoPE slice of each query head and of
        the one RoPE key shared by all heads; null: ``head_dim/2`` (DeepSeek-V2: 64 = 128/2).
        Used with ``model.position.kind=rope`` only (other kinds: no RoPE slice).
    The content ("nope") part of each query/key head and each value head are ``head_dim =
    d_model/num_heads`` wide.
    """

    kv_lora_rank: int | None = None
    q_lora_rank: int = 0
    rope_head_dim: int | None = None


@dataclass
class LinearAttentionConfig:
    """``model.attention.linear``: causal linear attention (Katharopoulos et al. 2020,
    "Transformers are RNNs").

    feature_map: ``elu`` (φ(x) = elu(x)+1, the paper's) | ``relu`` (φ(x) = max(x, 0)).
    chunk_size: tokens per chunk of the chunkwise-parallel training form (quadratic inside a
        chunk, a ``head_dim × head_dim`` state between chunks; cost per token
        O(chunk·d + d²) instead of O(seq_len·d)). A chunk as long as the sequence is the
        plain quadratic form.
    """

    feature_map: str = "elu"
    chunk_size: int = 64


@dataclass
class HyenaConfig:
    """``model.attention.hyena``: the Hyena operator (Poli et al. 2023, "Hyena Hierarchy").

    order: N, the number of long convolutions and gates (N+1 input projections).
    filter_dim: width of the implicit filter network (a 3-layer MLP with sine activations).
    filter_emb_dim: features of the filter network's positional encoding (odd: t plus
        ``(filter_emb_dim-1)/2`` cosine/sine pairs).
    short_kernel: taps of the causal depthwise convolution applied to the projections.
    """

    order: int = 2
    filter_dim: int = 64
    filter_emb_dim: int = 33
    short_kernel: int = 3


@dataclass
class MoEConfig:
    """``model.ffn.moe``: a mixture of SwiGLU experts replacing the dense FFN
    (``model.ffn.kind=moe``; Shazeer et al. 2017; Lepikhin et al. 2020, GShard; Fedus et al.
    2021, Switch; Zoph et al. 2022, ST-MoE; DeepSeek-AI 2024 for shared experts).

    num_experts: E routed experts, each a SwiGLU of width ``expert_d_ff``.
    top_k: experts per token (softmax router, top-k of the probabilities).
    expert_d_ff: each expert's width; null: ``ceil(model.d_ff / top_k)`` (``model.d_ff`` null:
        the SwiGLU default), so that a token's active FFN FLOPs equal the dense FFN's while the
        FFN parameters grow ``E/top_k``-fold (fine-grained experts, DeepSeekMoE).
    renormalize: with top_k > 1, scale the k gates to sum to 1 (GShard, Mixtral); else the
        gates are the raw router probabilities (Switch for top-1, DeepSeek-V2).
    capacity_factor: null — dropless (every assignment is computed); c > 0 — each expert takes
        at most ``ceil(c · tokens · top_k / E)`` assignments of a micro-batch, first choices
        before second choices, earlier tokens first; the rest are dropped (the token keeps its
        residual). Dropping makes a token's output depend on the other tokens of its batch.
    aux_loss_weight: weight of the load-balancing loss ``E · Σ_e f_e · P_e`` (Switch eq. 4;
        f_e: fraction of assignments routed to e, P_e: mean router probability of e).
    z_loss_weight: weight of the router z-loss ``mean_t (log Σ_e exp(logit_te))²`` (ST-MoE).
    shared_experts: experts every token passes through (DeepSeekMoE), computed as one SwiGLU
        of width ``shared_experts · expert_d_ff``.
    """

    num_experts: int = 8
    top_k: int = 2
    expert_d_ff: int | None = None
    renormalize: bool = True
    capacity_factor: float | None = None
    aux_loss_weight: float = 0.01
    z_loss_weight: float = 0.001
    shared_experts: int = 0


def head_dim(cfg) -> int:
    return int(cfg.d_model) // int(cfg.num_heads)


def mla_sizes(m: MLAConfig, d_k: int, rope: bool) -> dict[str, int]:
    """MLA sizes for head dimension ``d_k``: ``{kv_rank, q_rank, rope_dim, nope_dim, v_dim}``;
    null ranks resolve to their defaults, ``rope_dim`` is 0 without RoPE."""
    rope_dim = (int(m.rope_head_dim) if m.rope_head_dim is not None else max(2, 2 * (d_k // 4))) if rope else 0
    return {"kv_rank": int(m.kv_lora_rank) if m.kv_lora_rank is not None else 4 * d_k, "q_rank": int(m.q_lora_rank),
            "rope_dim": rope_dim, "nope_dim": d_k, "v_dim": d_k}


def resolved_mla(cfg) -> dict[str, int]:
    """The MLA sizes of a model config (``mla_sizes`` with RoPE when ``model.position.kind=rope``)."""
    return mla_sizes(cfg.attention.mla, head_dim(cfg), cfg.position.kind == "rope")


def layer_windows(cfg) -> list[int | None]:
    """The sliding window of each layer (None: full causal attention): ``window`` everywhere,
    except every ``global_every``-th layer (layers ``global_every-1, 2·global_every-1, ...``)."""
    a, L = cfg.attention, int(cfg.num_layers)
    if a.kind != "mha" or a.window is None:
        return [None] * L
    g = int(a.global_every or 0)
    return [None if g and (i + 1) % g == 0 else int(a.window) for i in range(L)]


def validate_variants(cfg) -> None:
    """ConfigError (one line: key, value, what is allowed) for an impossible variant setting of a
    model config (``ModelConfig`` or the composed ``cfg.model`` node)."""
    a = cfg.attention
    check_choice("model.attention.kind", a.kind, ATTENTION_KINDS)
    if a.window is not None:
        check("model.attention.window", a.window, a.window >= 1, "null (full causal attention) or an integer >= 1")
        check("model.attention.window", a.window, a.kind == "mha",
              f"null with model.attention.kind={a.kind} (sliding windows apply to kind=mha)")
        check("model.attention.impl", a.impl, a.impl in MASKED_IMPLS,
              "one of " + ", ".join(MASKED_IMPLS) + " with a sliding window (model.attention.window)")
    check("model.attention.global_every", a.global_every, a.global_every >= 0,
          "0 (every layer local) or k >= 1 (every k-th layer global)")
    if a.kind != "mha":
        check("model.attention.qk_norm", a.qk_norm, not a.qk_norm, f"false with model.attention.kind={a.kind}")
    if a.kind == "hyena":
        check("model.n_kv_heads", cfg.n_kv_heads, cfg.n_kv_heads is None, "null with model.attention.kind=hyena (it has no heads)")
    if a.kind == "mla":
        check("model.attention.impl", a.impl, a.impl in MASKED_IMPLS,
              "one of " + ", ".join(MASKED_IMPLS) + " with model.attention.kind=mla")
        check("model.n_kv_heads", cfg.n_kv_heads, cfg.n_kv_heads is None,
              "null with model.attention.kind=mla (keys and values come from the shared latent)")
        m = a.mla
        if m.kv_lora_rank is not None:
            check("model.attention.mla.kv_lora_rank", m.kv_lora_rank, m.kv_lora_rank >= 1, "null or an integer >= 1")
        check("model.attention.mla.q_lora_rank", m.q_lora_rank, m.q_lora_rank >= 0, "0 (no query latent) or >= 1")
        if m.rope_head_dim is not None:
            check("model.attention.mla.rope_head_dim", m.rope_head_dim, m.rope_head_dim >= 2 and m.rope_head_dim % 2 == 0,
                  "null (head_dim/2) or an even integer >= 2")
    if a.kind == "linear":
        check_choice("model.attention.linear.feature_map", a.linear.feature_map, FEATURE_MAPS)
        check("model.attention.linear.chunk_size", a.linear.chunk_size, a.linear.chunk_size >= 1, "an integer >= 1")
    if a.kind == "hyena":
        h = a.hyena
        check("model.attention.hyena.order", h.order, h.order >= 1, "an integer >= 1")
        check("model.attention.hyena.filter_dim", h.filter_dim, h.filter_dim >= 1, "an integer >= 1")
        check("model.attention.hyena.filter_emb_dim", h.filter_emb_dim, h.filter_emb_dim >= 3 and h.filter_emb_dim % 2,
              "an odd integer >= 3 (t plus cosine/sine pairs)")
        check("model.attention.hyena.short_kernel", h.short_kernel, h.short_kernel >= 1, "an integer >= 1")
        check("model.position.kind", cfg.position.kind, cfg.position.kind != "rope",
              "sinusoidal, learned or none with model.attention.kind=hyena (no queries or keys to rotate)")
    if cfg.ffn.kind == "moe":
        m = cfg.ffn.moe
        check("model.ffn.moe.num_experts", m.num_experts, m.num_experts >= 1, "an integer >= 1")
        check("model.ffn.moe.top_k", m.top_k, 1 <= m.top_k <= m.num_experts,
              f"an integer in [1, model.ffn.moe.num_experts={m.num_experts}]")
        if m.capacity_factor is not None:
            check("model.ffn.moe.capacity_factor", m.capacity_factor, m.capacity_factor > 0,
                  "null (dropless) or a number > 0")
        check("model.ffn.moe.aux_loss_weight", m.aux_loss_weight, m.aux_loss_weight >= 0, "a number >= 0")
        check("model.ffn.moe.z_loss_weight", m.z_loss_weight, m.z_loss_weight >= 0, "a number >= 0")
        check("model.ffn.moe.shared_experts", m.shared_experts, m.shared_experts >= 0, "an integer >= 0")
        if m.expert_d_ff is not None:
            check("model.ffn.moe.expert_d_ff", m.expert_d_ff, m.expert_d_ff >= 1, "null (d_ff/top_k) or an integer >= 1")


def expert_width(moe: MoEConfig, d_ff: int) -> int:
    """An expert's width: ``moe.expert_d_ff``, or ``ceil(d_ff / top_k)`` (the dense FFN's active FLOPs)."""
    return int(moe.expert_d_ff) if moe.expert_d_ff is not None else -(-int(d_ff) // int(moe.top_k))
