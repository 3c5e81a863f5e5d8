"""Model shapes from a parameter count, for scaling sweeps (depth and width from N; head
dimension and vocabulary fixed).

For a pre-norm Transformer with a SwiGLU (or 4x GELU) feed-forward, one layer holds about
12·d² parameters (4·d² attention + 8·d² FFN), so the non-embedding count is N ≈ 12·L·d²
(Kaplan et al. 2020, eq. 2.1). With the aspect ratio d = aspect·L held fixed (Kaplan et al.
find loss nearly flat over a wide range of aspect ratios), L = (N / (12·aspect²))^{1/3}; d is
rounded to a multiple of the head dimension, and L to at least 1.
"""
from __future__ import annotations


def shape_for_params(target_params: float, aspect: int = 64, head_dim: int = 32) -> dict[str, int]:
    """``{d_model, num_layers, num_heads}`` with about ``target_params`` non-embedding parameters.

    ``aspect`` = d_model / num_layers; ``head_dim`` = d_model / num_heads. Raises ValueError
    for a non-positive target. The exact count of the result is ``lmrun.model.flops.count_params``.
    """
    if not target_params > 0:
        raise ValueError(f"target_params={target_params}: expected a positive number of parameters")
    layers = max(1, round((float(target_params) / (12 * aspect * aspect)) ** (1 / 3)))
    d = max(head_dim, round((float(target_params) / (12 * layers)) ** 0.5 / head_dim) * head_dim)
    return {"d_model": int(d), "num_layers": int(layers), "num_heads": int(d // head_dim)}


def shape_resolver(key: str, target_params, aspect=64, head_dim=32) -> int:
    """OmegaConf resolver ``${lmrun.shape:<key>,<target_params>[,aspect,head_dim]}`` used by the
    ``model/size=by_params`` preset."""
    return shape_for_params(float(target_params), int(aspect), int(head_dim))[key]
