"""Timing and memory measurement for benchmarks, and the attention and RMSNorm grids of
``stage=benchmark``.

Timing (:func:`time_fn`): on CUDA ``triton.testing.do_bench`` (warm-up, cache flush, CUDA
events); on CPU a wall-clock timer: one untimed call, warm-up for ``warmup_ms``, then each call
timed separately (``time.perf_counter``, garbage collector off) for about ``rep_ms`` and at least
``min_reps`` calls. Both report the median and the 20th/80th percentiles in milliseconds.
Peak memory (:func:`peak_memory_mb`): on CUDA the allocator's peak during one call, above what
was allocated before it; on Linux CPUs the increase of the process's peak resident set size
during one call (after returning freed memory to the OS) — an upper-level, allocator-dependent
measure. Out-of-memory errors are reported as a status, not raised.

Trust (:func:`spread`, :func:`cpu_load`, :func:`noise_notes`): each row carries ``spread``, the
80th / 20th percentile time ratio across its repeats; above ``SPREAD_WARN`` (1.5) the median is
not to be trusted. A 1-minute load average above the CPUs this process may use means other
processes took CPU time during the measurement (a starved multi-threaded op can be slow on every
repeat, with a small spread): the run is flagged even when each case looks steady.
"""
from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from lmrun.kernels.config import TRITON_IMPLS

log = logging.getLogger(__name__)

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

#: a case whose 80th / 20th percentile time ratio exceeds this is flagged as noisy
SPREAD_WARN = 1.5


@dataclass
class Timing:
    """Milliseconds per call: median and 20th/80th percentiles over ``reps`` timed calls."""

    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _quantile(values: list[float], q: float) -> float:
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def time_fn(fn: Callable[[], object], device: torch.device, warmup_ms: float = 25.0, rep_ms: float = 100.0,
            min_reps: int = 5, max_reps: int = 10_000) -> Timing:
    """Time ``fn()`` (see the module docstring); returns a :class:`Timing` in milliseconds."""
    if device.type == "cuda":
        import triton.testing

        fn()
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        est = max(start.elapsed_time(end), 1e-3)
        reps = int(min(max_reps, max(min_reps, rep_ms / est)))
        med, p20, p80 = triton.testing.do_bench(fn, warmup=max(1, int(warmup_ms)), rep=max(1, int(rep_ms)),
                                                quantiles=[0.5, 0.2, 0.8])
        return Timing(med, p20, p80, reps)
    fn()  # first call: compilation, allocation
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        t_end = time.perf_counter() + warmup_ms / 1000
        while time.perf_counter() < t_end:
            fn()
        times: list[float] = []
        budget_end = time.perf_counter() + rep_ms / 1000
        while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() < budget_end):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1000)
    finally:
        if gc_was_enabled:
            gc.enable()
    return Timing(statistics.median(times), _quantile(times, 0.2), _quantile(times, 0.8), len(times))


