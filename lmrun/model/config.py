"""Config schema of the `model` group (presets in ``conf/model/``, sub-groups ``conf/model/{norm,
ffn,position,attention,size}/``) and its validation.

A preset such as ``conf/model/swiglu_rope.yaml`` picks one option per sub-group in its defaults
list, so ``model=swiglu_rope model/norm=layernorm model/position=sinusoidal`` swaps parts; the
size sub-group (``model/size=small``) sets the shape keys (``d_model``, ``num_layers``,
``num_heads``, ``d_ff``) of ``model`` itself. ``validate_model`` rejects impossible
combinations before anything is built.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from lmrun.errors import check
from lmrun.model.attention import AttentionConfig, validate_attention
from lmrun.model.ffn import FFNConfig, default_d_ff, validate_ffn
from lmrun.model.norms import NormConfig, validate_norm
from lmrun.model.positions import PositionConfig, validate_position


@dataclass
class ModelConfig:
    """A decoder-only Transformer LM (``lmrun.model.TransformerLM``).

    name: the preset's name (a label). size: the size preset's name (a label; the shape keys
        below are what counts).
    vocab_size: tokens in the vocabulary (presets: ``${tokenizer.vocab_size}``).
    context_length: the longest sequence (tokens) the model accepts; sizes the RoPE, sinusoidal
        and learned position tables.
    d_model, num_layers, num_heads: width, depth, attention heads (head dim = d_model/num_heads).
    n_kv_heads: key/value heads — null: num_heads (multi-head); 1: multi-query; else grouped-query.
    d_ff: feed-forward width; null: ``default_d_ff(d_model, ffn.kind)`` (8/3·d_model rounded to a
        multiple of 64 for gated FFNs, 4·d_model otherwise).
    bias: biases in every attention and FFN linear (GPT-2 style); the LM head never has one.
    tie_embeddings: ``lm_head.weight`` is ``token_embeddings.weight`` (one parameter).
    logit_softcap: null, or c > 0: logits become ``c·tanh(logits/c)`` (Gemma 2).
    norm, ffn, position, attention: the component configs (see their classes).
    """

    name: str = "swiglu_rope"
    size: str = "tiny"
    vocab_size: int = 4096
    context_length: int = 256
    d_model: int = 64
    num_layers: int = 2
    num_heads: int = 4
    n_kv_heads: int | None = None
    d_ff: int | None = None
    bias: bool = False
    tie_embeddings: bool = False
    logit_softcap: float | None = None
    norm: NormConfig = field(default_factory=NormConfig)
    ffn: FFNConfig = field(default_factory=FFNConfig)
    position: PositionConfig = field(default_factory=PositionConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)


def resolved_d_ff(cfg: ModelConfig) -> int:
    """``cfg.d_ff``, or the default width for ``cfg.ffn.kind`` when it is null."""
    return int(cfg.d_ff) if cfg.d_ff is not None else default_d_ff(int(cfg.d_model), cfg.ffn.kind)


def resolved_kv_heads(cfg: ModelConfig) -> int:
    """``cfg.n_kv_heads``, or ``cfg.num_heads`` when it is null."""
    return int(cfg.n_kv_heads) if cfg.n_kv_heads is not None else int(cfg.num_heads)


def validate_model(cfg: ModelConfig) -> None:
    """Raise ConfigError (one line: key, value, what is allowed) for an impossible model config.

    Checks every choice key, positive sizes, ``d_model % num_heads == 0``,
    ``num_heads % n_kv_heads == 0``, an even head dimension with RoPE, ``logit_softcap > 0``.
    Accepts a ``ModelConfig`` or the composed ``cfg.model`` node.
    """
    for key in ("vocab_size", "context_length", "d_model", "num_layers", "num_heads"):
        value = getattr(cfg, key)
        check(f"model.{key}", value, value >= 1, "an integer >= 1")
    validate_norm(cfg.norm)
    validate_ffn(cfg.ffn)
    validate_position(cfg.position)
    validate_attention(cfg.attention)
    d, h = cfg.d_model, cfg.num_heads
    check("model.num_heads", h, d % h == 0, f"a divisor of model.d_model={d}")
    if cfg.n_kv_heads is not None:
        check("model.n_kv_heads", cfg.n_kv_heads, cfg.n_kv_heads >= 1 and h % cfg.n_kv_heads == 0,
              f"null or a divisor of model.num_heads={h} (1 = multi-query)")
    if cfg.position.kind == "rope":
        check("model.num_heads", h, (d // h) % 2 == 0,
              f"a value giving an even head dimension with model.position.kind=rope "
              f"(d_model/num_heads = {d}/{h} = {d // h})")
    if cfg.d_ff is not None:
        check("model.d_ff", cfg.d_ff, cfg.d_ff >= 1, "null (the default for model.ffn.kind) or an integer >= 1")
    if cfg.logit_softcap is not None:
        check("model.logit_softcap", cfg.logit_softcap, cfg.logit_softcap > 0, "null or a number > 0")


def as_model_config(cfg) -> ModelConfig:
    """A ``ModelConfig`` from a ``ModelConfig``, the composed ``cfg.model`` node (OmegaConf) or a
    plain dict; unknown keys and wrong types raise OmegaConf's errors."""
    if isinstance(cfg, ModelConfig):
        return cfg
    from omegaconf import OmegaConf

    merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), cfg)
    return OmegaConf.to_object(merged)
