"""The Transformer LM and its layers, written from torch tensors and matmuls (CS336 assignment 1).

Layers: ``Linear``, ``Embedding``, ``RMSNorm``, ``LayerNorm``, ``SwiGLU`` / ``GatedFFN``,
``MLP``, ``RotaryEmbedding``, ``SinusoidalPositionalEmbedding``, ``softmax``,
``scaled_dot_product_attention``, ``MultiHeadSelfAttention``, ``TransformerBlock``,
``TransformerLM``; variants ``MultiHeadLatentAttention`` (MLA), ``LinearAttention``,
``HyenaOperator``, ``MoE`` (sliding windows: ``MultiHeadSelfAttention(window=...)``). Configs: ``ModelConfig`` (+ ``NormConfig``, ``FFNConfig``,
``PositionConfig``, ``AttentionConfig``; variants ``MLAConfig``, ``LinearAttentionConfig``,
``HyenaConfig``, ``MoEConfig``), ``validate_model``, ``build_model``.
Accounting: ``lmrun.model.flops`` (``count_params``, ``forward_flops_per_token``,
``model_summary``, ``kv_cache_per_token``).

Names are imported on first use, so ``lmrun.model.config`` and ``lmrun.model.flops`` (used by
the CLI to compose, validate and plan) do not import torch.
"""
from __future__ import annotations

from lmrun import lazy_exports

_EXPORTS = {
    "attention": ["MultiHeadSelfAttention", "scaled_dot_product_attention", "softmax"],
    "config": ["AttentionConfig", "FFNConfig", "ModelConfig", "NormConfig", "PositionConfig", "as_model_config",
               "default_d_ff", "resolved_d_ff", "resolved_kv_heads", "validate_model"],
    "ffn": ["MLP", "GatedFFN", "SwiGLU", "build_ffn", "gelu", "relu", "relu2", "silu"],
    "flops": ["count_params", "forward_flops_per_token", "kv_cache_per_token", "model_summary", "training_flops"],
    "hyena": ["HyenaFilter", "HyenaOperator", "causal_conv_direct", "fft_causal_conv"],
    "layers": ["Embedding", "Linear"],
    "linear_attention": ["LinearAttention", "feature_map"],
    "mla": ["MultiHeadLatentAttention"],
    "moe": ["MoE", "load_balancing_loss", "router_z_loss"],
    "norms": ["LayerNorm", "RMSNorm", "build_norm"],
    "positions": ["RotaryEmbedding", "SinusoidalPositionalEmbedding", "sinusoidal_table"],
    "transformer": ["TransformerBlock", "TransformerLM", "build_model"],
    "variants": ["HyenaConfig", "LinearAttentionConfig", "MLAConfig", "MoEConfig", "validate_variants"],
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
