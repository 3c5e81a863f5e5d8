"""Config schemas of the `optimizer` and `schedule` groups and their validation (no torch import:
the CLI loads this to compose and validate).

Presets live in ``conf/optimizer/`` (adamw, muon, soap, sgd) and ``conf/schedule/`` (cosine, wsd,
constant, linear). ``lmrun.optim.build_optimizer(model, cfg.optimizer)`` and
``lmrun.optim.build_schedule(cfg.schedule, max_lr=cfg.optimizer.lr, total_steps=...)`` turn them
into objects; ``validate_optimizer`` / ``validate_schedule`` reject bad values first, with one
line naming the key, the value and what is allowed.

Parameter-group rules are ``fnmatch`` globs matched against the names
``model.named_parameters(remove_duplicate=False)`` gives (``*`` also matches dots, so ``*.bias``
matches ``layers.0.attn.q_proj.bias``). A parameter shared under several names (tied
embeddings: ``token_embeddings.weight`` is ``lm_head.weight``) matches a rule when any of its
names does, and always sits in exactly one group.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from lmrun.errors import check, check_choice

OPTIMIZER_NAMES = ["adamw", "muon", "soap", "sgd"]
SCHEDULE_NAMES = ["cosine", "wsd", "constant", "linear"]
DECAY_SHAPES = ["linear", "cosine", "sqrt"]
NS_DTYPES = ["bfloat16", "float32"]
MUON_SCALES = ["rms", "spectral"]

# Norm gains, biases and embeddings are not weight-decayed (the usual LM practice, e.g. OLMo).
DEFAULT_NO_DECAY = ["*.bias", "*ln1.*", "*ln2.*", "ln_final.*", "*norm.*", "token_embeddings.*",
                    "position_embeddings.*"]
# Muon orthogonalizes hidden 2-D matrices only; these (and every non-2-D parameter) get AdamW.
DEFAULT_MUON_ADAMW = ["token_embeddings.*", "position_embeddings.*", "lm_head.*", "*.bias", "*ln1.*",
                      "*ln2.*", "ln_final.*", "*norm.*"]


@dataclass
class OptimizerConfig:
    """The `optimizer` group (``lmrun.optim.build_optimizer``).

    name: adamw (Loshchilov & Hutter 2019) | muon (Jordan et al. 2024: orthogonalized momentum
        for hidden matrices, AdamW for the rest) | soap (Vyas et al. 2024: Adam in Shampoo's
        eigenbasis) | sgd (with momentum; a baseline).
    lr: the peak learning rate (the schedule's ``max_lr``); every parameter group's lr is
        ``schedule(step) * group["lr_scale"]`` (see ``lmrun.optim.set_lr``).
    beta1, beta2: Adam's moment decay rates (adamw, soap, and muon's AdamW groups).
    eps: Adam's denominator term. weight_decay: decoupled (adamw, muon, soap: ``p -= lr·wd·p``)
        or L2 added to the gradient (sgd, as ``torch.optim.SGD``); groups matching ``no_decay``
        get 0.
    momentum, nesterov: sgd's heavy-ball momentum and muon's momentum (Muon: 0.95, nesterov).
    muon_lr: the lr of the Muon (matrix) groups; null: ``lr``. Their ``lr_scale`` is
        ``muon_lr / lr``, so they follow the same schedule.
    ns_steps, ns_dtype: Newton–Schulz iterations and their dtype (bfloat16 | float32).
    muon_scale: rms — multiply the orthogonalized update by ``muon_rms·sqrt(max(m, n))`` so its
        RMS is ``muon_rms`` (≈ AdamW's; Liu et al. 2025, "Muon is scalable for LLM training"),
        which lets Muon share AdamW's lr and weight decay; spectral — ``sqrt(max(1, m/n))`` for a
        ``(m, n) = (d_out, d_in)`` matrix (Jordan et al. 2024; wants lr ≈ 0.02).
    muon_rms: the target update RMS for ``muon_scale=rms`` (0.2 in Liu et al. 2025).
    precondition_frequency: SOAP refreshes its eigenbasis every this many steps.
    shampoo_beta: SOAP's decay of the Shampoo statistics ``GGᵀ``, ``GᵀG``; null: ``beta2``.
    max_precond_dim: SOAP leaves a dimension larger than this unrotated (e.g. the vocabulary).
    no_decay: globs of parameter names that get weight_decay 0.
    muon_adamw: globs of parameter names the muon optimizer updates with AdamW instead of Muon
        (every parameter that is not 2-D goes to AdamW too).
    """

    name: str = "adamw"
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    muon_lr: float | None = None
    ns_steps: int = 5
    ns_dtype: str = "bfloat16"
    muon_scale: str = "rms"
    muon_rms: float = 0.2
    precondition_frequency: int = 10
    shampoo_beta: float | None = None
    max_precond_dim: int = 10000
    no_decay: list[str] = field(default_factory=lambda: list(DEFAULT_NO_DECAY))
    muon_adamw: list[str] = field(default_factory=lambda: list(DEFAULT_MUON_ADAMW))


@dataclass
class ScheduleConfig:
    """The `schedule` group (``lmrun.optim.build_schedule``): the lr as a function of the step.

    name: cosine (linear warmup, cosine to ``min_lr`` at the last step; CS336 assignment 1) |
        wsd (warmup–stable–decay: warmup, constant ``max_lr``, then a decay to ``min_lr`` over the
        last ``decay_fraction`` of the steps; Hu et al. 2024 MiniCPM, Hägele et al. 2024) |
        constant (warmup, then ``max_lr``) | linear (warmup, then linear to ``min_lr``).
    warmup_steps: optimizer steps of linear warmup from 0; null: ``warmup_fraction·total_steps``.
    warmup_fraction: warmup as a fraction of the run's steps, used when warmup_steps is null.
    min_lr_ratio: ``min_lr = min_lr_ratio·max_lr`` (cosine, wsd, linear; constant ignores it).
    decay_fraction, decay_shape: wsd's cooldown length (fraction of all steps) and shape —
        linear | cosine | sqrt (``1 - sqrt(progress)``, Hägele et al. 2024).
    """

    name: str = "cosine"
    warmup_steps: int | None = None
    warmup_fraction: float = 0.02
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2
    decay_shape: str = "linear"


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def validate_optimizer(cfg: OptimizerConfig, prefix: str = "optimizer") -> None:
    """Raise ConfigError (one line: key, value, what is allowed) for a bad optimizer config.

    Checks the name and dtype/scale choices, ``lr > 0``, betas and momentum in [0, 1), ``eps``
    and ``weight_decay >= 0``, nesterov only with momentum > 0, ``muon_lr`` null or > 0,
    ``ns_steps >= 1``, ``muon_rms > 0``, ``precondition_frequency >= 1``, ``shampoo_beta`` null
    or in [0, 1), ``max_precond_dim >= 1``. Accepts an ``OptimizerConfig`` or the composed node.
    """
    check_choice(f"{prefix}.name", cfg.name, OPTIMIZER_NAMES)
    check(f"{prefix}.lr", cfg.lr, _finite(cfg.lr) and cfg.lr > 0, "a number > 0")
    for key in ("beta1", "beta2", "momentum"):
        v = getattr(cfg, key)
        check(f"{prefix}.{key}", v, _finite(v) and 0 <= v < 1, "a number in [0, 1)")
    for key in ("eps", "weight_decay"):
        v = getattr(cfg, key)
        check(f"{prefix}.{key}", v, _finite(v) and v >= 0, "a number >= 0")
    if cfg.name in ("sgd", "muon") and cfg.nesterov:
        check(f"{prefix}.nesterov", cfg.nesterov, cfg.momentum > 0,
              f"false when {prefix}.momentum=0 (Nesterov needs momentum)")
    if cfg.muon_lr is not None:
        check(f"{prefix}.muon_lr", cfg.muon_lr, _finite(cfg.muon_lr) and cfg.muon_lr > 0, "null (= lr) or a number > 0")
    check(f"{prefix}.ns_steps", cfg.ns_steps, cfg.ns_steps >= 1, "an integer >= 1")
    check_choice(f"{prefix}.ns_dtype", cfg.ns_dtype, NS_DTYPES)
    check_choice(f"{prefix}.muon_scale", cfg.muon_scale, MUON_SCALES)
    check(f"{prefix}.muon_rms", cfg.muon_rms, _finite(cfg.muon_rms) and cfg.muon_rms > 0, "a number > 0")
    check(f"{prefix}.precondition_frequency", cfg.precondition_frequency, cfg.precondition_frequency >= 1,
          "an integer >= 1")
    if cfg.shampoo_beta is not None:
        check(f"{prefix}.shampoo_beta", cfg.shampoo_beta, _finite(cfg.shampoo_beta) and 0 <= cfg.shampoo_beta < 1,
              "null (= beta2) or a number in [0, 1)")
    check(f"{prefix}.max_precond_dim", cfg.max_precond_dim, cfg.max_precond_dim >= 1, "an integer >= 1")


def validate_schedule(cfg: ScheduleConfig, prefix: str = "schedule") -> None:
    """Raise ConfigError (one line) for a bad schedule config: the name and decay shape, warmup
    steps null or >= 0, fractions and ``min_lr_ratio`` in [0, 1], and for wsd with a fractional
    warmup ``warmup_fraction + decay_fraction <= 1``. Checks that need the run's length
    (``warmup_steps`` against it) happen in ``build_schedule``."""
    check_choice(f"{prefix}.name", cfg.name, SCHEDULE_NAMES)
    if cfg.warmup_steps is not None:
        check(f"{prefix}.warmup_steps", cfg.warmup_steps, cfg.warmup_steps >= 0,
              "null (use warmup_fraction) or an integer >= 0")
    for key in ("warmup_fraction", "min_lr_ratio", "decay_fraction"):
        v = getattr(cfg, key)
        check(f"{prefix}.{key}", v, _finite(v) and 0 <= v <= 1, "a number in [0, 1]")
    check_choice(f"{prefix}.decay_shape", cfg.decay_shape, DECAY_SHAPES)
    if cfg.name == "wsd" and cfg.warmup_steps is None:
        total = cfg.warmup_fraction + cfg.decay_fraction
        check(f"{prefix}.decay_fraction", cfg.decay_fraction, total <= 1 + 1e-12,
              f"a number <= 1 - {prefix}.warmup_fraction={cfg.warmup_fraction} (warmup and decay must fit in the run)")


def _as(cls, cfg):
    if isinstance(cfg, cls):
        return cfg
    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), cfg))


def as_optimizer_config(cfg) -> OptimizerConfig:
    """An ``OptimizerConfig`` from itself, the composed ``cfg.optimizer`` node or a plain dict;
    unknown keys and wrong types raise OmegaConf's errors."""
    return _as(OptimizerConfig, cfg)


def as_schedule_config(cfg) -> ScheduleConfig:
    """A ``ScheduleConfig`` from itself, the composed ``cfg.schedule`` node or a plain dict."""
    return _as(ScheduleConfig, cfg)
