"""The Transformer LM and its layers, written from torch tensors and matmuls (CS336 assignment 1).

Layers: ``Linear``, ``Embedding``, ``RMSNorm``, ``LayerNorm``, ``SwiGLU`` / ``GatedFFN``,
``MLP``, ``RotaryEmbedding``, ``SinusoidalPositionalEmbedding``, ``softmax``,
``scaled_dot_product_attention``, ``MultiHeadSelfAttention``, ``TransformerBlock``,
``TransformerLM``. Configs: ``ModelConfig`` (+ ``NormConfig``, ``FFNConfig``,
``PositionConfig``, ``AttentionConfig``), ``validate_model``, ``build_model``.
Accounting: ``lmrun.model.flops`` (``count_params``, ``forward_flops_per_token``,
``model_summary``).

Names are imported on first use, so ``lmrun.model.config`` and ``lmrun.model.flops`` (used by
the CLI to compose, validate and plan) do not import torch.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "attention": ["MultiHeadSelfAttention", "scaled_dot_product_attention", "softmax"],
    "config": ["AttentionConfig", "FFNConfig", "ModelConfig", "NormConfig", "PositionConfig", "as_model_config",
               "default_d_ff", "resolved_d_ff", "resolved_kv_heads", "validate_model"],
    "ffn": ["MLP", "GatedFFN", "SwiGLU", "build_ffn", "gelu", "relu", "relu2", "silu"],
    "flops": ["count_params", "forward_flops_per_token", "model_summary", "training_flops"],
    "layers": ["Embedding", "Linear"],
    "norms": ["LayerNorm", "RMSNorm", "build_norm"],
    "positions": ["RotaryEmbedding", "SinusoidalPositionalEmbedding", "sinusoidal_table"],
    "transformer": ["TransformerBlock", "TransformerLM", "build_model"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = [name for names in _EXPORTS.values() for name in names]


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(importlib.import_module(f"lmrun.model.{_WHERE[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lmrun.model' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
