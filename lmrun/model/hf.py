"""Hugging Face interoperability of ``TransformerLM``: the config and state-dict mapping both ways,
the ``export`` config group, and the two entry points ``export_hf_model`` (lmrun -> a
``save_pretrained`` folder) and ``load_hf_model`` (a local Llama / Qwen2 / Qwen3 / Mixtral /
GPT-2 folder -> lmrun's own ``TransformerLM``).

Mapping (lmrun model -> transformers class):

======================================================================  =====================
lmrun model                                                             transformers class
======================================================================  =====================
pre-RMSNorm, SwiGLU or GeGLU FFN, RoPE, MHA/GQA/MQA, tied or not,       ``LlamaForCausalLM``
biases or not (swiglu_rope, gqa)
the same with QK-norm (no biases)                                       ``Qwen3ForCausalLM``
the same with a top-k>=2 renormalised, dropless MoE without shared      ``MixtralForCausalLM``
experts (moe)
pre-LayerNorm, learned positions, GELU (exact or tanh) / ReLU / SiLU    ``GPT2LMHeadModel``
MLP, multi-head (gpt2)
======================================================================  =====================

Everything else (MLA, linear attention, Hyena, sliding windows, post-norm or no norm, NoPE,
sinusoidal positions, logit soft-capping, MoE with top-1 / capacity / shared experts) has no
transformers class computing the same function: ``hf_architecture`` refuses it in one line.
Import also reads ``Qwen2ForCausalLM`` (q/k/v biases: lmrun's ``bias=True`` with zero o_proj
and FFN biases).

RoPE: lmrun rotates adjacent pairs ``(x[2i], x[2i+1])`` of a head (CS336, RoFormer), transformers'
``rotate_half`` pairs ``(x[i], x[i + d/2])`` with the same frequency ``theta^(-2i/d)``. Exporting
reorders the rows of each head of ``q_proj`` / ``k_proj`` (weights and biases, and the QK-norm
weights) to ``[0, 2, 4, ..., 1, 3, 5, ...]``; q·k is unchanged because q and k get the same order.
Import applies the inverse order. Without it, logits differ by O(1).

GPT-2's ``Conv1D`` stores weights ``(d_in, d_out)``: they are transposed, and ``c_attn`` is q, k, v
concatenated along the output dimension. Mixtral keeps its experts as ``gate_up_proj (E, 2·d_ff,
d_model)`` (w1 then w3) and ``down_proj (E, d_model, d_ff)`` (w2).

Sources: transformers' modeling_llama / modeling_qwen3 / modeling_mixtral / modeling_gpt2 (v5);
Su et al. 2021 (RoPE); the HF ``convert_llama_weights_to_hf.py`` permutation (the same reordering
in the other direction: Meta's checkpoints use interleaved pairs too).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from lmrun.errors import ConfigError, FormatError, check_choice

EXPORT_FORMATS = ["hf"]
EXPORT_DTYPES = ["float32", "bfloat16"]
EXPORTABLE = ("exportable: pre-RMSNorm + SwiGLU/GeGLU + RoPE models, tied or not (swiglu_rope, gqa) -> "
              "LlamaForCausalLM, with QK-norm and no biases -> Qwen3ForCausalLM; moe with top_k>=2, renormalize, "
              "no capacity_factor, no shared experts -> MixtralForCausalLM; gpt2 (pre-LayerNorm, learned "
              "positions, GELU/GELU-tanh/ReLU/SiLU MLP, multi-head) -> GPT2LMHeadModel")
HF_CLASSES = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM", "mixtral": "MixtralForCausalLM",
              "gpt2": "GPT2LMHeadModel", "qwen2": "Qwen2ForCausalLM"}
IMPORTABLE = ("llama", "qwen2", "qwen3", "mixtral", "gpt2")
# lmrun ffn.kind -> transformers activation_function (GPT-2), and the transformers names lmrun reads
GPT2_ACTIVATIONS = {"gelu": "gelu", "relu": "relu", "silu": "silu", "gelu_tanh": "gelu_new"}
GPT2_IMPORT_ACTIVATIONS = {**{v: k for k, v in GPT2_ACTIVATIONS.items()}, "gelu_pytorch_tanh": "gelu_tanh"}
GATED_ACTIVATIONS = {"swiglu": "silu", "geglu": "gelu"}


@dataclass
class ExportConfig:
    """``export`` (``stage=export``; ``lmrun.stages.export``).

    checkpoint: an lmrun checkpoint file or run directory (its latest ``checkpoints/ckpt_*.pt``).
    format: hf — a Hugging Face model folder (config.json, model.safetensors,
        generation_config.json, tokenizer files) for ``AutoModelForCausalLM.from_pretrained``.
    out: the folder to write (must not exist, or be empty); null: ``<run dir>/hf``.
    dtype: float32 | bfloat16 — the weights' dtype in model.safetensors.
    """

    checkpoint: str | None = None
    format: str = "hf"
    out: str | None = None
    dtype: str = "float32"


def validate_export(cfg: ExportConfig, stage: str) -> None:
    """ConfigError (one line) for a bad ``export`` value; ``export.checkpoint`` is required by stage=export."""
    check_choice("export.format", cfg.format, EXPORT_FORMATS)
    check_choice("export.dtype", cfg.dtype, EXPORT_DTYPES)
    if stage == "export" and not cfg.checkpoint:
        raise ConfigError("export.checkpoint: required (an lmrun checkpoint file or run directory, e.g. "
                          "export.checkpoint=runs/pretrain/<run>)")


# --- lmrun -> transformers ------------------------------------------------------------------------


def _refusal(mc) -> str | None:
    """Why ``mc`` has no transformers class (None: it has one)."""
    a, n, p, f = mc.attention, mc.norm, mc.position, mc.ffn
    if a.kind != "mha":
        return f"attention.kind={a.kind}"
    if a.window is not None:
        return f"attention.window={a.window} (sliding window)"
    if mc.logit_softcap is not None:
        return f"logit_softcap={mc.logit_softcap}"
    if n.kind == "none" or n.placement != "pre":
        return f"norm.kind={n.kind} norm.placement={n.placement} (HF classes are pre-norm)"
    if not n.final:
        return "norm.final=false"
    if p.kind == "rope":
        if n.kind != "rmsnorm":
            return f"norm.kind={n.kind} with RoPE"
        if f.kind == "moe":
            m = f.moe
            if m.top_k < 2 or not m.renormalize:
                return f"ffn.moe.top_k={m.top_k} renormalize={m.renormalize} (Mixtral renormalises top-k>=2 gates)"
            if m.capacity_factor is not None:
                return f"ffn.moe.capacity_factor={m.capacity_factor} (Mixtral is dropless)"
            if m.shared_experts:
                return f"ffn.moe.shared_experts={m.shared_experts}"
            if a.qk_norm or mc.bias:
                return "moe with QK-norm or biases"
            return None
        if f.kind not in GATED_ACTIVATIONS:
            return f"ffn.kind={f.kind} with RoPE (Llama's MLP is gated)"
        if a.qk_norm and mc.bias:
            return "QK-norm with biases (Qwen3's MLP has no biases)"
        return None
    if p.kind == "learned":
        if n.kind != "layernorm":
            return f"norm.kind={n.kind} with learned positions (GPT-2 uses LayerNorm)"
        if f.kind not in GPT2_ACTIVATIONS:
            return f"ffn.kind={f.kind} with learned positions (GPT-2's MLP is ungated)"
        if mc.n_kv_heads is not None and mc.n_kv_heads != mc.num_heads:
            return f"n_kv_heads={mc.n_kv_heads} (GPT-2 is multi-head)"
        if a.qk_norm:
            return "QK-norm with learned positions"
        return None
    return f"position.kind={p.kind}"


def hf_architecture(mc, key: str = "export.checkpoint") -> str:
    """The transformers ``model_type`` that computes the same function as the lmrun model config
    ``mc`` (a ``ModelConfig``, a ``cfg.model`` node or a dict): llama | qwen3 | mixtral | gpt2.
    ConfigError (one line: the reason and what can be exported) otherwise."""
    from lmrun.model.config import as_model_config

    mc = as_model_config(mc)
    why = _refusal(mc)
    if why is not None:
        raise ConfigError(f"{key}: model {mc.name} ({why}) has no Hugging Face class computing the same function; "
                          f"{EXPORTABLE}")
    if mc.position.kind == "learned":
        return "gpt2"
    if mc.ffn.kind == "moe":
        return "mixtral"
    return "qwen3" if mc.attention.qk_norm else "llama"


def to_hf_config(mc, *, bos_token_id: int | None = None, eos_token_id: int | None = None,
                 pad_token_id: int | None = None, dtype: str = "float32"):
    """The transformers config (``LlamaConfig`` / ``Qwen3Config`` / ``MixtralConfig`` /
    ``GPT2Config``) of the lmrun model config ``mc``; ConfigError where ``hf_architecture`` refuses.
    The special-token ids go to the config (and from there to generation_config.json)."""
    import transformers as tf

    from lmrun.model.config import as_model_config, resolved_d_ff, resolved_kv_heads
    from lmrun.model.variants import expert_width

    mc = as_model_config(mc)
    arch = hf_architecture(mc)
    common = dict(vocab_size=int(mc.vocab_size), tie_word_embeddings=bool(mc.tie_embeddings),
                  bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    d_ff = resolved_d_ff(mc)
    if arch == "gpt2":
        cfg = tf.GPT2Config(n_embd=mc.d_model, n_layer=mc.num_layers, n_head=mc.num_heads, n_inner=d_ff,
                            n_positions=mc.context_length, activation_function=GPT2_ACTIVATIONS[mc.ffn.kind],
                            layer_norm_epsilon=mc.norm.eps, resid_pdrop=mc.dropout, embd_pdrop=mc.dropout,
                            attn_pdrop=0.0, summary_first_dropout=0.0, **common)
    else:
        shape = dict(hidden_size=mc.d_model, num_hidden_layers=mc.num_layers, num_attention_heads=mc.num_heads,
                     num_key_value_heads=resolved_kv_heads(mc), head_dim=mc.d_model // mc.num_heads,
                     max_position_embeddings=mc.context_length, rms_norm_eps=mc.norm.eps,
                     rope_parameters={"rope_type": "default", "rope_theta": float(mc.position.theta)},
                     attention_dropout=0.0, **common)
        if arch == "mixtral":
            m = mc.ffn.moe
            cfg = tf.MixtralConfig(intermediate_size=expert_width(m, d_ff), num_local_experts=m.num_experts,
                                   num_experts_per_tok=m.top_k, router_aux_loss_coef=m.aux_loss_weight,
                                   hidden_act="silu", sliding_window=None, **shape)
        elif arch == "qwen3":
            cfg = tf.Qwen3Config(intermediate_size=d_ff, hidden_act=GATED_ACTIVATIONS[mc.ffn.kind],
                                 attention_bias=False, use_sliding_window=False, **shape)
        else:
            cfg = tf.LlamaConfig(intermediate_size=d_ff, hidden_act=GATED_ACTIVATIONS[mc.ffn.kind],
                                 attention_bias=bool(mc.bias), mlp_bias=bool(mc.bias), **shape)
    cfg.dtype = dtype
    return cfg


def rope_permutation(head_dim: int):
    """Index ``(head_dim,)``: ``[0, 2, 4, ..., 1, 3, 5, ...]`` — row ``j`` of an HF head is row
    ``perm[j]`` of the lmrun head (interleaved pairs -> rotate_half halves)."""
    import torch

    return torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])


def _per_head(t, head_dim: int, index):
    """Reorder the rows of every head of ``t`` (``(heads·head_dim, ...)`` or ``(head_dim,)``)."""
    shape = t.shape
    return t.reshape(-1, head_dim, *shape[1:])[:, index].reshape(shape)


def to_hf_state_dict(state: dict, mc) -> dict:
    """lmrun ``TransformerLM.state_dict()`` -> the state dict of the transformers model of
    ``to_hf_config(mc)`` (its own module names; tensors are new, the input is untouched)."""
    import torch

    from lmrun.model.config import as_model_config

    mc = as_model_config(mc)
    arch = hf_architecture(mc)
    hd = mc.d_model // mc.num_heads
    out = {}
    if arch == "gpt2":
        out["transformer.wte.weight"] = state["token_embeddings.weight"]
        out["transformer.wpe.weight"] = state["position_embeddings.weight"]
        for i in range(mc.num_layers):
            s, t = f"layers.{i}.", f"transformer.h.{i}."
            for a, b in (("ln1", "ln_1"), ("ln2", "ln_2")):
                out[t + b + ".weight"], out[t + b + ".bias"] = state[s + a + ".weight"], state[s + a + ".bias"]
            qkv = [state[f"{s}attn.{n}_proj.weight"] for n in "qkv"]
            out[t + "attn.c_attn.weight"] = torch.cat(qkv).T
            out[t + "attn.c_proj.weight"] = state[s + "attn.output_proj.weight"].T
            out[t + "mlp.c_fc.weight"] = state[s + "ffn.w1.weight"].T
            out[t + "mlp.c_proj.weight"] = state[s + "ffn.w2.weight"].T
            zeros = torch.zeros
            bias = lambda key, n: state.get(key, zeros(n, dtype=qkv[0].dtype))  # noqa: E731 (bias=False: zeros)
            out[t + "attn.c_attn.bias"] = torch.cat([bias(f"{s}attn.{n}_proj.bias", mc.d_model) for n in "qkv"])
            out[t + "attn.c_proj.bias"] = bias(s + "attn.output_proj.bias", mc.d_model)
            out[t + "mlp.c_fc.bias"] = bias(s + "ffn.w1.bias", state[s + "ffn.w1.weight"].shape[0])
            out[t + "mlp.c_proj.bias"] = bias(s + "ffn.w2.bias", mc.d_model)
        out["transformer.ln_f.weight"], out["transformer.ln_f.bias"] = state["ln_final.weight"], state["ln_final.bias"]
        out["lm_head.weight"] = state["lm_head.weight"]
        return {k: v.contiguous() for k, v in out.items()}
    perm = rope_permutation(hd)
    out["model.embed_tokens.weight"] = state["token_embeddings.weight"]
    for i in range(mc.num_layers):
        s, t = f"layers.{i}.", f"model.layers.{i}."
        for ours, theirs in (("q_proj", "q_proj"), ("k_proj", "k_proj"), ("v_proj", "v_proj"),
                             ("output_proj", "o_proj")):
            for suffix in ("weight", "bias"):
                key = f"{s}attn.{ours}.{suffix}"
                if key in state:
                    v = state[key]
                    rope_rows = ours in ("q_proj", "k_proj")
                    out[f"{t}self_attn.{theirs}.{suffix}"] = _per_head(v, hd, perm) if rope_rows else v
        for n in ("q_norm", "k_norm"):
            if f"{s}attn.{n}.weight" in state:
                out[f"{t}self_attn.{n}.weight"] = state[f"{s}attn.{n}.weight"][perm]
        out[t + "input_layernorm.weight"] = state[s + "ln1.weight"]
        out[t + "post_attention_layernorm.weight"] = state[s + "ln2.weight"]
        if arch == "mixtral":
            out[t + "mlp.gate.weight"] = state[s + "ffn.router.weight"]
            E = mc.ffn.moe.num_experts
            out[t + "mlp.experts.gate_up_proj"] = torch.stack(
                [torch.cat([state[f"{s}ffn.experts.{e}.w1.weight"], state[f"{s}ffn.experts.{e}.w3.weight"]])
                 for e in range(E)])
            out[t + "mlp.experts.down_proj"] = torch.stack([state[f"{s}ffn.experts.{e}.w2.weight"] for e in range(E)])
        else:
            for ours, theirs in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
                for suffix in ("weight", "bias"):
                    if f"{s}ffn.{ours}.{suffix}" in state:
                        out[f"{t}mlp.{theirs}.{suffix}"] = state[f"{s}ffn.{ours}.{suffix}"]
    out["model.norm.weight"] = state["ln_final.weight"]
    out["lm_head.weight"] = state["lm_head.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def to_hf_model(model, mc, *, bos_token_id=None, eos_token_id=None, pad_token_id=None, dtype: str = "float32"):
    """The transformers model (eval mode, ``dtype``) computing what the lmrun ``model`` (a
    ``TransformerLM`` with model config ``mc``) computes. ConfigError where ``hf_architecture`` refuses."""
    import torch
    import transformers as tf

    cfg = to_hf_config(mc, bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                       dtype=dtype)
    cls = getattr(tf, HF_CLASSES[cfg.model_type])
    hf = cls(cfg)  # on the CPU: its rotary inv_freq buffer is computed at construction
    state = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}
    hf.load_state_dict(to_hf_state_dict(state, mc), strict=True)
    return hf.to(getattr(torch, dtype)).eval()


def export_hf_model(model, mc, out_dir: str | Path, *, bos_token_id=None, eos_token_id=None, pad_token_id=None,
                    dtype: str = "float32") -> Path:
    """Write ``model`` (an lmrun ``TransformerLM``, model config ``mc``) as a Hugging Face model
    folder: config.json, model.safetensors (``dtype``), generation_config.json, through
    transformers' ``save_pretrained``. Tokenizer files are the caller's (``lmrun.tokenizer.hf``).
    ConfigError where ``hf_architecture`` refuses (nothing written)."""
    hf = to_hf_model(model, mc, bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                     dtype=dtype)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(out)
    return out


# --- transformers -> lmrun ------------------------------------------------------------------------


def from_hf_config(hf_config, key: str = "model"):
    """The lmrun ``ModelConfig`` of a transformers config (Llama, Qwen2, Qwen3, Mixtral, GPT-2).
    FormatError (one line naming ``key``) for another model type or a setting lmrun does not
    compute (RoPE scaling, sliding windows, a head_dim other than hidden/heads, another activation)."""
    from lmrun.model.config import (AttentionConfig, FFNConfig, ModelConfig, NormConfig, PositionConfig)
    from lmrun.model.variants import MoEConfig

    c = hf_config
    kind = getattr(c, "model_type", None)

    def refuse(why: str):
        raise FormatError(f"{key}: a Hugging Face {kind} model with {why} has no lmrun equivalent "
                          f"(importable: {', '.join(HF_CLASSES[k] for k in IMPORTABLE)} of the standard shape)")

    if kind not in IMPORTABLE:
        raise FormatError(f"{key}: Hugging Face model_type {kind!r} cannot be converted to an lmrun TransformerLM "
                          f"(importable: {', '.join(HF_CLASSES[k] for k in IMPORTABLE)})")
    if kind == "gpt2":
        act = c.activation_function
        if act not in GPT2_IMPORT_ACTIVATIONS:
            refuse(f"activation_function={act}")
        act = GPT2_IMPORT_ACTIVATIONS[act]
        if not c.scale_attn_weights or c.scale_attn_by_inverse_layer_idx:
            refuse("non-standard attention scaling")
        d_ff = c.n_inner or 4 * c.n_embd
        return ModelConfig(name="gpt2", size="hf", vocab_size=c.vocab_size, context_length=c.n_positions,
                           d_model=c.n_embd, num_layers=c.n_layer, num_heads=c.n_head, d_ff=d_ff, bias=True,
                           tie_embeddings=bool(c.tie_word_embeddings), dropout=0.0,
                           norm=NormConfig(kind="layernorm", eps=c.layer_norm_epsilon),
                           ffn=FFNConfig(kind=act), position=PositionConfig(kind="learned"),
                           attention=AttentionConfig())
    rope = dict(getattr(c, "rope_parameters", None) or {})
    if rope.get("rope_type", "default") != "default":
        refuse(f"rope_type={rope.get('rope_type')}")
    theta = float(rope.get("rope_theta", getattr(c, "rope_theta", 10000.0)))
    hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    if hd * c.num_attention_heads != c.hidden_size:
        refuse(f"head_dim={hd} != hidden_size/num_attention_heads")
    if getattr(c, "use_sliding_window", False) or (kind == "mixtral" and c.sliding_window is not None):
        refuse(f"sliding_window={c.sliding_window}")
    acts = {v: k for k, v in GATED_ACTIVATIONS.items()}
    if c.hidden_act not in acts or (kind == "mixtral" and c.hidden_act != "silu"):
        refuse(f"hidden_act={c.hidden_act}")
    bias = kind == "qwen2" or bool(getattr(c, "attention_bias", False)) or bool(getattr(c, "mlp_bias", False))
    ffn = FFNConfig(kind=acts[c.hidden_act])
    d_ff = c.intermediate_size
    if kind == "mixtral":
        ffn = FFNConfig(kind="moe", moe=MoEConfig(num_experts=c.num_local_experts, top_k=c.num_experts_per_tok,
                                                   expert_d_ff=c.intermediate_size, renormalize=True,
                                                   aux_loss_weight=float(c.router_aux_loss_coef)))
        d_ff = c.intermediate_size * c.num_experts_per_tok
    kv = c.num_key_value_heads or c.num_attention_heads
    return ModelConfig(name=kind, size="hf", vocab_size=c.vocab_size, context_length=c.max_position_embeddings,
                       d_model=c.hidden_size, num_layers=c.num_hidden_layers, num_heads=c.num_attention_heads,
                       n_kv_heads=kv if kv != c.num_attention_heads else None, d_ff=d_ff, bias=bias,
                       tie_embeddings=bool(c.tie_word_embeddings), dropout=0.0,
                       norm=NormConfig(kind="rmsnorm", eps=float(c.rms_norm_eps)), ffn=ffn,
                       position=PositionConfig(kind="rope", theta=theta),
                       attention=AttentionConfig(qk_norm=kind == "qwen3"))


def from_hf_state_dict(hf_state: dict, mc) -> dict:
    """The inverse of ``to_hf_state_dict``: a transformers state dict -> lmrun ``TransformerLM``
    keys for the model config ``mc`` (``from_hf_config``). Biases lmrun has and the HF model lacks
    (Qwen2's o_proj and MLP, a GPT-2 export of a bias-free model) are zeros."""
    import torch

    from lmrun.model.config import as_model_config, resolved_d_ff

    mc = as_model_config(mc)
    hd = mc.d_model // mc.num_heads
    out = {}
    if mc.position.kind == "learned":
        d = mc.d_model
        out["token_embeddings.weight"] = hf_state["transformer.wte.weight"]
        out["position_embeddings.weight"] = hf_state["transformer.wpe.weight"]
        for i in range(mc.num_layers):
            s, t = f"layers.{i}.", f"transformer.h.{i}."
            for a, b in (("ln1", "ln_1"), ("ln2", "ln_2")):
                out[s + a + ".weight"], out[s + a + ".bias"] = hf_state[t + b + ".weight"], hf_state[t + b + ".bias"]
            q, k, v = hf_state[t + "attn.c_attn.weight"].T.split(d)
            qb, kb, vb = hf_state[t + "attn.c_attn.bias"].split(d)
            out.update({s + "attn.q_proj.weight": q, s + "attn.k_proj.weight": k, s + "attn.v_proj.weight": v,
                        s + "attn.q_proj.bias": qb, s + "attn.k_proj.bias": kb, s + "attn.v_proj.bias": vb})
            out[s + "attn.output_proj.weight"] = hf_state[t + "attn.c_proj.weight"].T
            out[s + "attn.output_proj.bias"] = hf_state[t + "attn.c_proj.bias"]
            out[s + "ffn.w1.weight"] = hf_state[t + "mlp.c_fc.weight"].T
            out[s + "ffn.w1.bias"] = hf_state[t + "mlp.c_fc.bias"]
            out[s + "ffn.w2.weight"] = hf_state[t + "mlp.c_proj.weight"].T
            out[s + "ffn.w2.bias"] = hf_state[t + "mlp.c_proj.bias"]
        out["ln_final.weight"] = hf_state["transformer.ln_f.weight"]
        out["ln_final.bias"] = hf_state["transformer.ln_f.bias"]
    else:
        inv = torch.argsort(rope_permutation(hd))
        out["token_embeddings.weight"] = hf_state["model.embed_tokens.weight"]
        for i in range(mc.num_layers):
            s, t = f"layers.{i}.", f"model.layers.{i}."
            for ours, theirs in (("q_proj", "q_proj"), ("k_proj", "k_proj"), ("v_proj", "v_proj"),
                                 ("output_proj", "o_proj")):
                for suffix in ("weight", "bias"):
                    key = f"{t}self_attn.{theirs}.{suffix}"
                    if key in hf_state:
                        v = hf_state[key]
                        out[f"{s}attn.{ours}.{suffix}"] = _per_head(v, hd, inv) if ours in ("q_proj", "k_proj") else v
                    elif suffix == "bias" and mc.bias:
                        rows = hf_state[f"{t}self_attn.{theirs}.weight"].shape[0]
                        out[f"{s}attn.{ours}.{suffix}"] = torch.zeros(rows)
            for n in ("q_norm", "k_norm"):
                if f"{t}self_attn.{n}.weight" in hf_state:
                    out[f"{s}attn.{n}.weight"] = hf_state[f"{t}self_attn.{n}.weight"][inv]
            out[s + "ln1.weight"] = hf_state[t + "input_layernorm.weight"]
            out[s + "ln2.weight"] = hf_state[t + "post_attention_layernorm.weight"]
            if mc.ffn.kind == "moe":
                out[s + "ffn.router.weight"] = hf_state[t + "mlp.gate.weight"]
                gate_up, down = hf_state[t + "mlp.experts.gate_up_proj"], hf_state[t + "mlp.experts.down_proj"]
                for e in range(gate_up.shape[0]):
                    w1, w3 = gate_up[e].chunk(2)
                    out.update({f"{s}ffn.experts.{e}.w1.weight": w1, f"{s}ffn.experts.{e}.w3.weight": w3,
                                f"{s}ffn.experts.{e}.w2.weight": down[e]})
            else:
                d_ff = resolved_d_ff(mc)
                for ours, theirs, n in (("w1", "gate_proj", d_ff), ("w3", "up_proj", d_ff),
                                        ("w2", "down_proj", mc.d_model)):
                    out[f"{s}ffn.{ours}.weight"] = hf_state[f"{t}mlp.{theirs}.weight"]
                    if f"{t}mlp.{theirs}.bias" in hf_state:
                        out[f"{s}ffn.{ours}.bias"] = hf_state[f"{t}mlp.{theirs}.bias"]
                    elif mc.bias:
                        out[f"{s}ffn.{ours}.bias"] = torch.zeros(n)
        out["ln_final.weight"] = hf_state["model.norm.weight"]
    out["lm_head.weight"] = hf_state.get("lm_head.weight", out["token_embeddings.weight"])
    return {k: v.contiguous() for k, v in out.items()}


def load_hf_model(path: str | Path, device="cpu", key: str = "model"):
    """A local Hugging Face folder (Llama, Qwen2, Qwen3, Mixtral or GPT-2 ``save_pretrained``
    output; never downloads) as lmrun's own ``TransformerLM`` in float32 on ``device`` ->
    ``(model in eval mode, ModelConfig)``. FormatError (one line naming ``key``) for a folder
    transformers cannot read or an architecture ``from_hf_config`` refuses."""
    import torch
    import transformers as tf

    from lmrun.model.transformer import build_model

    p = Path(path).expanduser()
    try:
        hf_config = tf.AutoConfig.from_pretrained(str(p), local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise FormatError(f"{key}={path}: cannot read its config.json ({(str(e).splitlines() or [''])[0]})") from None
    mc = from_hf_config(hf_config, key=f"{key}={path}")
    tf.utils.logging.set_verbosity_error()
    tf.utils.logging.disable_progress_bar()
    try:
        hf = tf.AutoModelForCausalLM.from_pretrained(str(p), local_files_only=True, dtype=torch.float32)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise FormatError(f"{key}={path}: cannot load its weights ({(str(e).splitlines() or [''])[0]})") from None
    state = from_hf_state_dict({k: v.detach() for k, v in hf.state_dict().items()}, mc)
    del hf
    model = build_model(mc, device="meta").to_empty(device=device)  # RoPE tables are recomputed on device
    missing = set(model.state_dict()) - set(state)
    if missing:
        raise FormatError(f"{key}={path}: weights missing for {sorted(missing)[0]} (and {len(missing) - 1} more)")
    model.load_state_dict(state, strict=True)
    return model.eval(), mc


def model_config_dict(mc) -> dict:
    """``ModelConfig`` -> the plain dict checkpoints store as ``model_config``."""
    return dataclasses.asdict(mc)
