"""The pretraining loop: batches from token arrays, forward/backward with gradient accumulation,
clipping, the optimizer and schedule from their config groups, periodic evaluation,
checkpoints with exact resume, non-finite handling, logging (loss, lr, grad norm, tokens/s,
MFU, memory; validation loss, perplexity, bits per byte), a loss-curve PNG and text samples.

Source: CS336 assignment 1 (training loop); nanoGPT; Chowdhery et al. 2022 (MFU).
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lmrun.errors import ConfigError, LmrunError
from lmrun.launch import preemption
from lmrun.model import build_model
from lmrun.model.flops import model_summary
from lmrun.optim import build_optimizer, build_schedule, clip_grad_norm, set_lr
from lmrun.tracking.files import save_figure
from lmrun.tracking.progress import LOG_EVERY_S, Progress, format_duration
from lmrun.train.checkpoint import RESERVED, CheckpointManager, load_state, rng_state, set_rng_state
from lmrun.train.data import BatchStream
from lmrun.train.ema import ParameterEMA
from lmrun.train.evaluation import bits_per_byte, evaluate_loss
from lmrun.train.loss import cross_entropy_with_z, linear_cross_entropy
from lmrun.train.noise_scale import GradientNoiseScale, grad_sq_norm

log = logging.getLogger(__name__)

#: Dense bf16 peak FLOP/s of known accelerators, for MFU (vendor datasheets).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}
NOMINAL_TIME_STEPS = 100_000  # schedule resolution for a time budget
#: train.profile's torch.profiler schedule: steps skipped, warm-up steps, steps recorded (steps 3-7)
PROFILE_SCHEDULE = (1, 1, 5)


class NonFiniteError(LmrunError):
    """The loss or the gradient norm became NaN or infinite."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise LmrunError("train.device=cuda: no CUDA device is available (use train.device=auto or cpu)")
    return torch.device(name)


#: glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4