def _malloc_trim() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _vm_hwm_kb() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> float | None:
    """Memory ``fn()`` needs beyond what is already allocated, in MiB (see the module docstring);
    None where it cannot be measured (CPU outside Linux)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    _malloc_trim()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak resident set size to the current one
    except OSError:
        return None
    before = _vm_hwm_kb()
    fn()
    after = _vm_hwm_kb()
    if before is None or after is None:
        return None
    return max(0, after - before) / 1024


def spread(row: dict) -> float | None:
    """The 80th / 20th percentile time ratio of a row (1.0: every repeat alike); None without both."""
    p20, p80 = row.get("p20_ms"), row.get("p80_ms")
    if p20 is None or p80 is None or p20 <= 0:
        return None
    return p80 / p20


def cpu_load() -> dict:
    """``{"load_1min": float | None, "cpus": int}``: the 1-minute load average (``os.getloadavg``;
    None where the OS has none) and the CPUs this process may run on (``os.sched_getaffinity``,
    else ``os.cpu_count``)."""
    try:
        load = round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        load = None
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return {"load_1min": load, "cpus": cpus}


def overloaded(load: dict) -> bool:
    """True when the 1-minute load average exceeds the CPU count (see :func:`cpu_load`)."""
    return load.get("load_1min") is not None and load["load_1min"] > load["cpus"]


def noise_notes(rows: list[dict], loads: list[dict], threshold: float = SPREAD_WARN) -> list[str]:
    """Warnings about the measurement, one Markdown bullet each: every case whose spread (p80/p20)
    exceeds ``threshold``, and a load average above the CPU count at any of ``loads`` (samples of
    :func:`cpu_load` taken during the run). Empty when the numbers can be trusted."""
    notes = []
    worst = max((ld for ld in loads if ld.get("load_1min") is not None), key=lambda ld: ld["load_1min"], default=None)
    if worst is not None and overloaded(worst):
        notes.append(f"- The 1-minute load average reached {worst['load_1min']:.2f} on {worst['cpus']} CPU(s): other "
                     "processes competed for the CPU, so every time here may be inflated, even with a small spread. "
                     "Rerun on an idle machine (or with `benchmark.threads=1`).")
    noisy = [r for r in rows if r.get("status") == "ok" and (spread(r) or 0) > threshold]
    for r in noisy:
        params = " ".join(f"{k}={v}" for k, v in r.items() if k in _PARAM_KEYS)
        notes.append(f"- `{r['impl']}` {r['pass']} {params}: spread p80/p20 = {spread(r):.2f} > {threshold} "
                     f"({r['p20_ms']:.4g}–{r['p80_ms']:.4g} ms over {r['reps']} repeats): the median is unreliable.")
    return notes


_PARAM_KEYS = ("seq_len", "head_dim", "dtype", "rows", "d_model", "size", "batch", "context", "size_mb",
               "world_size", "backend")


def is_oom(e: BaseException) -> bool:
    """True for an out-of-memory error of either device."""
    if isinstance(e, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


@dataclass
class Case:
    """One timed case: its grid coordinates (``params``), the implementation and the pass."""

    params: dict
    impl: str
    pass_: str
    fn: Callable[[], object] | None = None
    skip: str | None = None  # why it is not run
    extra: dict = field(default_factory=dict)


def measure(case: Case, device: torch.device, warmup_ms: float, rep_ms: float, min_reps: int,
            profile_dir: Path | None = None) -> dict:
    """Time and measure one case; returns a table row (``status`` ok | skipped | oom | error)."""
    row = {**case.params, "impl": case.impl, "pass": case.pass_, "status": "ok", "median_ms": None, "p20_ms": None,
           "p80_ms": None, "spread": None, "reps": None, "peak_mb": None, "note": case.skip or ""}
    if case.skip:
        row["status"] = "skipped"
        return row
    try:
        t = time_fn(case.fn, device, warmup_ms, rep_ms, min_reps)
        row.update(median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms, reps=t.reps)
        row["spread"] = round(spread(row), 3) if spread(row) is not None else None
        row["peak_mb"] = peak_memory_mb(case.fn, device)
        if profile_dir is not None:
            write_profile(case.fn, device, profile_dir / f"{case.impl}_{case.pass_}")
    except Exception as e:  # a failing implementation is a row of the table, not a crash
        if is_oom(e):
            row.update(status="oom", note="out of memory")
            if device.type == "cuda":
                torch.cuda.empty_cache()
        else:
            row.update(status="error", note=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200])
            log.warning("%s %s %s: %s", case.impl, case.pass_, case.params, row["note"])
    finally:
        case.fn = None  # drop the case's inputs before the next one
    row.update(case.extra)
    return row


def write_profile(fn: Callable[[], object], device: torch.device, stem: Path, steps: int = 3) -> list[Path]:
    """Run ``fn`` ``steps`` times under ``torch.profiler`` and write ``<stem>.trace.json`` (Chrome
    trace; open in Perfetto); on CUDA also ``<stem>.memory.pickle`` (a CUDA memory snapshot, for
    pytorch.org/memory_viz). Returns the paths written."""
    from torch.profiler import ProfilerActivity, profile

    stem.parent.mkdir(parents=True, exist_ok=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=True, profile_memory=True) as prof:
        for _ in range(steps):
            fn()
        _sync(device)
    out = [stem.with_suffix(".trace.json")]
    prof.export_chrome_trace(str(out[0]))
    if device.type == "cuda":
        torch.cuda.memory._record_memory_history(max_entries=100_000)
        try:
            for _ in range(steps):
                fn()
            _sync(device)
            out.append(stem.with_suffix(".memory.pickle"))
            torch.cuda.memory._dump_snapshot(str(out[-1]))
        finally:
            torch.cuda.memory._record_memory_history(enabled=None)
    return out


def triton_skip_reason(device: torch.device) -> str | None:
    """Why Triton implementations are not benchmarked here (None on CUDA): the interpreter is a
    correctness tool, not something to time."""
    from lmrun.kernels.runtime import triton_installed

    if not triton_installed():
        return "Triton is not installed"
    if device.type != "cuda":
        return "Triton kernels are benchmarked on CUDA only"
    return None


# --- attention -----------------------------------------------------------------------------------
def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool) -> torch.Tensor:
    """The model's ``naive`` path: explicit scores (float32), mask and softmax, in PyTorch."""
    from lmrun.model.attention import scaled_dot_product_attention

    mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril() if is_causal else None
    return scaled_dot_product_attention(q, k, v, mask)


