"""Inference: sampling, KV caches, batched and speculative decoding, weight-only int8."""
from lmrun.inference.engine import (Completion, GenerationStats, InferenceEngine, SamplingParams,
                                    speculative_accept)
from lmrun.inference.kv_cache import InferenceCache, forward_cached, supports_cache
from lmrun.inference.sampling import sample, sampling_probs, top_k_filter, top_p_filter

__all__ = ["Completion", "GenerationStats", "InferenceCache", "InferenceEngine", "SamplingParams", "forward_cached",
           "sample", "sampling_probs", "speculative_accept", "supports_cache", "top_k_filter", "top_p_filter"]
