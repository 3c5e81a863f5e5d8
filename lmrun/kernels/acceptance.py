"""GPU acceptance in one command: does lmrun run, correctly and fast, on this GPU?

``PYTHONPATH=. python -m lmrun.kernels.acceptance [--out DIR] [--budget-s 420]`` (on a Slurm
node: ``srun --gpus=1 python -m lmrun.kernels.acceptance``; through the CLI: ``lmrun
stage=benchmark benchmark=gpu_acceptance``). Needs only torch, triton and numpy (no Hydra,
OmegaConf, wandb or submitit), so it runs from a plain checkout on a bare GPU machine.

Parts, each one or more table rows (``status`` ok | fail | error | skipped); a part that raises
reports ``error: <one line>`` in its row and the next part runs:

1. ``env``: GPU, memory, SMs, torch/triton/CUDA versions; the local ceilings — bf16 matmul
   TFLOP/s (8192³) and device-to-device copy TB/s (bytes read + written).
2. ``flash``: FlashAttention-2 (``FlashAttentionTriton``, ``FlashAttentionTorch``) forward and
   backward against the float64 reference, fp32 and bf16, causal and not, head dims 64 and 128,
   lengths that are not multiples of the tiles (bf16 passes within 3× the error of PyTorch's own
   bf16 SDPA); then CS336's leaderboard case (batch 1, 16 heads, sequence 16,384, head dim 64,
   causal, bf16, forward+backward, ``triton.testing.do_bench``) next to SDPA's flash backend and
   ``flash_torch``.
3. ``rmsnorm``: ``RMSNormTriton`` forward+backward against PyTorch and ``torch.compile`` at
   4096 × 4096, bf16 and fp32: correctness, and GB/s (the 5 tensors a fused pass must move)
   against the measured copy bandwidth — through autograd, and the kernels alone timed in a CUDA
   graph (the target: at this size Python's launch overhead is as long as the kernels).
4. ``train``: a training step (bf16 autocast, lmrun's cross-entropy, clipping, AdamW) of CS336's
   TinyStories shape and a GPT-2-small shape (124M, Llama-style blocks, tied embeddings), eager
   and ``torch.compile`` × SDPA and ``flash_triton`` attention: tokens/s, MFU against the
   measured matmul ceiling, peak memory; then a timed run (60 s on a GPU) memorising a fixed set
   of random sequences, whose loss must fall.
5. ``inference``: ``InferenceEngine`` on the GPT-2-small shape (bf16 weights): prefill tokens/s,
   greedy decode tokens/s at batch 1 and 32, KV-cached and uncached.
6. ``targets``: one line per target, met / not met, with the number.

Writes ``gpu_acceptance.json`` (after every row, atomically: a run cut short keeps what it
measured) and ``gpu_acceptance.md``. On a machine without CUDA the same code runs at tiny sizes,
Triton kernels in the interpreter (``TRITON_INTERPRET=1``, set here before Triton is imported),
with timings skipped and no speed targets — the CPU test (tests/kernels/test_acceptance.py)
keeps the script from rotting. Whole run bounded by ``--budget-s`` (parts that would start past
it are skipped; each part also has its own share).
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from lmrun.kernels.config import ACCEPTANCE_PARTS

#: targets (issue 29): leaderboard forward+backward ms, ratio to SDPA flash, RMSNorm share of copy bandwidth
LEADERBOARD_MS = 6.0
SDPA_RATIO = 1.3
RMSNORM_BW_SHARE = 0.6
#: each part's share of the time left when it starts (among the parts still to run): time an
#: early part does not use goes to the later ones
PART_SHARE = {"env": 0.05, "flash": 0.30, "rmsnorm": 0.08, "train": 0.45, "inference": 0.12}
PARTS = list(ACCEPTANCE_PARTS)


def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:240]


class Report:
    """Rows and targets, written to ``<out>/gpu_acceptance.{json,md}`` after every change."""

    def __init__(self, out: Path, meta: dict):
        self.out, self.meta = out, meta
        self.rows: list[dict] = []
        self.targets: list[dict] = []
        self.t0 = time.perf_counter()
        out.mkdir(parents=True, exist_ok=True)

    def row(self, part: str, name: str, status: str = "ok", value: str = "", **data) -> dict:
        r = {"part": part, "name": name, "status": status, "value": value, **data}
        self.rows.append(r)
        print(f"[{part:9s}] {name:48s} {status:7s} {value}", flush=True)
        self.write()
        return r

    def target(self, name: str, value: float | None, threshold: float, op: str, unit: str = "") -> dict:
        """``value op threshold`` (op ``<=`` or ``>=``); met None where the value is missing."""
        met = None if value is None else (value <= threshold if op == "<=" else value >= threshold)
        t = {"target": name, "value": value, "threshold": threshold, "op": op, "unit": unit, "met": met}
        self.targets.append(t)
        self.write()
        return t

    def as_dict(self, finished: bool = False) -> dict:
        return {**self.meta, "elapsed_s": round(time.perf_counter() - self.t0, 1), "finished": finished,
                "rows": self.rows, "targets": self.targets}

    def write(self, finished: bool = False) -> None:
        from lmrun.tracking.files import atomic_write_json, atomic_write_text

        atomic_write_json(self.out / "gpu_acceptance.json", self.as_dict(finished))
        atomic_write_text(self.out / "gpu_acceptance.md", self.markdown(finished))

    def markdown(self, finished: bool = False) -> str:
        m = self.meta
        lines = [f"# GPU acceptance — {m.get('device', '?')}", "",
                 f"{m.get('date', '')}; torch {m.get('torch')}, triton {m.get('triton')}, CUDA {m.get('cuda')}; "
                 f"mode {m.get('mode')}; {time.perf_counter() - self.t0:.0f} s"
                 + ("" if finished else " (unfinished)"), "",
                 "| part | check | status | result |", "|---|---|---|---|"]
        for r in self.rows:
            lines.append(f"| {r['part']} | {r['name']} | {r['status']} | {str(r['value']).replace('|', '/')} |")
        if self.targets:
            lines += ["", "## Targets", "", "| target | value | threshold | met |", "|---|---|---|---|"]
            for t in self.targets:
                v = "—" if t["value"] is None else f"{t['value']:.4g}{t['unit']}"
                met = {True: "met", False: "NOT MET", None: "no number"}[t["met"]]
                lines.append(f"| {t['target']} | {v} | {t['op']} {t['threshold']:g}{t['unit']} | {met} |")
        return "\n".join(lines) + "\n"


class Acceptance:
    """The run: ``device`` cuda (full sizes, timed) or cpu (tiny sizes, untimed)."""

    def __init__(self, out: Path, budget_s: float, device: str, parts: list[str] | None = None,
                 train_seconds: float | None = None):
        import torch

        self.torch = torch
        self.device = torch.device(device)
        self.gpu = self.device.type == "cuda"
        self.budget_s = float(budget_s)
        self.parts = parts or PARTS
        self.train_seconds = train_seconds if train_seconds is not None else (60.0 if self.gpu else 3.0)
        self.t0 = time.perf_counter()
        self.ceil: dict = {}  # measured matmul FLOP/s and copy bytes/s
        self.flash_ok: bool | None = None
        import triton

        meta = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "mode": "gpu" if self.gpu else "cpu",
                "device": torch.cuda.get_device_name(self.device) if self.gpu else f"CPU ({platform.machine()})",
                "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
                "python": platform.python_version(), "budget_s": self.budget_s,
                "triton_interpret": os.environ.get("TRITON_INTERPRET", "")}
        self.report = Report(out, meta)
        self.report.write()  # from the start: a run stopped before its first row still leaves a report

    # --- helpers ---------------------------------------------------------------------------------
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.budget_s - self.elapsed()

    def sync(self) -> None:
        if self.gpu:
            self.torch.cuda.synchronize(self.device)

    def bench_ms(self, fn: Callable[[], object], rep_ms: int = 100, warmup_ms: int = 25) -> float | None:
        """Median ms of ``fn`` by ``triton.testing.do_bench`` on CUDA; on CPU ``fn`` runs once and
        None is returned (timings skipped)."""
        if not self.gpu:
            fn()
            return None
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))

    def row(self, *args, **kwargs) -> dict:
        return self.report.row(*args, **kwargs)

    # --- the run ---------------------------------------------------------------------------------
    def run(self) -> dict:
        for i, part in enumerate(self.parts):
            share = self.left() * PART_SHARE[part] / sum(PART_SHARE[p] for p in self.parts[i:])
            if self.left() <= 5:
                self.row(part, part, "skipped", f"time budget spent ({self.elapsed():.0f} s of {self.budget_s:.0f} s)")
                continue
            self.part_end = time.perf_counter() + min(share, self.left())
            try:
                getattr(self, f"part_{part}")()
            except Exception as e:  # one part's failure is a row, not the end of the run
                traceback.print_exc()
                self.row(part, part, "error", f"error: {one_line(e)}")
                if self.gpu and "out of memory" in str(e).lower():
                    self.torch.cuda.empty_cache()
        self.summary()
        self.report.write(finished=True)
        return self.report.as_dict(finished=True)

    def part_left(self) -> float:
        return self.part_end - time.perf_counter()

    # --- 1. environment --------------------------------------------------------------------------
    def part_env(self) -> None:
        torch = self.torch
        if self.gpu:
            p = torch.cuda.get_device_properties(self.device)
            self.row("env", "GPU", "ok", f"{p.name}, {p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs, "
                     f"sm_{p.major}{p.minor}", gpu=p.name, memory_gib=round(p.total_memory / 2**30, 2),
                     sms=p.multi_processor_count, capability=f"{p.major}.{p.minor}")
        else:
            self.row("env", "device", "ok", f"CPU ({platform.machine()}, {torch.get_num_threads()} threads); "
                     "timings skipped")
        import numpy
        import triton

        import shutil

        cc = shutil.which("cc") or shutil.which("gcc")  # Triton builds its launcher stub with it
        self.row("env", "versions", "ok", f"python {platform.python_version()}, torch {torch.__version__}, triton "
                 f"{triton.__version__}, CUDA {torch.version.cuda}, numpy {numpy.__version__}; C compiler "
                 f"{cc or 'NONE (Triton and torch.compile need one)'}")
        n = 8192 if self.gpu else 128
        dt = torch.bfloat16 if self.gpu else torch.float32
        a = torch.randn(n, n, device=self.device, dtype=dt)
        b = torch.randn(n, n, device=self.device, dtype=dt)
        ms = self.bench_ms(lambda: a @ b, rep_ms=200)
        if ms is None:
            self.row("env", f"matmul {n}³ {str(dt)[6:]}", "ok", "ran (untimed on CPU)")
        else:
            self.ceil["matmul"] = 2 * n**3 / (ms / 1000)
            self.row("env", f"matmul {n}³ bf16", "ok", f"{self.ceil['matmul'] / 1e12:.0f} TFLOP/s ({ms:.3f} ms)",
                     tflops=self.ceil["matmul"] / 1e12)
        del a, b
        numel = (2**30 if self.gpu else 2**20) // 4
        src = torch.empty(numel, device=self.device, dtype=torch.float32).fill_(1.0)
        dst = torch.empty_like(src)
        ms = self.bench_ms(lambda: dst.copy_(src), rep_ms=100)
        if ms is None:
            self.row("env", "device copy", "ok", "ran (untimed on CPU)")
        else:
            self.ceil["copy"] = 2 * src.numel() * 4 / (ms / 1000)
            self.row("env", "device-to-device copy 1 GiB", "ok", f"{self.ceil['copy'] / 1e12:.2f} TB/s (read + write)",
                     tb_per_s=self.ceil["copy"] / 1e12)
        del src, dst

    # --- 2. FlashAttention-2 ---------------------------------------------------------------------
    def _triton_reason(self) -> str | None:
        from lmrun.kernels.runtime import language_interpreted, triton_unavailable_reason

        reason = triton_unavailable_reason()
        if reason is None and not self.gpu and not language_interpreted():
            reason = "TRITON_INTERPRET=1 was set after Triton was imported"
        return reason

    def part_flash(self) -> None:
        torch = self.torch
        from lmrun.kernels.flash_attention_torch import FlashAttentionTorch
        from lmrun.kernels.flash_attention_triton import FlashAttentionTriton

        reason = self._triton_reason()
        impls = {"flash_triton": lambda q, k, v, c: FlashAttentionTriton.apply(q, k, v, c),
                 "flash_torch": lambda q, k, v, c: FlashAttentionTorch.apply(q, k, v, c)}
        if reason:
            self.row("flash", "flash_triton correctness", "skipped", reason)
            impls.pop("flash_triton")
        # (batch·heads, n_queries = n_keys) per head dim: lengths not multiples of any tile
        lengths = [1000, 333] if self.gpu else [40]
        lead = (2, 4) if self.gpu else (1, 2)
        cases = [(impl, dtype, d, causal, n) for impl in impls for dtype in (torch.float32, torch.bfloat16)
                 for d in (64, 128) for causal in (False, True) for n in lengths]
        all_ok = True
        for i, (impl, dtype, d, causal, n) in enumerate(cases):
            if self.gpu and self.part_left() < 45:  # keep time for the leaderboard case
                self.row("flash", "correctness", "skipped", f"part time budget spent: {len(cases) - i} cases not run")
                if any(c[0] == "flash_triton" for c in cases[i:]):
                    all_ok = None  # not every case checked: no verdict
                break
            try:
                ok = self._flash_case(impl, impls[impl], lead, n, d, dtype, causal)
            except Exception as e:
                self.row("flash", f"{impl} {str(dtype)[6:]} d={d} n={n} {'causal' if causal else 'full'}", "error",
                         f"error: {one_line(e)}", impl=impl, correctness=True)
                ok = False
            if impl == "flash_triton" and all_ok is not None:
                all_ok = all_ok and ok
        if "flash_triton" in impls:
            self.flash_ok = all_ok
        self._leaderboard(impls)

    def _flash_case(self, impl, f, lead, n, d, dtype, causal) -> bool:
        torch = self.torch
        import torch.nn.functional as F

        from lmrun.kernels.reference import attention_reference

        g = torch.Generator(device=self.device).manual_seed(n * d + causal)
        q, k, v, do = (torch.randn(*lead, n, d, generator=g, device=self.device).to(dtype) for _ in range(4))
        name = f"{impl} {str(dtype)[6:]} d={d} n={n} {'causal' if causal else 'full'}"

        def grads(fn, inputs):
            xs = [x.detach().clone().requires_grad_() for x in inputs]
            o = fn(*xs)
            o.backward(do.to(o.dtype))
            return [o.detach()] + [x.grad for x in xs]

        ref = grads(lambda a, b, c: attention_reference(a, b, c, causal)[0], [q.double(), k.double(), v.double()])
        got = grads(lambda a, b, c: f(a, b, c, causal), [q, k, v])

        def err(xs):  # worst of O, dQ, dK, dV: max abs error / max abs value of the reference
            return max(float((x.double() - r).abs().max() / r.abs().max().clamp_min(1e-12)) for x, r in zip(xs, ref))

        e = err(got)
        if dtype == torch.float32:
            tol, base = 2e-3 if self.gpu else 1e-4, None  # fp32 kernels use IEEE products (no TF32)
        else:
            base = err(grads(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=causal), [q, k, v]))
            tol = max(2e-2, 3 * base)
        ok = math.isfinite(e) and e <= tol
        self.row("flash", name, "ok" if ok else "fail", f"rel err {e:.2e} (tol {tol:.1e}"
                 + (f"; PyTorch bf16 SDPA {base:.2e})" if base is not None else ")"), rel_err=e, tol=tol, impl=impl,
                 dtype=str(dtype)[6:], head_dim=d, seq_len=n, causal=causal, correctness=True)
        return ok

    def _leaderboard(self, impls: dict) -> None:
        torch = self.torch
        import torch.nn.functional as F

        B, H, N, D = (1, 16, 16384, 64) if self.gpu else (1, 2, 48, 64)
        g = torch.Generator(device=self.device).manual_seed(0)
        dt = torch.bfloat16
        q, k, v = (torch.randn(B, H, N, D, generator=g, device=self.device).to(dt).requires_grad_() for _ in range(3))
        do = torch.randn(B, H, N, D, generator=g, device=self.device).to(dt)
        flops = 3.5 * 4 * B * H * N * N * D / 2  # causal: half the score/value products; backward 2.5× forward
        shape = f"b={B} h={H} n={N} d={D} causal bf16 fwd+bwd"

        def fwd_bwd(fn):
            def run():
                out = fn(q, k, v)
                return torch.autograd.grad(out, (q, k, v), do)
            return run

        def sdpa_flash(a, b, c):
            from torch.nn.attention import SDPBackend, sdpa_kernel

            backends = [SDPBackend.FLASH_ATTENTION] if self.gpu else [SDPBackend.MATH]
            with sdpa_kernel(backends):
                return F.scaled_dot_product_attention(a, b, c, is_causal=True)

        def first_call(fn):
            out = fn(q, k, v)
            return [out.detach()] + list(torch.autograd.grad(out, (q, k, v), do))

        times, results = {}, {}
        cands = [("flash_triton", impls.get("flash_triton")), ("sdpa_flash", sdpa_flash)]
        for name, fn in cands:
            if fn is None:
                self.row("flash", f"leaderboard {name}", "skipped", "Triton kernels cannot run here")
                continue
            f = (lambda a, b, c: impls["flash_triton"](a, b, c, True)) if name == "flash_triton" else fn
            try:
                t0 = time.perf_counter()
                run = fwd_bwd(f)
                note = ""
                try:
                    results[name] = first_call(f)  # compilation / autotuning; kept for the comparison below
                except Exception as e:
                    if name != "flash_triton" or not self.gpu:
                        raise
                    # autotuning failed (a candidate config that neither compiles nor reports running out
                    # of resources): the kernels with their default tiles still get a number
                    from lmrun.kernels import flash_attention_triton as fat

                    fat.AUTOTUNE_MIN_LEN = 1 << 62
                    note = f"; autotuning failed ({one_line(e)[:100]}), default tiles"
                    self.row("flash", "leaderboard flash_triton autotuning", "error", f"error: {one_line(e)}")
                    results[name] = first_call(f)
                self.sync()
                first = time.perf_counter() - t0
                ms = self.bench_ms(run, rep_ms=200)
                times[name] = ms
                if ms is None:
                    self.row("flash", f"leaderboard {name}", "ok", f"{shape}: ran (untimed on CPU)")
                else:
                    extra = {}
                    if name == "flash_triton":
                        from lmrun.kernels.flash_attention_triton import tuned_configs

                        extra["tuned"] = tuned_configs()
                    self.row("flash", f"leaderboard {name}", "ok", f"{ms:.2f} ms, {flops / ms / 1e9:.0f} TFLOP/s "
                             f"(first call incl. compile/tune {first:.1f} s); {shape}{note}", ms=ms, **extra)
            except Exception as e:
                self.row("flash", f"leaderboard {name}", "error", f"error: {one_line(e)}")
        if len(results) == 2:  # the autotuned configs, checked at this shape: O, dQ, dK, dV against SDPA's
            diff = max(float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12))
                       for a, b in zip(results["flash_triton"], results["sdpa_flash"]))
            ok = math.isfinite(diff) and diff <= 3e-2
            self.row("flash", "leaderboard flash_triton == SDPA flash", "ok" if ok else "fail",
                     f"rel diff {diff:.2e} (tol 3e-02; O, dQ, dK, dV)", rel_err=diff, tol=3e-2, impl="flash_triton",
                     correctness=True, dtype="bfloat16", head_dim=D, seq_len=N, causal=True)
            if self.flash_ok is not None:
                self.flash_ok = self.flash_ok and ok
        results.clear()
        # flash_torch: a Python loop over 64×64 tiles, timed once (seconds at this size)
        if self.gpu and self.part_left() < 20:
            self.row("flash", "leaderboard flash_torch", "skipped", "part time budget spent")
        else:
            try:
                t0 = time.perf_counter()
                fwd_bwd(lambda a, b, c: impls["flash_torch"](a, b, c, True))()
                self.sync()
                s = time.perf_counter() - t0
                times["flash_torch"] = s * 1000 if self.gpu else None
                self.row("flash", "leaderboard flash_torch", "ok", f"{s * 1000:.0f} ms (one call)" if self.gpu
                         else "ran (untimed on CPU)", ms=times["flash_torch"])
            except Exception as e:
                self.row("flash", "leaderboard flash_torch", "error", f"error: {one_line(e)}")
        if self.gpu:
            tri, sd = times.get("flash_triton"), times.get("sdpa_flash")
            self.report.target("FA2 Triton leaderboard fwd+bwd (ms)", tri, LEADERBOARD_MS, "<=", " ms")
            self.report.target("FA2 Triton / SDPA flash backend (time ratio)", tri / sd if tri and sd else None,
                               SDPA_RATIO, "<=", "×")
        self.report.target("FA2 Triton correct in every case (1 = yes)",
                           None if self.flash_ok is None else float(self.flash_ok), 1.0, ">=")

    # --- 3. RMSNorm ------------------------------------------------------------------------------
    def part_rmsnorm(self) -> None:
        torch = self.torch
        from lmrun.kernels.reference import rms_norm_reference

        reason = self._triton_reason()
        rows, d = (4096, 4096) if self.gpu else (64, 256)
        for dtype in (torch.bfloat16, torch.float32):
            dn = str(dtype)[6:]
            g = torch.Generator(device=self.device).manual_seed(1)
            x = torch.randn(rows, d, generator=g, device=self.device).to(dtype).requires_grad_()
            w = (1 + 0.1 * torch.randn(d, generator=g, device=self.device)).to(dtype).requires_grad_()
            dy = torch.randn(rows, d, generator=g, device=self.device).to(dtype)
            impls = {"torch": lambda a, b: rms_norm_reference(a, b, 1e-5)}
            if not reason:
                from lmrun.kernels.rmsnorm_triton import RMSNormTriton

                impls["triton"] = lambda a, b: RMSNormTriton.apply(a, b, 1e-5)
            else:
                self.row("rmsnorm", f"triton {dn}", "skipped", reason)
            if self.gpu:
                compiled = torch.compile(rms_norm_reference, dynamic=False)
                impls["compiled"] = lambda a, b: compiled(a, b, 1e-5)
            xr, wr = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
            yr = rms_norm_reference(xr, wr, 1e-5)
            yr.backward(dy.double())
            refs = [yr.detach(), xr.grad, wr.grad]
            nbytes = 5 * rows * d * x.element_size()  # forward reads x, writes y; backward reads x, dy, writes dx
            for name, f in impls.items():
                def run(f=f):
                    y = f(x, w)
                    return (y,) + torch.autograd.grad(y, (x, w), dy)
                got = [t.detach() for t in run()]
                e = max(float((a.double() - r).abs().max() / r.abs().max().clamp_min(1e-12)) for a, r in zip(got, refs))
                tol = 1e-4 if dtype == torch.float32 else 2e-2
                ok = math.isfinite(e) and e <= tol
                ms = self.bench_ms(run, rep_ms=100)
                value = f"rel err {e:.1e} (tol {tol:.0e})"
                data = {"rel_err": e, "impl": name, "dtype": dn, "correctness": name == "triton"}
                if ms is not None:
                    gbs = nbytes / (ms / 1000) / 1e9
                    share = nbytes / (ms / 1000) / self.ceil["copy"] if self.ceil.get("copy") else None
                    value += f"; {ms * 1000:.0f} µs, {gbs:.0f} GB/s" + (f" = {share:.0%} of copy" if share else "")
                    data.update(ms=ms, gb_per_s=gbs, copy_share=share)
                self.row("rmsnorm", f"{name} {dn} {rows}×{d} fwd+bwd (autograd)", "ok" if ok else "fail", value,
                         **data)
            if "triton" in impls:
                self._rmsnorm_kernels(x, w, dy, dn, nbytes, refs)
            del x, w, dy

    def _rmsnorm_kernels(self, x, w, dy, dn, nbytes, refs) -> None:
        """The two Triton kernels (+ the weight-gradient sum) without autograd, timed in a CUDA graph
        (``do_bench_cudagraph``): the GPU's time, not Python's launch overhead, which at this size
        is comparable (the target row)."""
        torch = self.torch
        from lmrun.kernels.rmsnorm_triton import rmsnorm_backward_triton, rmsnorm_forward_triton

        xd = x.detach()

        def kernels():
            y, rstd = rmsnorm_forward_triton(xd, w.detach(), 1e-5)
            dx, dw = rmsnorm_backward_triton(xd, w.detach(), rstd, dy)
            return y, dx, dw

        got = kernels()
        e = max(float((a.double() - r).abs().max() / r.abs().max().clamp_min(1e-12)) for a, r in zip(got, refs))
        ok = math.isfinite(e) and e <= (1e-4 if x.dtype == torch.float32 else 2e-2)
        value, data, how = f"rel err {e:.1e}", {"rel_err": e, "impl": "triton_kernels", "dtype": dn}, "untimed on CPU"
        if self.gpu:
            import triton.testing

            try:
                ms, how = float(triton.testing.do_bench_cudagraph(kernels, rep=50, return_mode="median")), "CUDA graph"
            except Exception as e:  # capture can fail on some stacks: time it eagerly instead
                ms, how = self.bench_ms(kernels, rep_ms=100), f"eager; CUDA graph failed: {one_line(e)[:80]}"
            gbs = nbytes / (ms / 1000) / 1e9
            share = nbytes / (ms / 1000) / self.ceil["copy"] if self.ceil.get("copy") else None
            value += f"; {ms * 1000:.0f} µs, {gbs:.0f} GB/s" + (f" = {share:.0%} of copy" if share else "")
            data.update(ms=ms, gb_per_s=gbs, copy_share=share)
            self.report.target(f"RMSNorm Triton fwd+bwd kernels {dn} {tuple(x.shape)} (share of copy bandwidth)",
                               share, RMSNORM_BW_SHARE, ">=")
        rows, d = x.shape
        self.row("rmsnorm", f"triton {dn} {rows}×{d} fwd+bwd kernels only", "ok" if ok else "fail",
                 f"{value} ({how})", **data)

    # --- 4. training step ------------------------------------------------------------------------
    def shapes(self) -> dict:
        from lmrun.model.config import ModelConfig

        if not self.gpu:
            return {"tiny": (ModelConfig(vocab_size=256, context_length=32, d_model=64, num_layers=2, num_heads=4,
                                         d_ff=128), 4)}
        return {"tinystories": (ModelConfig(size="tinystories", vocab_size=10000, context_length=256, d_model=512,
                                            num_layers=4, num_heads=16, d_ff=1344), 64),
                "gpt2-small": (ModelConfig(size="gpt2-small", vocab_size=50304, context_length=1024, d_model=768,
                                           num_layers=12, num_heads=12, d_ff=2048, tie_embeddings=True), 16)}

    def _model(self, mc, impl: str, dtype=None):
        import copy

        from lmrun.model import build_model

        mc = copy.deepcopy(mc)
        mc.attention.impl = impl
        self.torch.manual_seed(0)
        return build_model(mc, device=self.device, dtype=dtype)

    def _step_fn(self, model, run_model, opt, x, y):
        torch = self.torch
        from lmrun.optim import clip_grad_norm
        from lmrun.train.loss import cross_entropy

        def step():
            with torch.autocast(self.device.type, dtype=torch.bfloat16):
                logits = run_model(x)
            loss = cross_entropy(logits, y)
            loss.backward()
            clip_grad_norm([p for p in model.parameters() if p.grad is not None], 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach()
        return step

    def part_train(self) -> None:
        torch = self.torch
        from lmrun.model.flops import count_params, forward_flops_per_token
        from lmrun.optim import AdamW

        triton_reason = self._triton_reason()
        variants = [("sdpa", False), ("sdpa", True), ("flash_triton", False), ("flash_triton", True)]
        shapes = self.shapes()
        for si, (size, (mc, batch)) in enumerate(shapes.items()):
            T = mc.context_length
            flops_tok = 3 * forward_flops_per_token(mc, T)["total"]
            params = count_params(mc)["total"]
            for impl, compiled in variants:
                label = f"{size} ({params / 1e6:.0f}M) b={batch} T={T} {impl}{' compiled' if compiled else ' eager'}"
                if impl == "flash_triton" and triton_reason:
                    self.row("train", label, "skipped", triton_reason)
                    continue
                if compiled and not self.gpu:
                    self.row("train", label, "skipped", "torch.compile variants run on CUDA only (CPU: minutes)")
                    continue
                # the first shape keeps time for the loss run after it (and 40 s for the next shape);
                # a compilation needs about a minute at the larger shape
                need = (self.train_seconds + 15 + 40) if si == 0 else (60 if compiled else 15)
                if self.gpu and self.part_left() < need:
                    self.row("train", label, "skipped", "part time budget spent")
                    continue
                try:
                    self._train_variant(label, mc, batch, impl, compiled, flops_tok, AdamW)
                except Exception as e:
                    self.row("train", label, "error", f"error: {one_line(e)}")
                finally:
                    if self.gpu:
                        torch.cuda.empty_cache()
            if si == 0:  # the loss run, on the first shape, before the larger shape's best-effort timings
                try:
                    self._loss_run(shapes)
                except Exception as e:
                    self.row("train", "loss run", "error", f"error: {one_line(e)}")
                    self.report.target("training loss falls (first - last, nats)", None, 1.0, ">=")

    def _train_variant(self, label, mc, batch, impl, compiled, flops_tok, AdamW) -> None:
        torch = self.torch
        model = self._model(mc, impl)
        if compiled:
            torch.compiler.reset()  # a fresh compilation (counted in the warm-up), no recompile limit reached
        run_model = torch.compile(model) if compiled else model
        opt = AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
        g = torch.Generator(device=self.device).manual_seed(0)
        T = mc.context_length
        x = torch.randint(0, mc.vocab_size, (batch, T), generator=g, device=self.device)
        y = torch.randint(0, mc.vocab_size, (batch, T), generator=g, device=self.device)
        step = self._step_fn(model, run_model, opt, x, y)
        t0 = time.perf_counter()
        for _ in range(3 if self.gpu else 1):  # compile, allocator and cuBLAS warm-up (counted here)
            loss = step()
        self.sync()
        warm = time.perf_counter() - t0
        if not math.isfinite(float(loss)):
            self.row("train", label, "fail", f"non-finite loss {float(loss)}")
            return
        if not self.gpu:
            self.row("train", label, "ok", f"ran ({warm:.1f} s, loss {float(loss):.3f}; untimed on CPU)")
            return
        torch.cuda.reset_peak_memory_stats(self.device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        steps, t_wall = 0, time.perf_counter()
        start.record()
        while steps < 5 or (steps < 50 and time.perf_counter() - t_wall < 4.0):
            step()
            steps += 1
        end.record()
        torch.cuda.synchronize(self.device)
        s = start.elapsed_time(end) / 1000
        tok_s = steps * batch * T / s
        peak = torch.cuda.max_memory_allocated(self.device) / 2**30
        mfu = tok_s * flops_tok / self.ceil["matmul"] if self.ceil.get("matmul") else None
        self.row("train", label, "ok", f"{tok_s:,.0f} tok/s, {s / steps * 1000:.1f} ms/step, MFU "
                 + (f"{mfu:.1%}" if mfu is not None else "—") + f" of measured bf16 matmul, peak {peak:.1f} GiB; "
                 f"warm-up{' + compile' if compiled else ''} {warm:.0f} s",
                 tokens_per_s=tok_s, ms_per_step=s / steps * 1000, mfu=mfu, peak_gib=peak, warmup_s=warm, steps=steps)

    def _loss_run(self, shapes) -> None:
        """Memorise a fixed set of random sequences for ``train_seconds``: the loss must fall."""
        torch = self.torch
        from lmrun.optim import AdamW

        size, (mc, batch) = next(iter(shapes.items()))
        impl = "flash_triton" if (self.flash_ok and not self._triton_reason() and self.gpu) else "sdpa"
        model = self._model(mc, impl)
        opt = AdamW(model.parameters(), lr=1e-3 if self.gpu else 3e-3, weight_decay=0.0)
        g = torch.Generator(device=self.device).manual_seed(1)
        n_seq, T = 4 * batch, mc.context_length
        data = torch.randint(0, mc.vocab_size, (n_seq, T + 1), generator=g, device=self.device)
        losses: list[float] = []
        seconds = min(self.train_seconds, max(5.0, self.part_left() - 5)) if self.gpu else self.train_seconds
        t0 = time.perf_counter()
        i = 0
        while time.perf_counter() - t0 < seconds or i < 10:
            rows = torch.arange(i * batch, (i + 1) * batch, device=self.device) % n_seq
            xy = data[rows]
            loss = self._step_fn(model, model, opt, xy[:, :-1], xy[:, 1:])()
            losses.append(float(loss))  # one sync per step, as the trainer's logging
            i += 1
        s = time.perf_counter() - t0
        k = max(1, min(10, len(losses) // 5))
        first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
        ok = all(math.isfinite(v) for v in losses) and last < first - 1.0
        self.row("train", f"loss run {size} {impl} bf16 autocast, {s:.0f} s", "ok" if ok else "fail",
                 f"loss {first:.3f} -> {last:.3f} over {len(losses)} steps ({len(losses) * batch * T / s:,.0f} tok/s, "
                 f"{n_seq} random sequences memorised)", first_loss=first, last_loss=last, steps=len(losses))
        self.report.target("training loss falls (first - last, nats)", first - last if math.isfinite(last) else None,
                           1.0, ">=")

    # --- 5. inference ----------------------------------------------------------------------------
    def part_inference(self) -> None:
        torch = self.torch
        from lmrun.inference.engine import InferenceEngine, SamplingParams

        size, (mc, _) = list(self.shapes().items())[-1]
        model = self._model(mc, "sdpa", dtype=torch.bfloat16 if self.gpu else None).eval()
        prompt, new = (128, 64) if self.gpu else (8, 4)
        g = torch.Generator().manual_seed(0)
        greedy = SamplingParams(max_new_tokens=new, temperature=0.0)
        InferenceEngine(model).generate(torch.randint(0, mc.vocab_size, (2, prompt), generator=g).tolist(),
                                        SamplingParams(max_new_tokens=2, temperature=0.0))  # warm-up
        decode = {}
        for batch in (1, 32) if self.gpu else (1, 4):
            ids = torch.randint(0, mc.vocab_size, (batch, prompt), generator=g).tolist()
            outs = {}
            for cached in (True, False):
                if self.gpu and self.part_left() < 5:
                    self.row("inference", f"decode b={batch}", "skipped", "part time budget spent")
                    break
                eng = InferenceEngine(model, use_cache=cached)
                outs[cached] = [c.token_ids for c in eng.generate(ids, greedy)]
                st = eng.last_stats
                tok_s = st.new_tokens / st.decode_s if st.decode_s > 0 else None
                decode[(batch, cached)] = tok_s
                name = f"{size} decode b={batch} prompt={prompt} new={new} {'KV-cached' if cached else 'uncached'}"
                value = f"{tok_s:,.0f} tok/s" if self.gpu and tok_s else "ran (untimed on CPU)"
                if cached:
                    pre = st.prompt_tokens / st.prefill_s if st.prefill_s > 0 else None
                    self.row("inference", f"{size} prefill b={batch} prompt={prompt}", "ok",
                             f"{pre:,.0f} tok/s" if self.gpu and pre else "ran (untimed on CPU)", tokens_per_s=pre)
                self.row("inference", name, "ok", value, tokens_per_s=tok_s)
            if len(outs) == 2:
                same = sum(a == b for a, b in zip(outs[True], outs[False]))
                # bf16 weights: cached and full recomputation round differently, near-ties may flip
                # fp32 (CPU): identical; bf16 weights (GPU): the cached and the full pass round differently
                # and a random model's near-ties may flip, so there the count is information only
                ok = same == len(ids) or self.gpu
                self.row("inference", f"greedy tokens cached == uncached b={batch}", "ok" if ok else "fail",
                         f"{same}/{len(ids)} sequences identical" + (" (bf16: information only)" if self.gpu else ""),
                         identical=same)
            c, u = decode.get((batch, True)), decode.get((batch, False))
            if self.gpu and c and u:
                self.row("inference", f"KV cache decode speed-up b={batch}", "ok", f"{c / u:.2f}× uncached",
                         speedup=c / u)

    # --- 6. summary ------------------------------------------------------------------------------
    def summary(self) -> None:
        for t in self.report.targets:
            v = "no number" if t["value"] is None else f"{t['value']:.4g}{t['unit']}"
            status = {True: "ok", False: "fail", None: "skipped"}[t["met"]]
            self.row("targets", t["target"], status, f"{'met' if t['met'] else 'NOT MET' if t['met'] is False else '—'}: "
                     f"{v} (target {t['op']} {t['threshold']:g}{t['unit']})")
        bad = [r for r in self.report.rows if r["status"] in ("fail", "error")]
        self.row("targets", "rows failed or errored", "ok" if not bad else "fail", str(len(bad)))


def prepare_interpreter(device: str) -> None:
    """On a CPU run, switch Triton's interpreter on before Triton is imported."""
    if device == "cpu" and "triton" not in sys.modules:
        os.environ.setdefault("TRITON_INTERPRET", "1")


