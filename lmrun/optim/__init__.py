"""Optimizers, learning-rate schedules and gradient clipping, from scratch (CS336 assignment 1
and beyond), each checked against PyTorch where PyTorch has one.

Optimizers: ``AdamW`` (Loshchilov & Hutter 2019), ``SGD`` (momentum / Nesterov), ``Muon``
(Jordan et al. 2024; Liu et al. 2025) with ``newton_schulz``, ``SOAP`` (Vyas et al. 2024).
Schedules (pure functions of the step): ``cosine_schedule``, ``wsd_schedule``,
``constant_schedule``, ``linear_schedule``. ``clip_grad_norm`` (global L2, in place).
From configs: ``OptimizerConfig``, ``ScheduleConfig``, ``validate_optimizer``,
``validate_schedule``, ``build_optimizer``, ``param_groups``, ``build_schedule``, ``set_lr``.

Typical loop::

    opt = build_optimizer(model, cfg.optimizer)
    lr_at = build_schedule(cfg.schedule, max_lr=cfg.optimizer.lr, total_steps=steps)
    for step in range(steps):
        set_lr(opt, lr_at(step))
        loss.backward(); clip_grad_norm(model.parameters(), 1.0); opt.step(); opt.zero_grad()

Names are imported on first use, so ``lmrun.optim.config`` (loaded by the CLI) and
``lmrun.optim.schedules`` do not import torch.
"""
from __future__ import annotations

from lmrun import lazy_exports

_EXPORTS = {
    "adamw": ["AdamW", "adamw_update"],
    "sgd": ["SGD"],
    "muon": ["Muon", "newton_schulz", "muon_scale"],
    "soap": ["SOAP"],
    "clip": ["clip_grad_norm"],
    "schedules": ["cosine_schedule", "wsd_schedule", "constant_schedule", "linear_schedule", "build_schedule",
                  "warmup_steps"],
    "config": ["OptimizerConfig", "ScheduleConfig", "validate_optimizer", "validate_schedule",
               "as_optimizer_config", "as_schedule_config"],
    "build": ["build_optimizer", "param_groups", "set_lr", "named_parameter_aliases"],
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
