"""Where Triton kernels can run, and Triton JIT functions that pick compiled or interpreted
execution when first launched.

Triton kernels run on CUDA tensors, or on CPU tensors under Triton's interpreter
(``TRITON_INTERPRET=1``, slow, for tests). ``triton.jit`` reads that variable when it decorates a
function, so :func:`lazy_jit` defers the decoration to the first launch: setting the variable
before the first call is enough (tests set it with ``monkeypatch``).
"""
from __future__ import annotations

import importlib.util
import os

from lmrun.errors import ConfigError, LmrunError


def interpreter_enabled() -> bool:
    """True when ``TRITON_INTERPRET`` is set to a true value (1, true, yes, on)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "yes", "on")


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_unavailable_reason() -> str | None:
    """None when Triton kernels can run here (Triton installed, and a CUDA GPU or the interpreter);
    otherwise why not, in a few words."""
    if not triton_installed():
        return "Triton is not installed (pip install triton; Linux only)"
    if interpreter_enabled():
        return None
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU here (set TRITON_INTERPRET=1 to run Triton kernels slowly on the CPU)"
    return None


def require_triton(key: str) -> None:
    """Raise ConfigError ``key: ... needs Triton ...`` when Triton kernels cannot run here
    (see :func:`triton_unavailable_reason`). ``key`` names the setting that asked for them,
    e.g. ``model.attention.impl=flash_triton``."""
    reason = triton_unavailable_reason()
    if reason:
        raise ConfigError(f"{key}: Triton kernels cannot run: {reason}")


def check_launch_device(tensor, what: str) -> None:
    """Raise LmrunError unless a Triton kernel can run on ``tensor``'s device: CUDA, or the CPU
    under ``TRITON_INTERPRET=1``."""
    if tensor.is_cuda:
        return
    if tensor.device.type == "cpu" and interpreter_enabled():
        return
    raise LmrunError(f"{what}: Triton kernels need CUDA tensors (got {tensor.device}); on a CPU set "
                     "TRITON_INTERPRET=1 (slow) or use the PyTorch implementation")


class lazy_jit:
    """``triton.jit(fn)`` made on first launch (``kernel[grid](...)``), once per mode (compiled or
    interpreted), so the mode follows ``TRITON_INTERPRET`` at launch time rather than at import."""

    def __init__(self, fn):
        self.fn = fn
        self.__name__ = fn.__name__
        self.__doc__ = fn.__doc__
        self._jitted: dict[bool, object] = {}

    def __getitem__(self, grid):
        mode = interpreter_enabled()
        if mode not in self._jitted:
            import triton

            self._jitted[mode] = triton.jit(self.fn)
        return self._jitted[mode][grid]
