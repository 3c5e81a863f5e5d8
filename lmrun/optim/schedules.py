"""Learning-rate schedules: pure functions of the step (no state, no torch).

Every schedule takes ``it``, the number of optimizer steps already taken (0 for the first
step), and returns the learning rate for that step. Warmup is linear from 0 and follows CS336
assignment 1: ``it / warmup_iters · max_lr`` for ``it < warmup_iters`` (so the first step has
lr 0 when there is warmup), and ``max_lr`` at ``it = warmup_iters``.

``build_schedule(cfg, max_lr, total_steps)`` turns a ``ScheduleConfig`` into a function of the
step; the trainer calls ``set_lr(optimizer, schedule(step))`` before each step.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable

from lmrun.errors import ConfigError


def _warmup(it: int, max_lr: float, warmup_iters: int) -> float:
    return it / warmup_iters * max_lr


def cosine_schedule(it: int, max_lr: float, min_lr: float, warmup_iters: int, cosine_cycle_iters: int) -> float:
    """Linear warmup, cosine annealing to ``min_lr``, then constant (CS336 assignment 1,
    ``get_lr_cosine_schedule``; Loshchilov & Hutter 2017 SGDR without restarts).

    ``it < warmup_iters``: ``it/warmup_iters · max_lr``; ``warmup_iters <= it <= cosine_cycle_iters``:
    ``min_lr + ½(1 + cos(π·(it - warmup_iters)/(cosine_cycle_iters - warmup_iters)))·(max_lr - min_lr)``;
    after: ``min_lr``. If ``cosine_cycle_iters <= warmup_iters`` there is no cosine part (``min_lr``
    from ``warmup_iters`` on). Units: steps and the lr's units.
    """
    if it < warmup_iters:
        return _warmup(it, max_lr, warmup_iters)
    if it > cosine_cycle_iters or cosine_cycle_iters <= warmup_iters:
        return min_lr
    progress = (it - warmup_iters) / (cosine_cycle_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)


def _decay(progress: float, max_lr: float, min_lr: float, shape: str) -> float:
    if shape == "linear":
        factor = 1.0 - progress
    elif shape == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif shape == "sqrt":
        factor = 1.0 - math.sqrt(progress)
    else:
        raise ValueError(f"decay_shape {shape!r}: expected linear, cosine or sqrt")
    return min_lr + factor * (max_lr - min_lr)


def wsd_schedule(it: int, max_lr: float, min_lr: float, warmup_iters: int, total_iters: int,
                 decay_fraction: float, decay_shape: str = "linear") -> float:
    """Warmup–stable–decay (Hu et al. 2024, MiniCPM; Hägele et al. 2024, "Scaling laws and
    compute-optimal training beyond fixed training durations").

    With ``decay_iters = round(decay_fraction · total_iters)`` and ``decay_start = total_iters -
    decay_iters``: linear warmup for ``it < warmup_iters``; ``max_lr`` for ``it < decay_start``;
    then from ``max_lr`` at ``decay_start`` to ``min_lr`` at ``total_iters`` with shape
    ``linear`` (``1 - p``), ``cosine`` (``½(1 + cos πp)``) or ``sqrt`` (``1 - √p``), where
    ``p = (it - decay_start)/decay_iters``; ``min_lr`` after ``total_iters``.
    Raises ValueError if warmup and decay do not fit (``warmup_iters > decay_start``), or for an
    unknown shape or a decay_fraction outside [0, 1].
    """
    if not 0 <= decay_fraction <= 1:
        raise ValueError(f"decay_fraction {decay_fraction}: expected a number in [0, 1]")
    if decay_shape not in ("linear", "cosine", "sqrt"):
        raise ValueError(f"decay_shape {decay_shape!r}: expected linear, cosine or sqrt")
    decay_iters = round(decay_fraction * total_iters)
    decay_start = total_iters - decay_iters
    if warmup_iters > decay_start:
        raise ValueError(f"warmup_iters={warmup_iters} overlaps the decay, which starts at step {decay_start} "
                         f"(total_iters={total_iters}, decay_fraction={decay_fraction})")
    if it < warmup_iters:
        return _warmup(it, max_lr, warmup_iters)
    if it < decay_start:
        return max_lr
    if it >= total_iters:
        return min_lr
    return _decay((it - decay_start) / decay_iters, max_lr, min_lr, decay_shape)


def constant_schedule(it: int, max_lr: float, warmup_iters: int = 0) -> float:
    """Linear warmup (CS336 convention), then ``max_lr`` for ever."""
    if it < warmup_iters:
        return _warmup(it, max_lr, warmup_iters)
    return max_lr


def linear_schedule(it: int, max_lr: float, min_lr: float, warmup_iters: int, total_iters: int) -> float:
    """Linear warmup, then linear from ``max_lr`` at ``warmup_iters`` to ``min_lr`` at
    ``total_iters``, then ``min_lr`` (``min_lr`` from ``warmup_iters`` on if
    ``total_iters <= warmup_iters``)."""
    if it < warmup_iters:
        return _warmup(it, max_lr, warmup_iters)
    if it >= total_iters or total_iters <= warmup_iters:
        return min_lr
    return _decay((it - warmup_iters) / (total_iters - warmup_iters), max_lr, min_lr, "linear")


def warmup_steps(cfg, total_steps: int) -> int:
    """The warmup length in steps: ``cfg.warmup_steps``, or ``round(warmup_fraction·total_steps)``."""
    if cfg.warmup_steps is not None:
        return int(cfg.warmup_steps)
    return round(cfg.warmup_fraction * total_steps)


def build_schedule(cfg, max_lr: float, total_steps: int) -> Callable[[int], float]:
    """The lr schedule a ``ScheduleConfig`` (or the composed ``cfg.schedule``) describes, for a
    run of ``total_steps`` optimizer steps peaking at ``max_lr`` (``cfg.optimizer.lr``).

    Returns a picklable function ``step -> lr`` (a ``functools.partial`` of the schedule above,
    whose repr shows every argument). cosine's cycle ends at ``total_steps``; ``min_lr =
    min_lr_ratio·max_lr``. Raises ConfigError if ``total_steps < 1``, or warmup (plus wsd's
    decay) is longer than the run.
    """
    from lmrun.optim.config import as_schedule_config, validate_schedule

    cfg = as_schedule_config(cfg)
    validate_schedule(cfg)
    if total_steps < 1:
        raise ConfigError(f"total_steps={total_steps!r}: expected an integer >= 1")
    warmup = warmup_steps(cfg, total_steps)
    if warmup > total_steps:
        raise ConfigError(f"schedule.warmup_steps={warmup}: expected at most the run's {total_steps} steps")
    min_lr = cfg.min_lr_ratio * max_lr
    if cfg.name == "cosine":
        return functools.partial(cosine_schedule, max_lr=max_lr, min_lr=min_lr, warmup_iters=warmup,
                                 cosine_cycle_iters=total_steps)
    if cfg.name == "wsd":
        decay_start = total_steps - round(cfg.decay_fraction * total_steps)
        if warmup > decay_start:
            raise ConfigError(f"schedule.decay_fraction={cfg.decay_fraction}: warmup ({warmup} steps) and decay "
                              f"({total_steps - decay_start} steps) must fit in the run's {total_steps} steps")
        return functools.partial(wsd_schedule, max_lr=max_lr, min_lr=min_lr, warmup_iters=warmup,
                                 total_iters=total_steps, decay_fraction=cfg.decay_fraction,
                                 decay_shape=cfg.decay_shape)
    if cfg.name == "linear":
        return functools.partial(linear_schedule, max_lr=max_lr, min_lr=min_lr, warmup_iters=warmup,
                                 total_iters=total_steps)
    return functools.partial(constant_schedule, max_lr=max_lr, warmup_iters=warmup)