def run_acceptance(out: str | os.PathLike = ".", budget_s: float = 420.0, device: str = "auto",
                   parts: list[str] | None = None, train_seconds: float | None = None) -> dict:
    """Run the acceptance parts (see the module docstring) and return the report as a dict
    (``rows``, ``targets``, metadata); writes ``gpu_acceptance.json`` and ``.md`` into ``out``.
    ``device``: auto (CUDA if available), cuda or cpu. ValueError for an unknown part."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda: no CUDA device is available")
    for p in parts or []:
        if p not in PART_SHARE:
            raise ValueError(f"part {p!r}: expected some of {', '.join(PARTS)}")
    prepare_interpreter(device)
    return Acceptance(Path(out), budget_s, device, parts, train_seconds).run()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lmrun.kernels.acceptance", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=".", help="folder for gpu_acceptance.json and .md (default: .)")
    ap.add_argument("--budget-s", type=float, default=420.0, help="whole-run time budget in seconds (default 420)")
    ap.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    ap.add_argument("--train-seconds", type=float, default=None, help="length of the loss run (60 on GPU, 3 on CPU)")
    ap.add_argument("--hard-limit-s", type=float, default=None,
                    help="stop the process (exit 124, results so far kept) after this many seconds "
                         "(default: budget + 45)")
    a = ap.parse_args(argv)
    if a.device == "cpu" or (a.device == "auto" and not _cuda_available()):
        prepare_interpreter("cpu")
    _watchdog(a.hard_limit_s if a.hard_limit_s is not None else a.budget_s + 45, Path(a.out))
    report = run_acceptance(a.out, a.budget_s, a.device, [p for p in a.parts.split(",") if p], a.train_seconds)
    print(f"\nwrote {Path(a.out) / 'gpu_acceptance.json'} and gpu_acceptance.md ({report['elapsed_s']:.0f} s)")
    bad = [r for r in report["rows"] if r["status"] in ("fail", "error")]
    return 1 if bad else 0


def _watchdog(seconds: float, out: Path) -> None:
    """After ``seconds``, note it in ``gpu_acceptance.md`` and end the process (exit 124): a step
    that overruns the budget (a compilation, a hung kernel) cannot hold the node. The JSON already
    holds every row measured so far (``finished`` false)."""
    import threading

    def stop():
        print(f"\nacceptance: hard limit of {seconds:.0f} s reached; stopping (results so far are in {out})",
              file=sys.stderr, flush=True)
        try:
            with open(out / "gpu_acceptance.md", "a") as f:
                f.write(f"\nStopped by the hard limit of {seconds:.0f} s.\n")
        finally:
            os._exit(124)

    t = threading.Timer(seconds, stop)
    t.daemon = True
    t.start()


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