def keep_heap_memory(enable: bool = True) -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of returning it to the OS.

    By default glibc serves each allocation above its mmap threshold (128 KiB, growing to at most
    32 MiB) with a fresh ``mmap`` and unmaps it on free, so every training step pays page faults
    (the kernel zeroing pages) on every large activation: on the 2-core development CPU a
    ``(32, 128, 512)`` float32 multiply took 5.3 ms instead of 1.3 ms. ``enable`` serves all
    allocations from the heap (``M_MMAP_MAX=0``) and trims it only above 1 GiB of free memory at
    its top (``M_TRIM_THRESHOLD``), the effect the PyTorch CPU tuning guide gets by preloading
    jemalloc or tcmalloc. ``enable=False`` restores glibc's default values (65,536 maps, 128 KiB
    mmap and trim thresholds; the threshold no longer adapts, as after any ``mallopt``).
    Process-wide. Returns False (changing nothing) where the C library is not glibc.
    """
    import ctypes
    import ctypes.util
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(_M_MMAP_MAX, 0 if enable else 65536)
        ok &= libc.mallopt(_M_TRIM_THRESHOLD, (1 << 30) if enable else 128 * 1024)
        if not enable:
            ok &= libc.mallopt(_M_MMAP_THRESHOLD, 128 * 1024)
    except (OSError, AttributeError):
        return False
    return bool(ok)


def peak_flops(device: torch.device, configured: float | None) -> float | None:
    if configured:
        return float(configured)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((v for k, v in PEAK_FLOPS.items() if k in name), None)
    return None


def memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import psutil

    return psutil.Process().memory_info().rss / 2**20


@dataclass
class TrainState:
    """What a checkpoint restores besides model and optimizer weights."""

    step: int = 0
    tokens: int = 0
    train_seconds: float = 0.0
    skipped_steps: int = 0
    best_val_loss: float = math.inf
    history: dict = field(default_factory=lambda: {"step": [], "loss": [], "val_step": [], "val_loss": []})
    #: the end-of-training evaluation (``{"step": ..., **metrics}``) once done: a restart of the
    #: finished run reports it instead of evaluating (and logging) the same step again
    final_eval: dict | None = None


class _State:
    """Stands in for a model or optimizer whose full state was gathered across ranks."""

    def __init__(self, state: dict):
        self._state = state

    def state_dict(self) -> dict:
        return self._state


class Trainer:
    """Trains ``cfg.model`` on ``train_tokens`` with ``cfg.optimizer``/``cfg.schedule``/``cfg.train``.

    train_tokens / val_tokens: 1-D token arrays (np.memmap). bytes_per_token: of the
    validation split (for bits per byte). run: the active ``lmrun.tracking.run.Run``.
    extra_state: JSON-able facts stored in every checkpoint (e.g. the tokenizer identity).

    Several processes (RANK / WORLD_SIZE set by torchrun or the Slurm launcher) train together
    with ``cfg.distributed.strategy`` (``lmrun.distributed.strategy.Parallel``): every rank draws
    the same global batch and the data-parallel strategies give each rank its rows, so the
    trajectory is that of one process on the full batch; checkpoints hold the full state (the
    single-process format) and only rank 0 writes them."""

    def __init__(self, cfg, run, train_tokens: np.ndarray, val_tokens: np.ndarray, bytes_per_token: float,
                 extra_state: dict | None = None):
        self.cfg, self.run, self.t = cfg, run, cfg.train
        self.train_tokens, self.val_tokens = train_tokens, val_tokens
        self.bytes_per_token = float(bytes_per_token)
        self.extra_state = dict(extra_state or {})
        from lmrun.tracking.run import resolved_config

        self.config_container = resolved_config(cfg)
        from lmrun.distributed.env import init_distributed
        from lmrun.distributed.strategy import Parallel

        dcfg = cfg.distributed
        self.env = init_distributed(self.t.device, dcfg.backend, float(dcfg.timeout_s))
        self.parallel = Parallel(dcfg, self.env)
        self.device = self.env.device if self.env.distributed else resolve_device(self.t.device)
        self._check_distributed()
        precision = self.t.precision if self.t.precision != "auto" else ("bf16" if self.device.type == "cuda" else "fp32")
        self.autocast_dtype = torch.bfloat16 if precision == "bf16" else None
        self.precision = precision
        if self.t.deterministic:
            torch.use_deterministic_algorithms(True)
        torch.manual_seed(int(cfg.seed))
        self.context_length = int(cfg.model.context_length)
        self.micro_batch = self.t.batch_size // self.t.grad_accum_steps
        self.tokens_per_step = self.t.batch_size * self.context_length

        self.model = build_model(cfg.model, device=self.device)
        self.summary = model_summary(cfg.model)
        if self.t.activation_checkpointing:
            self._checkpoint_blocks()
        if self.parallel.active:
            self.forward = self.parallel.wrap(self.model)
            self.optimizer = self.parallel.build_optimizer(cfg.optimizer)
        else:
            self.forward = torch.compile(self.model) if self.t.compile else self.model
            self.optimizer = build_optimizer(self.model, cfg.optimizer)
        self.parallel.optimizer = self.optimizer
        self.total_steps = self._total_steps()
        self.schedule = build_schedule(cfg.schedule, float(cfg.optimizer.lr), self.total_steps)
        self.stream = BatchStream(train_tokens, self.micro_batch, self.context_length, seed=int(cfg.seed))
        self.overfit = None
        if self.t.overfit_batches:  # the first N micro-batches of a fresh stream: the same after a resume
            first = BatchStream(train_tokens, self.micro_batch, self.context_length, seed=int(cfg.seed))
            self.overfit = [first.next(self.device) for _ in range(int(self.t.overfit_batches))]
        self.ckpt = CheckpointManager(Path(run.dir) / "checkpoints", keep_last=self.t.keep_last)
        self.state = TrainState()
        self.fused_loss = (self.t.fused_loss and not self.parallel.active and self.model.logit_softcap is None
                           and self.model.lm_head.bias is None)
        if self.t.keep_heap_memory and self.device.type == "cpu":
            keep_heap_memory()
        self.peak = peak_flops(self.device, self.t.peak_flops)
        self.noise_scale = GradientNoiseScale() if self.t.noise_scale else None
        self.ema = ParameterEMA(self.model, self.t.ema_decay) if self.t.ema_decay is not None else None
        self.last_noise_scale = None
        self.last_aux_stats: dict[str, float] = {}  # auxiliary-loss statistics of the last step (MoE)

    # --- setup ----------------------------------------------------------------------------
    def _check_distributed(self) -> None:
        if not self.env.distributed:
            return
        t, w, s = self.t, self.env.world_size, self.parallel.strategy
        micro = t.batch_size // t.grad_accum_steps
        if s != "tp" and micro % w:
            raise ConfigError(f"train.batch_size={t.batch_size}: with train.grad_accum_steps={t.grad_accum_steps} each "
                              f"micro-batch ({micro} sequences) must be divisible by the world size {w} "
                              f"(distributed.strategy={s})")
        for key, on, why in (("train.compile", t.compile, "is not supported with several processes yet"),
                             ("train.ema_decay", t.ema_decay is not None, "needs a single process"),
                             ("train.noise_scale", t.noise_scale, "needs a single process"),
                             ("train.activation_checkpointing", t.activation_checkpointing and s in ("fsdp", "tp"),
                              f"is not supported with distributed.strategy={s}")):
            if on:
                raise ConfigError(f"{key}=true: {why} (WORLD_SIZE={w})")

    def _total_steps(self) -> int:
        if self.t.max_steps is not None:
            return int(self.t.max_steps)
        if self.t.max_tokens is not None:
            return max(1, math.ceil(int(self.t.max_tokens) / self.tokens_per_step))
        if self.t.max_flops is not None:
            return max(1, math.ceil(float(self.t.max_flops) / self.summary["train_flops_per_token"] / self.tokens_per_step))
        return NOMINAL_TIME_STEPS

    def _next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.overfit is None:
            return self.stream.next(self.device)
        batch = self.overfit[self.stream.step % len(self.overfit)]
        self.stream.step += 1  # the position still counts (checkpoints, resume)
        return batch

    def progress_line(self) -> str:
        """``'step 40/1000 (4%), elapsed 1m02s, ETA 25m48s'`` (a step, token or FLOP budget) or
        ``'step 40, 12.0s/240s of training (5%), elapsed 13.1s, ETA 3m48s'`` (a time budget). Elapsed
        is wall time since this process started training (evaluations included); the ETA is the
        remaining training at this run's pace so far."""
        s, t = self.state, self.t
        wall = time.perf_counter() - self._fit_t0
        if t.max_time is not None:
            frac = min(1.0, s.train_seconds / float(t.max_time))
            eta = max(0.0, float(t.max_time) - s.train_seconds)
            head = f"step {s.step}, {format_duration(s.train_seconds)}/{format_duration(float(t.max_time))} of training"
        else:
            frac = min(1.0, s.step / max(1, self.total_steps))
            done = s.step - self._fit_step0
            pace = self._train_s_here / done if done else None
            eta = pace * (self.total_steps - s.step) if pace else None
            head = f"step {s.step}/{self.total_steps}"
        return f"{head} ({100 * frac:.0f}%), elapsed {format_duration(wall)}, ETA {format_duration(eta)}"

    def _checkpoint_blocks(self) -> None:
        from torch.utils.checkpoint import checkpoint

        for block in self.model.layers:
            block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)

    def _done(self) -> bool:
        s = self.state
        if self.t.max_steps is not None:
            return s.step >= self.t.max_steps
        if self.t.max_tokens is not None:
            return s.tokens >= self.t.max_tokens
        if self.t.max_flops is not None:
            return s.step >= self.total_steps
        return s.train_seconds >= self.t.max_time

    def _schedule_step(self) -> int:
        if self.t.max_time is not None:
            return min(NOMINAL_TIME_STEPS, int(self.state.train_seconds / self.t.max_time * NOMINAL_TIME_STEPS))
        return self.state.step

    # --- checkpoints ------------------------------------------------------------------------
    def save(self) -> Path:
        """Write a checkpoint (collective with several processes: state is gathered; rank 0 writes)."""
        s = self.state
        extra = {"train_state": {"step": s.step, "tokens": s.tokens, "train_seconds": s.train_seconds,
                                 "skipped_steps": s.skipped_steps, "best_val_loss": s.best_val_loss,
                                 "history": s.history, "final_eval": s.final_eval},
                 "stream": self.stream.state_dict(), "rng": rng_state(), "config": self.config_container,
                 **self.extra_state}
        if self.noise_scale is not None:
            extra["noise_scale"] = self.noise_scale.state_dict()
        if self.ema is not None:
            extra["ema"] = self.ema.state_dict()
        if not self.parallel.active:
            return self.ckpt.save(s.step, self.model, self.optimizer, **extra)
        import torch.distributed as dist

        model_state, optimizer_state = self.parallel.model_state(), self.parallel.optimizer_state()
        if self.env.is_main:
            self.ckpt.save(s.step, _State(model_state), _State(optimizer_state), **extra)
        dist.barrier()
        return self.ckpt.path(s.step)

    def maybe_resume(self) -> bool:
        """With ``train.resume=auto``: restore the newest intact checkpoint of the run's
        ``checkpoints/`` folder (model, optimizer, train state, data position, RNG states, noise
        scale, EMA); True if one was restored.

        A corrupt newer checkpoint (truncated, or its checksum does not match) is reported with a
        warning naming it and why, moved aside to ``<name>.corrupt``, and the previous one is
        used (:meth:`CheckpointManager.read_latest`).

        Raises CorruptCheckpointError (a FormatError) when no checkpoint is readable, FormatError
        when the checkpoint does not fit this model or optimizer (another model config): one line
        naming the file."""
        if self.t.resume != "auto":
            return False
        found = self.ckpt.read_latest(quarantine=self.env.is_main)
        if found is None:
            return False
        latest, obj = found
        if self.parallel.active:
            self.parallel.load_model_state(obj["model"])
            self.parallel.load_optimizer_state(obj["optimizer"])
        else:
            load_state(obj, self.model, self.optimizer, name=str(latest))
        extra = {k: v for k, v in obj.items() if k not in RESERVED}
        ts = extra["train_state"]
        self.state = TrainState(step=int(ts["step"]), tokens=int(ts["tokens"]), train_seconds=float(ts["train_seconds"]),
                                skipped_steps=int(ts["skipped_steps"]), best_val_loss=float(ts["best_val_loss"]),
                                history=ts["history"], final_eval=ts.get("final_eval"))
        self.stream.load_state_dict(extra["stream"])
        set_rng_state(extra["rng"])
        if self.noise_scale is not None and "noise_scale" in extra:
            self.noise_scale.load_state_dict(extra["noise_scale"])
        if self.ema is not None and "ema" in extra:
            self.ema.load_state_dict(extra["ema"])
        log.info("resumed from %s (step %d, %d tokens)", latest, self.state.step, self.state.tokens)
        return True

    # --- evaluation -------------------------------------------------------------------------
    def evaluate(self, max_tokens: int | None) -> dict:
        """Validation loss, perplexity and bits per byte (of the averaged weights with train.ema_decay)."""
        with self.ema.applied() if self.ema is not None else contextlib.nullcontext():
            return self._evaluate(max_tokens)

    def _evaluate(self, max_tokens: int | None) -> dict:
        n = len(self.val_tokens) if max_tokens is None else min(len(self.val_tokens), int(max_tokens))
        bar = bool(self.cfg.progress) and self.env.is_main
        with Progress(max(0, n - 1), f"step {self.state.step}: evaluating", unit="token", bar=bar) as p:
            r = evaluate_loss(self.forward if self.parallel.active else self.model, self.val_tokens, self.micro_batch,
                              self.context_length, self.device, max_tokens=max_tokens,
                              autocast_dtype=self.autocast_dtype, stride=self.t.eval_stride, progress=p.update)
        return {"val_loss": r["loss"], "val_perplexity": r["perplexity"],
                "val_bpb": bits_per_byte(r["loss"], self.bytes_per_token), "val_tokens": r["tokens"]}

    # --- the loop ----------------------------------------------------------------------------
    def train_step(self) -> tuple[float, float, float]:
        """One optimizer step over grad_accum_steps micro-batches. Returns (loss, z, grad norm).

        With ``train.noise_scale`` the gradient's squared norm after the first micro-batch and
        after all of them feed the gradient-noise-scale estimate (McCandlish et al. 2018).
        Auxiliary losses the model reports (``TransformerLM.auxiliary()``: MoE load balancing and
        router z-loss) join the loss that is differentiated; their statistics, averaged over the
        micro-batches, land in ``self.last_aux_stats`` and are logged."""
        t, accum = self.t, self.t.grad_accum_steps
        total_loss = torch.zeros((), device=self.device)
        total_z = torch.zeros((), device=self.device)
        small_sq = None
        aux_stats: dict[str, float] = {}
        par = self.parallel
        for i in range(accum):
            x, y = par.shard_batch(*self._next_batch())
            with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
                out = self.forward(x, return_hidden=True) if self.fused_loss else self.forward(x)
            if self.fused_loss:
                loss, ce, z = linear_cross_entropy(out, self.model.lm_head.weight, y, t.z_loss)
            else:
                ce, z = cross_entropy_with_z(out, y, t.z_loss)
                loss = ce + t.z_loss * z if t.z_loss else ce
            aux_loss, stats = self.model.auxiliary()
            if aux_loss is not None:
                loss = loss + aux_loss
            for key, value in stats.items():
                aux_stats[key] = aux_stats.get(key, 0.0) + value / accum
            with par.sync_context(i == accum - 1):
                (loss / accum).backward()
            total_loss += ce.detach() / accum
            total_z += z.detach() / accum
            if self.noise_scale is not None and i == 0:
                small_sq = accum**2 * grad_sq_norm(self.model.parameters())
        self.last_aux_stats = aux_stats
        if par.active:
            par.finish()
            grad_norm = par.clip_grad_norm(t.grad_clip if t.grad_clip > 0 else math.inf)
            return float(par.mean(total_loss)), float(par.mean(total_z)), float(grad_norm)
        params = [p for p in self.model.parameters() if p.grad is not None]
        if small_sq is not None:
            micro = self.micro_batch * self.context_length
            self.last_noise_scale = self.noise_scale.update(small_sq, micro, grad_sq_norm(params), micro * accum)
        self.last_aux_stats = aux_stats
        grad_norm = clip_grad_norm(params, t.grad_clip if t.grad_clip > 0 else math.inf)
        return float(total_loss), float(total_z), float(grad_norm)

    def _agree(self, seconds: float, preempt: bool, interrupt: bool = False) -> tuple[float, bool, bool]:
        """With several processes: the slowest rank's step time, whether any rank was asked to
        stop (preemption) and whether any was interrupted (Ctrl-C), so that every rank takes the
        same decisions (time budget, checkpoint and stop)."""
        if not self.parallel.active:
            return seconds, preempt, interrupt
        import torch.distributed as dist

        v = torch.tensor([seconds, float(preempt), float(interrupt)], dtype=torch.float64, device=self.device)
        dist.all_reduce(v, op=dist.ReduceOp.MAX)
        return float(v[0]), bool(v[1] > 0), bool(v[2] > 0)

    def plain_model(self) -> torch.nn.Module | None:
        """The trained model as one unsplit module (for sampling): the model itself (a copy with
        the averaged weights under train.ema_decay), or on rank 0 a copy with the gathered full
        state (collective for fsdp / tp / torch_fsdp); None on other ranks."""
        if not self.parallel.active:
            if self.ema is None:
                return self.model
            model = build_model(self.cfg.model, device=self.device)
            model.load_state_dict(self.ema.averaged_state(self.model))
            return model
        if self.parallel.strategy in ("fsdp", "tp", "torch_fsdp"):
            state = self.parallel.model_state()
            if not self.env.is_main:
                return None
            model = build_model(self.cfg.model, device=self.device)
            model.load_state_dict(state)
            return model
        return self.model if self.env.is_main else None

    def fit(self) -> dict:
        """Train to the budget, resuming first (:meth:`maybe_resume`; temporary files of killed
        checkpoint writes are removed before), then evaluate on the whole validation split, save
        the final checkpoint and return the summary.

        Raises preemption.Preempted after saving a checkpoint when Slurm's preemption or
        time-limit signal arrived; KeyboardInterrupt("at step N: saved <path>; resume with ...")
        after saving a checkpoint of the step in progress when Ctrl-C (SIGINT) arrived (a second
        Ctrl-C stops at once); NonFiniteError for a non-finite loss with ``train.on_nan=stop``.

        The run's metrics logged after the step training starts from (the restored checkpoint's,
        or 0) by an earlier attempt that was killed or requeued are dropped
        (``Run.drop_metrics_after``): this attempt logs those steps again, and each step appears
        once in metrics.jsonl."""
        if self.env.is_main:
            self.ckpt.remove_stale_temp_files()
        resumed = self.maybe_resume()
        drop = getattr(self.run, "drop_metrics_after", None)  # None: a stand-in run (library use)
        if drop is not None:
            drop(self.state.step)
        t, s = self.t, self.state
        log.info("model %s: %s parameters (%s non-embedding); %s train FLOPs/token; %d steps of %d tokens on %s (%s)%s",
                 self.summary["architecture"], f"{self.summary['params']['total']:,}",
                 f"{self.summary['params']['non_embedding']:,}", f"{self.summary['train_flops_per_token']:.3g}",
                 self.total_steps, self.tokens_per_step, self.device, self.precision,
                 f"; {self.env.world_size} processes, distributed.strategy={self.parallel.strategy}"
                 if self.parallel.active else "")
        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        bar = tqdm(total=self.total_steps if t.max_time is None else None, initial=s.step, unit="step",
                   desc="pretrain", disable=None if self.cfg.progress else True, dynamic_ncols=True,
                   leave=False)  # disable=None: a bar only on a terminal
        window_loss, window_steps, window_t0, window_tokens = 0.0, 0, time.perf_counter(), 0
        self._fit_t0, self._fit_step0, self._train_s_here = time.perf_counter(), s.step, 0.0
        last_line = time.perf_counter()
        profiler = self._profiler()
        self.model.train()
        with logging_redirect_tqdm(), preemption.cooperative(), preemption.interruptible(), \
                profiler or contextlib.nullcontext():
            while not self._done():
                t0 = time.perf_counter()
                lr = self.schedule(self._schedule_step())
                set_lr(self.optimizer, lr)
                loss, z, grad_norm = self.train_step()
                if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                    self.optimizer.zero_grad(set_to_none=True)
                    if t.on_nan == "stop":
                        last = self.ckpt.latest()
                        raise NonFiniteError(f"non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'} "
                                             f"at step {s.step + 1} (loss={loss}, grad_norm={grad_norm}); last good "
                                             f"checkpoint: {last or 'none'}")
                    s.skipped_steps += 1
                    log.warning("step %d: non-finite loss or gradients, step skipped (%d so far)", s.step + 1,
                                s.skipped_steps)
                    s.step += 1
                    bar.update(1)
                    continue
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                if self.ema is not None:
                    self.ema.update()
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                s.step += 1
                s.tokens += self.tokens_per_step
                step_seconds, stop, interrupt = self._agree(time.perf_counter() - t0, preemption.requested(),
                                                            preemption.interrupted())
                s.train_seconds += step_seconds
                self._train_s_here += step_seconds
                if profiler is not None:
                    profiler.step()
                window_loss += loss
                window_steps += 1
                window_tokens += self.tokens_per_step
                bar.update(1)
                if s.step % t.log_every == 0 or self._done():
                    elapsed = time.perf_counter() - window_t0
                    tps = window_tokens / max(elapsed, 1e-9)
                    metrics = {"loss": window_loss / window_steps, "lr": lr, "grad_norm": grad_norm, "tokens": s.tokens,
                               "tokens_per_s": tps, "memory_mb": memory_mb(self.device)}
                    if t.z_loss:
                        metrics["z_loss"] = z
                    if self.last_noise_scale is not None:
                        metrics["noise_scale_tokens"] = self.last_noise_scale
                    metrics.update(self.last_aux_stats)
                    if self.peak:
                        metrics["mfu"] = tps * self.summary["train_flops_per_token"] / self.peak
                    self.run.log(metrics, step=s.step)
                    s.history["step"].append(s.step)
                    s.history["loss"].append(metrics["loss"])
                    bar.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{tps:,.0f}")
                    log.info("%s: loss %.4f, lr %.3g, grad norm %.3f, %.0f tokens/s", self.progress_line(),
                             metrics["loss"], lr, grad_norm, tps)
                    window_loss, window_steps, window_t0, window_tokens = 0.0, 0, time.perf_counter(), 0
                    last_line = time.perf_counter()
                elif time.perf_counter() - last_line >= LOG_EVERY_S:  # a line at least every ~10 s
                    tps = window_tokens / max(time.perf_counter() - window_t0, 1e-9)
                    log.info("%s: loss %.4f, %.0f tokens/s", self.progress_line(), window_loss / window_steps, tps)
                    last_line = time.perf_counter()
                if s.step % t.eval_every == 0 and not self._done():
                    self._log_eval(t.eval_tokens)
                    window_t0 = last_line = time.perf_counter()  # evaluation time is not training throughput
                if t.checkpoint_every and s.step % t.checkpoint_every == 0 and not self._done():
                    self.save()
                    window_t0 = time.perf_counter()
                if stop:  # Slurm's preemption/time-limit signal (on any rank): save, then requeue
                    path = self.save()
                    bar.close()
                    raise preemption.Preempted(f"preempted at step {s.step}: saved {path}; the job is requeued and "
                                               "resumes from it")
                if interrupt:  # Ctrl-C (on any rank): save the step just taken, then stop
                    path = self.save()
                    bar.close()
                    raise KeyboardInterrupt(f"at step {s.step}: saved {path}; resume with hydra.run.dir={self.run.dir}")
        bar.close()
        if profiler is not None:
            self._write_profile(profiler)
        if s.final_eval is not None and s.final_eval.get("step") == s.step:  # a restart of a finished run
            final = {k: v for k, v in s.final_eval.items() if k != "step"}
            path = self.ckpt.path(s.step)
            log.info("step %d: training was already finished; validation loss %.4f (from %s)", s.step,
                     final["val_loss"], path.name)
        else:
            final = self._log_eval(None)
            s.final_eval = {"step": s.step, **final}
            path = self.save()
        summary = {"steps": s.step, "tokens": s.tokens, "train_seconds": round(s.train_seconds, 3),
                   "tokens_per_s": s.tokens / max(s.train_seconds, 1e-9), "final_train_loss": s.history["loss"][-1]
                   if s.history["loss"] else None, **final, "skipped_steps": s.skipped_steps,
                   "params": self.summary["params"]["total"], "params_non_embedding": self.summary["params"]["non_embedding"],
                   "train_flops": 3 * self.summary["forward_flops_per_token"]["total"] * s.tokens,
                   "resumed": resumed, "checkpoint": str(path)}
        if t.max_flops is not None:
            summary["compute_budget"] = float(t.max_flops)
        if self.peak:
            summary["mfu"] = summary["tokens_per_s"] * self.summary["train_flops_per_token"] / self.peak
        if self.parallel.active:
            summary.update(world_size=self.env.world_size, strategy=self.parallel.strategy,
                           memory_bytes_per_rank=self.parallel.memory_bytes())
        return summary

    def _profiler(self):
        """A ``torch.profiler.profile`` recording steps 3-7 (``train.profile``), or None."""
        if not self.t.profile or not self.env.is_main:
            return None
        from torch.profiler import ProfilerActivity, profile, schedule

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        wait, warmup, active = PROFILE_SCHEDULE
        return profile(activities=activities, schedule=schedule(wait=wait, warmup=warmup, active=active, repeat=1),
                       record_shapes=True, profile_memory=True)

    def _write_profile(self, profiler) -> None:
        # the schedule's window (steps 3-7) is complete only after 7 steps in this process: a shorter run
        # would leave a partial (or empty) profile under the name of steps 3-7
        recorded, needed = int(getattr(profiler, "step_num", 0)), sum(PROFILE_SCHEDULE)
        if recorded < needed:
            log.warning("train.profile: no profile recorded; the run had %d steps, the profile needs %d", recorded,
                        needed)
            return
        out = Path(self.run.dir) / "profile"
        table = profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=40)
        out.mkdir(parents=True, exist_ok=True)
        profiler.export_chrome_trace(str(out / "trace.json"))
        (out / "ops.txt").write_text(table + "\n")
        log.info("profile of steps 3-7: %s (chrome://tracing or ui.perfetto.dev), %s", out / "trace.json",
                 out / "ops.txt")

    def _log_eval(self, max_tokens: int | None) -> dict:
        r = self.evaluate(max_tokens)
        s = self.state
        s.best_val_loss = min(s.best_val_loss, r["val_loss"])
        s.history["val_step"].append(s.step)
        s.history["val_loss"].append(r["val_loss"])
        self.run.log(r, step=s.step)
        log.info("step %d: validation loss %.4f, perplexity %.2f, %.4f bits/byte (%d tokens)", s.step, r["val_loss"],
                 r["val_perplexity"], r["val_bpb"], r["val_tokens"])
        return r


def plot_loss_curve(history: dict, out: Path, title: str) -> None:
    """Train (and validation) loss against step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    ax.plot(history["step"], history["loss"], label="train")
    if history["val_step"]:
        ax.plot(history["val_step"], history["val_loss"], "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, out)
