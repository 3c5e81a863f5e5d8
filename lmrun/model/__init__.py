"""The Transformer LM and its layers, written from torch tensors and matmuls (CS336 assignment 1).

Layers: ``Linear``, ``Embedding``, ``RMSNorm``, ``LayerNorm``, ``SwiGLU`` / ``GatedFFN``,
``MLP``, ``RotaryEmbedding``, ``SinusoidalPositionalEmbedding``, ``softmax``,
``scaled_dot_product_attention``, ``MultiHeadSelfAttention``, ``TransformerBlock``,
``TransformerLM``. Configs: ``ModelConfig`` (+ ``NormConfig``, ``FFNConfig``,
``PositionConfig``, ``AttentionConfig``), ``validate_model``, ``build_model``.
Accounting: ``lmrun.model.flops`` (``count_params``, ``forward_flops_per_token``,
``model_summary``).
"""
from lmrun.model.attention import (AttentionConfig, MultiHeadSelfAttention, scaled_dot_product_attention,
                                   softmax)
from lmrun.model.config import ModelConfig, as_model_config, resolved_d_ff, resolved_kv_heads, validate_model
from lmrun.model.ffn import MLP, FFNConfig, GatedFFN, SwiGLU, default_d_ff, gelu, relu, relu2, silu
from lmrun.model.flops import count_params, forward_flops_per_token, model_summary, training_flops
from lmrun.model.layers import Embedding, Linear
from lmrun.model.norms import LayerNorm, NormConfig, RMSNorm
from lmrun.model.positions import PositionConfig, RotaryEmbedding, SinusoidalPositionalEmbedding, sinusoidal_table
from lmrun.model.transformer import TransformerBlock, TransformerLM, build_model

__all__ = [
    "AttentionConfig", "Embedding", "FFNConfig", "GatedFFN", "LayerNorm", "Linear", "MLP", "ModelConfig",
    "MultiHeadSelfAttention", "NormConfig", "PositionConfig", "RMSNorm", "RotaryEmbedding",
    "SinusoidalPositionalEmbedding", "SwiGLU", "TransformerBlock", "TransformerLM", "as_model_config",
    "build_model", "count_params", "default_d_ff", "forward_flops_per_token", "gelu", "model_summary", "relu",
    "relu2", "resolved_d_ff", "resolved_kv_heads", "scaled_dot_product_attention", "silu", "sinusoidal_table",
    "softmax", "training_flops", "validate_model",
]
