"""Training: token data loading, loss, checkpoints, evaluation, gradient noise scale (CS336
assignment 1), and the training loop.

Loss (``loss``): ``cross_entropy``, ``cross_entropy_with_z``, ``z_loss``, ``logsumexp``.
Data (``data``): ``load_tokens``, ``get_batch``, ``MixtureSampler``, ``BatchStream``,
``windows_to_tensors``. Checkpoints (``checkpoint``): ``save_checkpoint``, ``load_checkpoint``,
``read_checkpoint``, ``CheckpointManager``, ``rng_state``, ``set_rng_state``, ``unwrap_model``;
reading one back (``loading``): ``resolve_checkpoint``, ``checkpoint_facts``,
``checkpoint_tokenizer_files``, ``load_model``.
Evaluation (``evaluation``): ``evaluate_loss``, ``bits_per_byte``. Noise scale
(``noise_scale``): ``GradientNoiseScale``, ``grad_sq_norm``, ``noise_scale_estimates``.

Names are imported on first use (as in ``lmrun.model``), so importing ``lmrun.train`` is cheap.
"""
from __future__ import annotations

from lmrun import lazy_exports

_EXPORTS = {
    "checkpoint": ["CheckpointManager", "load_checkpoint", "read_checkpoint", "rng_state", "save_checkpoint",
                   "set_rng_state", "unwrap_model"],
    "data": ["BatchStream", "MixtureSampler", "get_batch", "load_tokens", "windows_to_tensors"],
    "evaluation": ["bits_per_byte", "evaluate_loss"],
    "loading": ["checkpoint_facts", "checkpoint_tokenizer_files", "load_model", "resolve_checkpoint"],
    "loss": ["cross_entropy", "cross_entropy_with_z", "logsumexp", "z_loss"],
    "noise_scale": ["GradientNoiseScale", "grad_sq_norm", "noise_scale_estimates"],
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
