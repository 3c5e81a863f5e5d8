"""Evaluation: perplexity and bits per byte of checkpoints (task evaluations come with alignment)."""
