"""Build an optimizer from an ``OptimizerConfig``: parameter groups by name rules, and the lr
convention the trainer uses with a schedule.

**The lr convention.** Every group built here holds ``lr_scale`` (a float) and
``param_names`` (its parameters' names). The lr of a group is always
``base_lr · group["lr_scale"]``, where ``base_lr`` is ``cfg.lr`` at build time and
``schedule(step)`` afterwards: the trainer calls ``set_lr(optimizer, schedule(step))`` before
each ``optimizer.step()``. ``lr_scale`` is 1 except for Muon's matrix groups with
``muon_lr`` set (``muon_lr / lr``).
"""
from __future__ import annotations

from fnmatch import fnmatchcase

import torch

from lmrun.optim.adamw import AdamW
from lmrun.optim.config import OptimizerConfig, as_optimizer_config, validate_optimizer
from lmrun.optim.muon import Muon
from lmrun.optim.sgd import SGD
from lmrun.optim.soap import SOAP


def named_parameter_aliases(model: torch.nn.Module) -> list[tuple[torch.nn.Parameter, list[str]]]:
    """Each trainable parameter once (in ``named_parameters`` order) with all the names it has —
    a tied matrix appears once with, e.g., ``["token_embeddings.weight", "lm_head.weight"]``."""
    names: dict[int, list[str]] = {}
    params: dict[int, torch.nn.Parameter] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if not p.requires_grad:
            continue
        params.setdefault(id(p), p)
        names.setdefault(id(p), []).append(name)
    return [(params[k], names[k]) for k in params]


def _matches(names: list[str], patterns) -> bool:
    return any(fnmatchcase(n, pat) for n in names for pat in patterns)


def param_groups(model: torch.nn.Module, cfg: OptimizerConfig) -> list[dict]:
    """The parameter groups ``build_optimizer`` passes to the optimizer (non-empty ones only, in
    a fixed order), each a dict with ``params``, ``param_names`` (first name of each),
    ``name``, ``lr_scale``, ``lr``, ``weight_decay`` and, for muon, ``use_muon``.

    ``decay`` / ``no_decay``: parameters whose names match ``cfg.no_decay`` get weight_decay 0.
    For muon, 2-D parameters not matching ``cfg.muon_adamw`` form ``muon`` (/``muon_no_decay``),
    the rest ``adamw`` / ``adamw_no_decay``. Every trainable parameter is in exactly one group.
    """
    cfg = as_optimizer_config(cfg)
    muon = cfg.name == "muon"
    muon_scale = (cfg.muon_lr / cfg.lr) if (muon and cfg.muon_lr is not None) else 1.0
    buckets: dict[str, dict] = {}
    order = ["muon", "muon_no_decay", "adamw", "adamw_no_decay"] if muon else ["decay", "no_decay"]
    for p, names in named_parameter_aliases(model):
        decay = not _matches(names, cfg.no_decay)
        if muon:
            use_muon = p.ndim == 2 and not _matches(names, cfg.muon_adamw)
            key = ("muon" if use_muon else "adamw") + ("" if decay else "_no_decay")
        else:
            key = "decay" if decay else "no_decay"
        if key not in buckets:
            scale = muon_scale if key.startswith("muon") else 1.0
            buckets[key] = {"params": [], "param_names": [], "name": key, "lr_scale": scale, "lr": cfg.lr * scale,
                                "weight_decay": cfg.weight_decay if decay else 0.0}
            if muon:
                buckets[key]["use_muon"] = key.startswith("muon")
        buckets[key]["params"].append(p)
        buckets[key]["param_names"].append(names[0])
    return [buckets[k] for k in order if k in buckets]


def build_optimizer(model: torch.nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """The optimizer ``cfg`` (an ``OptimizerConfig`` or the composed ``cfg.optimizer``) names,
    over ``model``'s trainable parameters grouped by ``param_groups``:

    - adamw: ``lmrun.optim.AdamW(betas=(beta1, beta2), eps)``;
    - muon: ``lmrun.optim.Muon`` (Muon groups: momentum, nesterov, ns_steps, ns_dtype,
      muon_scale, muon_rms; AdamW groups: betas, eps);
    - soap: ``lmrun.optim.SOAP(betas, eps, precondition_frequency, shampoo_beta, max_precond_dim)``;
    - sgd: ``lmrun.optim.SGD(momentum, nesterov)`` (weight decay as L2).

    Each group has ``lr = cfg.lr · lr_scale`` (see the module docstring for ``set_lr``).
    Raises ConfigError for an invalid config and ValueError for a model without trainable
    parameters.
    """
    cfg = as_optimizer_config(cfg)
    validate_optimizer(cfg)
    groups = param_groups(model, cfg)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    betas = (cfg.beta1, cfg.beta2)
    if cfg.name == "adamw":
        return AdamW(groups, lr=cfg.lr, betas=betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.name == "muon":
        return Muon(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, ns_steps=cfg.ns_steps,
                    ns_dtype=cfg.ns_dtype, scale=cfg.muon_scale, rms=cfg.muon_rms, weight_decay=cfg.weight_decay,
                    betas=betas, eps=cfg.eps)
    if cfg.name == "soap":
        return SOAP(groups, lr=cfg.lr, betas=betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
                    precondition_frequency=cfg.precondition_frequency, shampoo_beta=cfg.shampoo_beta,
                    max_precond_dim=cfg.max_precond_dim)
    return SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.nesterov)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's lr to ``lr · group.get("lr_scale", 1.0)`` — call with ``schedule(step)``
    before ``optimizer.step()``."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
