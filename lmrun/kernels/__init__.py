"""Triton kernels and their pure-PyTorch references (CS336 assignment 2).

Attention: ``FlashAttentionTorch`` (FlashAttention-2 tiled in PyTorch), ``FlashAttentionTriton``
(forward and backward Triton kernels), ``flash_attention`` (multi-head/GQA entry point used by
``model.attention.impl=flash_torch|flash_triton``), ``attention_reference`` (the naive
``softmax(QKᵀ/√d)V`` with its log-sum-exp). Normalisation: ``RMSNormTriton`` /
``rms_norm_triton`` (fused forward and backward, ``model.norm.impl=triton``),
``rms_norm_reference``. Where Triton can run: ``triton_unavailable_reason``, ``require_triton``
(CUDA, or the CPU under ``TRITON_INTERPRET=1``). GPU acceptance (kernels, training step and
decoding against targets, one command, torch/triton/numpy only): ``python -m lmrun.kernels.acceptance``.

Names are imported on first use, so importing this package imports neither torch nor triton.
"""
from __future__ import annotations

from lmrun import lazy_exports

_EXPORTS = {
    "flash_attention_torch": ["FlashAttentionTorch", "flash_attention", "flash_forward_torch", "flash_backward_torch"],
    "flash_attention_triton": ["FlashAttentionTriton", "flash_forward_triton", "flash_backward_triton"],
    "reference": ["attention_reference", "rms_norm_reference"],
    "rmsnorm_triton": ["RMSNormTriton", "rms_norm_triton"],
    "runtime": ["interpreter_enabled", "require_triton", "triton_unavailable_reason"],
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
