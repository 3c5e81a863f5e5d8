"""Inference: sampling, KV caches, batched and speculative decoding, weight-only int8.

Names are imported on first use, so ``lmrun.inference.config`` (read by the CLI) does not
import torch.
"""
from __future__ import annotations

from lmrun import lazy_exports

_EXPORTS = {
    "config": ["GenerateConfig", "validate_generate"],
    "engine": ["Completion", "GenerationStats", "InferenceEngine", "SamplingParams", "greedy_accept",
               "speculative_accept"],
    "kv_cache": ["InferenceCache", "forward_cached", "supports_cache"],
    "quantize": ["Int8Linear", "quantize_int8", "quantize_weight_int8"],
    "sampling": ["sample", "sampling_probs", "top_k_filter", "top_p_filter"],
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