def attention_fn(impl: str, is_causal: bool) -> Callable:
    """``f(q, k, v) -> out`` for an attention implementation name (``ATTENTION_IMPLS``)."""
    if impl == "naive":
        return lambda q, k, v: naive_attention(q, k, v, is_causal)
    if impl == "compiled":
        compiled = torch.compile(naive_attention, dynamic=False)
        return lambda q, k, v: compiled(q, k, v, is_causal)
    if impl == "sdpa":
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
    if impl == "sdpa_math":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def math_sdpa(q, k, v):
            with sdpa_kernel(SDPBackend.MATH):
                return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
        return math_sdpa
    if impl == "flash_torch":
        from lmrun.kernels.flash_attention_torch import FlashAttentionTorch

        return lambda q, k, v: FlashAttentionTorch.apply(q, k, v, is_causal)
    if impl == "flash_triton":
        from lmrun.kernels.flash_attention_triton import FlashAttentionTriton

        return lambda q, k, v: FlashAttentionTriton.apply(q, k, v, is_causal)
    raise ValueError(f"attention impl {impl!r}")


def _pass_fn(f: Callable, inputs: list[torch.Tensor], pass_: str) -> Callable[[], object]:
    """A no-argument callable running the forward pass, the backward pass alone (on a graph
    built once and retained) or both."""
    if pass_ == "forward":
        def forward():
            with torch.no_grad():
                return f(*inputs)
        return forward
    g = torch.Generator(device=inputs[0].device).manual_seed(1)
    if pass_ == "forward_backward":
        def forward_backward():
            out = f(*inputs)
            grad = torch.ones_like(out)
            return torch.autograd.grad(out, inputs, grad)
        return forward_backward
    out = f(*inputs)
    grad = torch.randn(out.shape, generator=g, device=out.device).to(out.dtype)

    def backward():
        return torch.autograd.grad(out, inputs, grad, retain_graph=True)
    return backward


