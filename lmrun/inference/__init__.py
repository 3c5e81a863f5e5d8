"""Inference: sampling from a TransformerLM (KV cache, batched and speculative decoding come later)."""
from lmrun.inference.sampling import sample, top_p_filter

__all__ = ["sample", "top_p_filter"]
