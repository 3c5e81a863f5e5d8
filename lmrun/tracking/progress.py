"""Progress reporting for long work: tqdm bars on a terminal and log lines everywhere.

Every loop that can take more than a few seconds reports through :class:`Progress`: on a
terminal a tqdm bar (stderr), and in the log (console and ``<stage>.log``, which is what a Slurm
job or a redirected run shows) a line at most every ``every_s`` seconds with ``done/total``,
elapsed time, ETA and the rate — so nothing is silent for more than ~10 seconds.
:func:`byte_progress` is the bar-only variant for byte counts (tokenizer pre-tokenization,
encoding), whose callers log their own summary.
"""
from __future__ import annotations

import logging
import math
import sys
import time

#: seconds between progress log lines (the bar updates continuously)
LOG_EVERY_S = 10.0


def format_duration(seconds: float | None) -> str:
    """``75.2`` -> ``'1m15s'``, ``3725`` -> ``'1h02m05s'``, ``4.2`` -> ``'4.2s'``; None/inf -> ``'?'``."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    if seconds < 10:
        return f"{seconds:.1f}s"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    if h:
        return f"{h}h{m:02d}m{sec:02d}s"
    if m:
        return f"{m}m{sec:02d}s"
    return f"{sec}s"


def format_progress(done: float, total: float | None, elapsed: float, unit: str = "step",
                    rate: float | None = None, rate_unit: str | None = None) -> str:
    """``'40/1000 steps (4%), elapsed 12.0s, ETA 4m48s, 3.3 steps/s'`` — the fields every progress
    log line carries. ``rate`` (per second) defaults to ``done / elapsed`` in ``unit``s; pass it with
    ``rate_unit`` to report another rate (e.g. tokens/s). The ETA assumes the average pace so far
    (``done / elapsed``); without a total there is no ETA."""
    plural = _plural(unit)
    pace = done / elapsed if elapsed > 0 else 0.0
    if total:
        eta = (total - done) / pace if pace > 0 else None
        head = f"{_num(done)}/{_num(total)} {plural} ({100.0 * done / total:.0f}%), elapsed {format_duration(elapsed)}, " \
               f"ETA {format_duration(eta)}"
    else:
        head = f"{_num(done)} {plural}, elapsed {format_duration(elapsed)}"
    if rate is None:
        rate, rate_unit = pace, f"{plural}/s"
    return f"{head}, {_rate(rate)} {rate_unit or plural + '/s'}"


def _plural(unit: str) -> str:
    if unit.endswith("s") or unit.endswith("/s"):
        return unit
    return unit + ("es" if unit.endswith(("ch", "sh", "x")) else "s")


def _num(x: float) -> str:
    return f"{int(x):,}" if float(x).is_integer() else f"{x:,.1f}"


def _rate(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


class Progress:
    """Progress of one loop of known (or unknown) length: a tqdm bar on a terminal and, at most every
    ``every_s`` seconds and at the end, a log line ``desc: done/total units (pct), elapsed, ETA,
    rate[, extra fields]`` on ``logger`` (INFO).

    Args:
        total: the number of units the loop will do (None: unknown, no ETA).
        desc: what is being done (``'evaluating'``, ``'bootstrap'``); starts every log line.
        unit: the unit counted by :meth:`update` (``'step'``, ``'prompt'``, ``'document'``).
        logger: where log lines go (default: the ``lmrun`` logger).
        every_s: seconds between log lines (0: a line for every update; None: ``LOG_EVERY_S``).
        bar: show a tqdm bar when stderr is a terminal (``cfg.progress``).
        log_start: log a first line at once (``'desc: 0/total units'``), useful when the first unit
            itself may take a while.

    Use as a context manager (the final line is logged on exit) or call :meth:`close`. Raises
    nothing of its own.
    """

    def __init__(self, total: float | None, desc: str, unit: str = "step", logger: logging.Logger | None = None,
                 every_s: float | None = None, bar: bool = True, log_start: bool = False, initial: float = 0):
        self.total = total if total else None
        self.desc, self.unit = desc, unit
        self.log = logger or logging.getLogger("lmrun")
        self.every_s = float(LOG_EVERY_S if every_s is None else every_s)  # read now: tests may set LOG_EVERY_S
        self.done = initial
        self.initial = initial
        self.t0 = time.perf_counter()
        self.last_log = self.t0
        self.fields: dict[str, object] = {}
        self.closed = False
        self._bar = None
        if bar:
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, initial=initial, desc=desc, unit=unit, leave=False, file=sys.stderr,
                             dynamic_ncols=True, disable=None)  # disable=None: only on a terminal
        if log_start:
            self.log.info("%s: %s", desc, format_progress(self.done, self.total, 0.0, unit, rate=0.0))

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def line(self, rate: float | None = None, rate_unit: str | None = None) -> str:
        """The current progress line (without ``desc``)."""
        done = self.done - self.initial
        total = None if self.total is None else self.total - self.initial
        text = format_progress(done, total, self.elapsed, self.unit, rate, rate_unit)
        if self.total is not None and self.initial:
            text = f"{_num(self.done)}/{_num(self.total)} {_plural(self.unit)} overall; " + text
        extra = ", ".join(f"{k} {_fmt(v)}" for k, v in self.fields.items())
        return text + (f", {extra}" if extra else "")

    @property
    def logged(self) -> bool:
        """Whether a progress line was logged since the start (``log_start``'s line not counted)."""
        return self.last_log > self.t0

    def update(self, n: float = 1, force: bool = False, **fields) -> None:
        """Count ``n`` more units done; ``fields`` (e.g. ``loss=2.31``) are shown on the bar and the
        next log lines. ``force``: log a line now (e.g. every N steps) even if ``every_s`` has not
        passed; either way at most one line per call."""
        self.done += n
        self.fields.update(fields)
        if self._bar is not None:
            self._bar.update(n)
            if fields:
                self._bar.set_postfix({k: _fmt(v) for k, v in fields.items()}, refresh=False)
        now = time.perf_counter()
        if force or now - self.last_log >= self.every_s:
            self.last_log = now
            self.log.info("%s: %s", self.desc, self.line())

    def close(self, log_final: bool = True) -> None:
        if self.closed:
            return
        self.closed = True
        if self._bar is not None:
            self._bar.close()
        if log_final:
            self.log.info("%s: %s", self.desc, self.line())

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(log_final=exc_type is None)


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def byte_progress(total_bytes: int, desc: str, enabled: bool = True):
    """A tqdm bar counting bytes (update with byte counts; shows MB and MB/s), or None if disabled.

    Writes to stderr (only when it is a terminal; logs stay clean) and clears itself when closed."""
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1000, desc=desc, leave=False,
                file=sys.stderr, dynamic_ncols=True, disable=None)  # None: only on a terminal
