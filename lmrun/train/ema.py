"""Exponential moving average of the model's parameters (Polyak & Juditsky 1992; the EMA of
timm's ``ModelEmaV2`` and of Kaddour et al. 2022, "Stop wasting my time! Saving days of
ImageNet and BERT training with latest weight averaging").

``ParameterEMA(model, decay)`` keeps a shadow copy of every trainable parameter; after each
optimizer step ``update()`` sets ``shadow ← d·shadow + (1-d)·param`` with the warmed-up decay
``d = min(decay, (1 + n)/(10 + n))`` at the n-th update (so early averages are not dominated by
the random initialization). ``with ema.applied(): ...`` evaluates with the averaged weights
and restores the training weights afterwards. Used by the trainer with ``train.ema_decay``.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


class ParameterEMA:
    """Shadow parameters of ``model`` (its trainable ones, in ``named_parameters`` order).

    decay: in [0, 1); 0.99 averages over roughly the last 100 steps. Raises ValueError outside.
    state_dict() -> {"decay", "num_updates", "shadow": {name: tensor}}; load_state_dict checks
    the names and shapes (ValueError on a mismatch)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay {decay}: expected a number in [0, 1)")
        self.decay = float(decay)
        self.num_updates = 0
        self._named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in self._named]
        self.shadow = [p.detach().clone() for p in self.params]

    def current_decay(self) -> float:
        n = self.num_updates
        return min(self.decay, (1.0 + n) / (10.0 + n))

    @torch.no_grad()
    def update(self) -> None:
        """Fold the current parameters into the average (call after ``optimizer.step()``)."""
        weight = 1.0 - self.current_decay()
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], weight)
        self.num_updates += 1

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Swap the averaged weights into the model for the block, then restore the training ones."""
        with torch.no_grad():
            backup = [p.detach().clone() for p in self.params]
            torch._foreach_copy_(self.params, self.shadow)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(self.params, backup)

    def averaged_state(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """``model.state_dict()`` with the averaged parameters in place of the trained ones."""
        state = dict(model.state_dict())
        for (name, _), s in zip(self._named, self.shadow):
            state[name] = s.detach().clone()
        return state

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates,
                "shadow": {n: s for (n, _), s in zip(self._named, self.shadow)}}

    def load_state_dict(self, state: dict) -> None:
        shadow = state["shadow"]
        names = [n for n, _ in self._named]
        if sorted(shadow) != sorted(names):
            raise ValueError(f"EMA state has parameters {sorted(set(shadow) ^ set(names))[:4]} that the model "
                             "does not match")
        with torch.no_grad():
            for (name, p), s in zip(self._named, self.shadow):
                if shadow[name].shape != p.shape:
                    raise ValueError(f"EMA state {name}: shape {tuple(shadow[name].shape)}, model {tuple(p.shape)}")
                s.copy_(shadow[name])
        self.num_updates = int(state["num_updates"])
