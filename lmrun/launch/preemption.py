"""Preemption and time limits inside a Slurm job: checkpoint at a safe point, then requeue.

Slurm signals a job (submitit asks for ``USR2``, ``launch.signal_delay_s`` seconds before the
time limit; preemption sends it too) and submitit's handler would checkpoint the callable and
requeue at once — in the middle of an optimizer step. lmrun wraps that handler: while a stage
runs a loop that can stop cleanly (:func:`cooperative`, e.g. the trainer), the signal only sets
a flag; the loop sees :func:`requested` after its current step, saves its own checkpoint and
raises :class:`Preempted`; the launcher then runs submitit's handler, which requeues the job
into the same run directory, where the stage resumes from that checkpoint. Outside such a loop
the signal requeues immediately (the stage restarts from scratch).
"""
from __future__ import annotations

import logging
import signal
from contextlib import contextmanager

log = logging.getLogger(__name__)

_requested: int | None = None
_deferred = None
_cooperative = 0


class Preempted(Exception):
    """Raised by a stage that saved its checkpoint after a preemption or time-limit signal."""


def install(signum: int) -> None:
    """Wrap the handler installed for ``signum`` (submitit's checkpoint-and-requeue)."""
    global _deferred, _requested
    _requested = None
    original = signal.getsignal(signum)
    _deferred = original if callable(original) else None

    def handler(sig, frame):
        global _requested
        if _cooperative and _deferred is not None:
            _requested = sig
            log.warning("received %s: checkpointing after the current step, then requeueing",
                        signal.Signals(sig).name)
        elif _deferred is not None:
            _deferred(sig, frame)

    signal.signal(signum, handler)


@contextmanager
def cooperative():
    """While inside, a preemption signal waits for the code to call :func:`requested`."""
    global _cooperative
    _cooperative += 1
    try:
        yield
    finally:
        _cooperative -= 1


def requested() -> bool:
    """True once a preemption/time-limit signal arrived (the stage should save and raise
    :class:`Preempted`)."""
    return _requested is not None


def requeue_now() -> None:
    """Run the wrapped handler for the signal that arrived: submitit checkpoints the job's
    callable, requeues the job (same id, same run directory) and exits this process."""
    if _deferred is None or _requested is None:
        return
    _deferred(_requested, None)
