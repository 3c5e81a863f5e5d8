"""Config schema of the `model` group and its validation (no torch import: the CLI loads this to
compose and validate, and ``lmrun.model.flops`` counts from it without building a model).

Presets live in ``conf/model/``; each picks one option per sub-group in its defaults list —
``conf/model/{norm,ffn,position,attention}/`` fill ``model.norm``, ``model.ffn``,
``model.position``, ``model.attention``, and ``conf/model/size/`` sets the shape keys
(``d_model``, ``num_layers``, ``num_heads``, ``d_ff``) of ``model`` itself — so
``model=swiglu_rope model/norm=layernorm model/position=sinusoidal model/size=small`` swaps
parts. ``validate_model`` rejects impossible combinations before anything is built.
The layer modules (``norms``, ``ffn``, ``positions``, ``attention``) re-export their configs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from lmrun.errors import check, check_choice
from lmrun.model.variants import HyenaConfig, LinearAttentionConfig, MLAConfig, MoEConfig, validate_variants

NORM_KINDS = ["rmsnorm", "layernorm", "none"]
NORM_IMPLS = ["torch", "triton"]
NORM_PLACEMENTS = ["pre", "post", "none"]
GATED = {"swiglu": "silu", "geglu": "gelu"}  # gated FFN kind -> its activation
UNGATED = ["gelu", "relu", "silu", "relu2", "gelu_tanh"]
FFN_KINDS = list(GATED) + UNGATED + ["moe"]  # moe: SwiGLU experts (lmrun.model.variants.MoEConfig)
POSITION_KINDS = ["rope", "sinusoidal", "learned", "none"]
ATTENTION_IMPLS = ["naive", "sdpa", "flash_torch", "flash_triton"]


@dataclass
class NormConfig:
    """``model.norm`` (sub-group ``conf/model/norm/``; ``lmrun.model.norms``).

    kind: rmsnorm | layernorm | none (none: no norm anywhere, no parameters).
    eps: added to the variance / mean square before the square root.
    placement: where a block's two norms sit — ``pre``: ``x + f(norm(x))`` (GPT-2, Llama);
        ``post``: ``norm(x + f(x))`` (Vaswani et al. 2017); ``none``: no norm inside blocks.
    final: apply ``ln_final`` after the last block (ignored when kind is none).
    impl: torch (tensor expressions) | triton (``lmrun.kernels.RMSNormTriton``, fused forward and
        backward kernels; kind rmsnorm only; CUDA, or the CPU under ``TRITON_INTERPRET=1``).
    """

    kind: str = "rmsnorm"
    eps: float = 1e-5
    placement: str = "pre"
    final: bool = True
    impl: str = "torch"


@dataclass
class FFNConfig:
    """``model.ffn`` (sub-group ``conf/model/ffn/``; ``lmrun.model.ffn``).

    kind: swiglu | geglu (gated: three matrices w1, w2, w3) or gelu | relu | silu | relu2 |
        gelu_tanh (ungated MLP: two matrices w1, w2; gelu_tanh: GPT-2's tanh approximation) or moe (a mixture of SwiGLU experts, see ``moe``).
        The width is ``model.d_ff`` (null: ``default_d_ff``; moe: experts of ``moe.expert_d_ff``).
    moe: the mixture-of-experts settings (``lmrun.model.variants.MoEConfig``), used with kind=moe.
    """

    kind: str = "swiglu"
    moe: MoEConfig = field(default_factory=MoEConfig)


@dataclass
class PositionConfig:
    """``model.position`` (sub-group ``conf/model/position/``; ``lmrun.model.positions``).

    kind: rope (rotates q and k in every layer) | sinusoidal (fixed table added to the token
        embeddings) | learned (``position_embeddings.weight (context_length, d_model)`` added
        to the token embeddings) | none (NoPE).
    theta: the base of the frequencies, for rope and sinusoidal (10000 in both papers).
    """

    kind: str = "rope"
    theta: float = 10000.0


@dataclass
class AttentionConfig:
    """``model.attention`` (sub-group ``conf/model/attention/``; ``lmrun.model.attention``).

    impl: naive (``lmrun.model.scaled_dot_product_attention``: explicit scores, mask and
        softmax) | sdpa (``torch.nn.functional.scaled_dot_product_attention``, fused kernels
        where the device has them) | flash_torch (``lmrun.kernels.FlashAttentionTorch``:
        FlashAttention-2 tiled in PyTorch, Dao 2023) | flash_triton (``lmrun.kernels.
        FlashAttentionTriton``: Triton forward and backward kernels; CUDA, or the CPU under
        ``TRITON_INTERPRET=1``). All compute the same function.
    qk_norm: RMSNorm over the head dimension of q and k before RoPE (adds
        ``attn.q_norm.weight`` and ``attn.k_norm.weight``, each ``(head_dim,)``).
    The number of key/value heads is ``model.n_kv_heads``.

    Variants (``lmrun.model.variants``): kind — mha (softmax attention) | mla | linear | hyena;
    window — null, or w: token i attends to tokens i-w+1..i (sliding window, kind mha);
    global_every — with a window, 0: every layer local; k: every k-th layer full causal;
    mla, linear, hyena — the settings of those kinds. ``impl`` applies to kinds mha and mla.
    """

    impl: str = "sdpa"
    qk_norm: bool = False
    kind: str = "mha"
    window: int | None = None
    global_every: int = 0
    mla: MLAConfig = field(default_factory=MLAConfig)
    linear: LinearAttentionConfig = field(default_factory=LinearAttentionConfig)
    hyena: HyenaConfig = field(default_factory=HyenaConfig)


@dataclass
class ModelConfig:
    """A decoder-only Transformer LM (``lmrun.model.TransformerLM``), the `model` group.

    name: the preset's name (a label). size: the size preset's name (a label; the shape keys
        below are what counts).
    vocab_size: tokens in the vocabulary (presets: ``${tokenizer.vocab_size}``).
    context_length: the longest sequence (tokens) the model accepts; sizes the RoPE, sinusoidal
        and learned position tables.
    d_model, num_layers, num_heads: width, depth, attention heads (head dim = d_model/num_heads).
    n_kv_heads: key/value heads — null: num_heads (multi-head); 1: multi-query; else grouped-query.
    d_ff: feed-forward width; null: ``default_d_ff(d_model, ffn.kind)``.
    bias: biases in every attention and FFN linear (GPT-2 style); the LM head never has one.
    tie_embeddings: ``lm_head.weight`` is ``token_embeddings.weight`` (one parameter).
    logit_softcap: null, or c > 0: logits become ``c·tanh(logits/c)`` (Gemma 2).
    dropout: probability for embedding and residual dropout (0 disables; training mode only).
    target_params: the non-embedding parameter count the ``by_params`` size preset derives the
        shape from (lmrun.scaling.shapes); a label otherwise.
    shape_aspect, shape_head_dim: the ``by_params`` shape rule's d_model / num_layers and head
        dimension (d_model is a multiple of it: 16 gives finer steps between small models).
    norm, ffn, position, attention: the component configs (see their classes).
    init_from: null, or a local Hugging Face model folder (Llama, Qwen2, Qwen3, Mixtral, GPT-2;
        ``lmrun.model.hf``) whose weights ``stage=pretrain`` starts from: the architecture and
        shape keys above are taken from the folder (``context_length`` at most the folder's), and
        its tokenizer is used unless ``tokenizer.path`` is set (``lmrun.train.loading.apply_init_from``).
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
    dropout: float = 0.0
    target_params: float | None = None
    shape_aspect: int = 64
    shape_head_dim: int = 32
    norm: NormConfig = field(default_factory=NormConfig)
    ffn: FFNConfig = field(default_factory=FFNConfig)
    position: PositionConfig = field(default_factory=PositionConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    init_from: str | None = None


def is_gated(kind: str) -> bool:
    """True for the gated FFN kinds (three weight matrices)."""
    return kind in GATED


def default_d_ff(d_model: int, kind: str) -> int:
    """The FFN width when ``d_ff`` is null: for gated kinds ``8/3·d_model`` rounded to the nearest
    multiple of 64 (at least 64; CS336: 512 -> 1344), else ``4·d_model``. The two have about the
    same parameter count (3·d·8d/3 = 2·d·4d): the CS336 SwiGLU-vs-SiLU ablation's matching."""
    if is_gated(kind) or kind == "moe":  # moe: SwiGLU experts
        return max(64, math.floor(8 * d_model / 3 / 64 + 0.5) * 64)
    return 4 * d_model


def norm_params(kind: str, d_model: int) -> int:
    """Parameters of one norm layer: d (RMSNorm), 2d (LayerNorm), 0 (none)."""
    return {"rmsnorm": d_model, "layernorm": 2 * d_model, "none": 0}[kind]


def resolved_d_ff(cfg: ModelConfig) -> int:
    """``cfg.d_ff``, or the default width for ``cfg.ffn.kind`` when it is null."""
    return int(cfg.d_ff) if cfg.d_ff is not None else default_d_ff(int(cfg.d_model), cfg.ffn.kind)


def resolved_kv_heads(cfg: ModelConfig) -> int:
    """``cfg.n_kv_heads``, or ``cfg.num_heads`` when it is null."""
    return int(cfg.n_kv_heads) if cfg.n_kv_heads is not None else int(cfg.num_heads)


def validate_norm(cfg: NormConfig, prefix: str = "model.norm") -> None:
    check_choice(f"{prefix}.kind", cfg.kind, NORM_KINDS)
    check_choice(f"{prefix}.placement", cfg.placement, NORM_PLACEMENTS)
    check(f"{prefix}.eps", cfg.eps, cfg.eps > 0, "a number > 0")
    check_choice(f"{prefix}.impl", cfg.impl, NORM_IMPLS)
    check(f"{prefix}.impl", cfg.impl, cfg.impl == "torch" or cfg.kind == "rmsnorm",
          f"torch with {prefix}.kind={cfg.kind} (the Triton kernel is RMSNorm's)")


def validate_ffn(cfg: FFNConfig, prefix: str = "model.ffn") -> None:
    check_choice(f"{prefix}.kind", cfg.kind, FFN_KINDS)


def validate_position(cfg: PositionConfig, prefix: str = "model.position") -> None:
    check_choice(f"{prefix}.kind", cfg.kind, POSITION_KINDS)
    check(f"{prefix}.theta", cfg.theta, cfg.theta > 0, "a number > 0")


def validate_attention(cfg: AttentionConfig, prefix: str = "model.attention") -> None:
    check_choice(f"{prefix}.impl", cfg.impl, ATTENTION_IMPLS)


def validate_model(cfg: ModelConfig) -> None:
    """Raise ConfigError (one line: key, value, what is allowed) for an impossible model config.

    Checks every choice key, positive sizes, ``d_model % num_heads == 0``,
    ``num_heads % n_kv_heads == 0``, an even head dimension with RoPE, ``d_ff >= 1``,
    ``logit_softcap > 0``, and that Triton kernels can run here when an impl asks for them (a CUDA
    GPU, or ``TRITON_INTERPRET=1``). Accepts a ``ModelConfig`` or the composed ``cfg.model`` node.
    """
    for key in ("vocab_size", "context_length", "d_model", "num_layers", "num_heads", "shape_aspect", "shape_head_dim"):
        value = getattr(cfg, key)
        check(f"model.{key}", value, value >= 1, "an integer >= 1")
    validate_norm(cfg.norm)
    validate_ffn(cfg.ffn)
    validate_position(cfg.position)
    validate_attention(cfg.attention)
    if cfg.attention.impl == "flash_triton" or cfg.norm.impl == "triton":
        from lmrun.kernels.runtime import require_triton  # imports torch only to look for a GPU

        require_triton("model.attention.impl=flash_triton" if cfg.attention.impl == "flash_triton"
                       else "model.norm.impl=triton")
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
    check("model.dropout", cfg.dropout, 0.0 <= cfg.dropout < 1.0, "a probability in [0, 1)")
    if cfg.logit_softcap is not None:
        check("model.logit_softcap", cfg.logit_softcap, cfg.logit_softcap > 0, "null or a number > 0")
    validate_variants(cfg)


def as_model_config(cfg) -> ModelConfig:
    """A ``ModelConfig`` from a ``ModelConfig``, the composed ``cfg.model`` node (OmegaConf) or a
    plain dict; unknown keys and wrong types raise OmegaConf's errors."""
    if isinstance(cfg, ModelConfig):
        return cfg
    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg, DictConfig):  # resolve interpolations (``${tokenizer.vocab_size}``) against its root
        cfg = OmegaConf.to_container(cfg, resolve=True)
    merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), cfg)
    return OmegaConf.to_object(merged)
