"""Preemption and time limits inside a Slurm job: checkpoint at a safe point, then requeue.

Slurm signals a job (submitit asks for ``USR2``, ``launch.signal_delay_s`` seconds before the
time limit; preemption sends it too) and submitit's handler would checkpoint the callable and
requeue at once — in the middle of an optimizer step. lmrun wraps that handler: while a stage
runs a loop that can stop cleanly (:func:`cooperative`, e.g. the trainer), the signal only sets
a flag; the loop sees :func:`requested` after its current step, saves its own checkpoint and
raises :class:`Preempted`; the launcher then runs submitit's handler, which requeues the job
into the same run directory, where the stage resumes from that checkpoint. Outside such a loop
the signal requeues immediately (the stage restarts from scratch).

Ctrl-C (SIGINT) gets the same treatment inside :func:`interruptible`: the first one sets a flag
(:func:`interrupted`), the loop saves a checkpoint after its current step and raises
KeyboardInterrupt; a second Ctrl-C raises KeyboardInterrupt at once (an atomic checkpoint write
in progress leaves the previous checkpoint, never half a file).
"""
from __future__ import annotations

import logging
import signal
import threading
from contextlib import contextmanager

log = logging.getLogger(__name__)

_requested: int | None = None
_deferred = None
_cooperative = 0
_interrupts = 0


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


@contextmanager
def interruptible():
    """While inside, Ctrl-C (SIGINT) does not raise KeyboardInterrupt in the middle of whatever
    runs: the first one only sets the flag that :func:`interrupted` reports (and logs a warning),
    so that the code can stop at a safe point (the trainer checkpoints after its current step,
    then raises KeyboardInterrupt); a second one raises KeyboardInterrupt at once.

    Takes effect only in the main thread and only where SIGINT has Python's default handler (an
    ignored SIGINT, e.g. a background job, or another handler is left alone). The previous
    handler and the flag are restored on exit."""
    global _interrupts
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return

    def handler(sig, frame):
        global _interrupts
        _interrupts += 1
        if _interrupts > 1:
            raise KeyboardInterrupt("a second Ctrl-C: stopped at once, without waiting for the checkpoint")
        log.warning("interrupted (Ctrl-C): saving a checkpoint after the current step; press Ctrl-C again to stop "
                    "at once")

    _interrupts = 0
    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _interrupts = 0


def interrupted() -> bool:
    """True once Ctrl-C (SIGINT) arrived inside :func:`interruptible` (the code should save and
    raise KeyboardInterrupt)."""
    return _interrupts > 0
