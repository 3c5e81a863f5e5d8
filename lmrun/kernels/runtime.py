"""Where Triton kernels can run, and Triton JIT functions made on first launch.

Triton kernels run on CUDA tensors, or on CPU tensors under Triton's interpreter
(``TRITON_INTERPRET=1``, slow, for tests). Triton reads that variable when it decorates a
function — its own library functions (``tl.sum``, ``tl.max``, ...) when ``triton.language`` is
imported — so it must be set before Triton is first imported (the test suite's conftest does so
on machines without a GPU). :func:`lazy_jit` makes lmrun's kernels in the same mode as Triton's
library, on their first launch.
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


def language_interpreted() -> bool:
    """True when ``triton.language`` was imported in interpreter mode (its library functions are
    then interpreted, and so must lmrun's kernels be)."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.sum, InterpretedFunction)


def check_launch_device(tensor, what: str) -> None:
    """Raise LmrunError unless a Triton kernel can run on ``tensor``'s device: CUDA, or the CPU
    under ``TRITON_INTERPRET=1`` (set before Triton was imported)."""
    if tensor.is_cuda:
        return
    if tensor.device.type == "cpu" and interpreter_enabled():
        if language_interpreted():
            return
        raise LmrunError(f"{what}: TRITON_INTERPRET=1 was set after Triton was imported; set it in the "
                         "environment before the process starts")
    raise LmrunError(f"{what}: Triton kernels need CUDA tensors (got {tensor.device}); on a CPU set "
                     "TRITON_INTERPRET=1 (slow) or use the PyTorch implementation")


class lazy_jit:
    """A Triton kernel jitted on first launch (``kernel[grid](...)``), interpreted when
    ``triton.language`` was imported under ``TRITON_INTERPRET=1``, compiled otherwise; importing
    the module that defines it imports nothing of Triton's JIT machinery."""

    def __init__(self, fn):
        self.fn = fn
        self.__name__ = fn.__name__
        self.__doc__ = fn.__doc__
        self._jitted: dict[object, object] = {}

    def _jit(self):
        mode = language_interpreted()
        if mode not in self._jitted:
            if mode:
                from triton.runtime.interpreter import InterpretedFunction

                self._jitted[mode] = InterpretedFunction(self.fn)
            else:
                from triton.runtime.jit import JITFunction

                self._jitted[mode] = JITFunction(self.fn)
        return self._jitted[mode]

    def __getitem__(self, grid):
        return self._jit()[grid]

    def autotuned(self, name: str, configs: list, key: list[str]):
        """The kernel wrapped in ``triton.autotune(configs, key)`` (made once per ``name``; compiled
        mode only — the interpreter cannot time configs): launch it as ``k.autotuned(...)[grid]``
        with ``grid`` a function of the chosen meta-parameters, and without passing the tuned
        meta-parameters. ``configs``: ``triton.Config`` objects; ``key``: argument names whose
        values (with the tensors' dtypes) select a tuning."""
        if language_interpreted():
            raise LmrunError(f"{self.__name__}: autotuning needs compiled Triton (a CUDA GPU), not the interpreter")
        tuned = self._jitted.get(name)
        if tuned is None:
            import triton

            tuned = self._jitted[name] = triton.autotune(configs=configs, key=key)(self._jit())
        return tuned