def attention_cases(b, device: torch.device) -> list[Case]:
    """The grid of ``benchmark.kind=attention``: Q, K, V ``(batch_size, num_heads, seq_len,
    head_dim)``, random normal, ``requires_grad``."""
    cases = []
    triton_skip = triton_skip_reason(device)
    for dtype in b.dtypes:
        for d in b.head_dims:
            for n in b.seq_lens:
                params = {"seq_len": int(n), "head_dim": int(d), "dtype": dtype}
                for pass_ in b.passes:
                    for impl in b.impls:
                        skip = triton_skip if impl in TRITON_IMPLS else None
                        cases.append(Case(params, impl, pass_, skip=skip,
                                          fn=None if skip else _lazy_attention(b, impl, pass_, int(n), int(d), dtype,
                                                                               device)))
    return cases


def _lazy_attention(b, impl, pass_, n, d, dtype, device):
    """Inputs are made when the case runs (and freed after): the grid never holds them all."""
    state: dict = {}

    def run():
        if "fn" not in state:
            g = torch.Generator(device=device).manual_seed(0)
            shape = (int(b.batch_size), int(b.num_heads), n, d)
            qkv = [torch.randn(shape, generator=g, device=device).to(TORCH_DTYPES[dtype]).requires_grad_()
                   for _ in range(3)]
            state["fn"] = _pass_fn(attention_fn(impl, bool(b.is_causal)), qkv, pass_)
        return state["fn"]()
    return run


# --- RMSNorm -------------------------------------------------------------------------------------
def rmsnorm_fn(impl: str, eps: float = 1e-5) -> Callable:
    """``f(x, weight) -> y`` for an RMSNorm implementation name (``RMSNORM_IMPLS``)."""
    from lmrun.kernels.reference import rms_norm_reference

    if impl == "torch":
        return lambda x, w: rms_norm_reference(x, w, eps)
    if impl == "compiled":
        compiled = torch.compile(rms_norm_reference, dynamic=False)
        return lambda x, w: compiled(x, w, eps)
    if impl == "functional":
        return lambda x, w: F.rms_norm(x, (x.shape[-1],), w, eps)
    if impl == "triton":
        from lmrun.kernels.rmsnorm_triton import RMSNormTriton

        return lambda x, w: RMSNormTriton.apply(x, w, eps)
    raise ValueError(f"rmsnorm impl {impl!r}")


def rmsnorm_cases(b, device: torch.device) -> list[Case]:
    """The grid of ``benchmark.kind=rmsnorm``: x ``(rows, d_model)`` and weight ``(d_model,)``."""
    cases = []
    triton_skip = triton_skip_reason(device)
    for dtype in b.dtypes:
        for d in b.d_models:
            params = {"rows": int(b.rows), "d_model": int(d), "dtype": dtype}
            for pass_ in b.passes:
                for impl in b.impls:
                    skip = triton_skip if impl in TRITON_IMPLS else None
                    cases.append(Case(params, impl, pass_, skip=skip,
                                      fn=None if skip else _lazy_rmsnorm(int(b.rows), int(d), impl, pass_, dtype, device)))
    return cases


def _lazy_rmsnorm(rows, d, impl, pass_, dtype, device):
    state: dict = {}

    def run():
        if "fn" not in state:
            g = torch.Generator(device=device).manual_seed(0)
            x = torch.randn(rows, d, generator=g, device=device).to(TORCH_DTYPES[dtype]).requires_grad_()
            w = (1 + 0.1 * torch.randn(d, generator=g, device=device)).to(TORCH_DTYPES[dtype]).requires_grad_()
            state["fn"] = _pass_fn(rmsnorm_fn(impl), [x, w], pass_)
        return state["fn"]()
    return run


def add_speedups(rows: list[dict], baseline: str, keys: list[str]) -> None:
    """Set ``speedup`` = baseline's median time / this row's, for rows with the same ``keys``
    values and pass (None where either is missing)."""
    base = {tuple(r[k] for k in keys) + (r["pass"],): r["median_ms"] for r in rows if r["impl"] == baseline}
    for r in rows:
        b = base.get(tuple(r[k] for k in keys) + (r["pass"],))
        r["speedup"] = (b / r["median_ms"]) if b and r["median_ms"] else None
