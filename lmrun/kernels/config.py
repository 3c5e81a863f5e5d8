"""Config schema of the `benchmark` group (``stage=benchmark``; presets in ``conf/benchmark/``)
and its validation. No torch import: the CLI loads this to compose and validate.

Three kinds of benchmark share the schema; each preset sets the keys its kind reads:

- ``attention``: Q, K, V of shape ``(batch_size, num_heads, seq_len, head_dim)`` for every
  ``seq_lens`` × ``head_dims`` × ``dtypes``, over ``impls`` (see :data:`ATTENTION_IMPLS`).
- ``rmsnorm``: ``rows`` × ``d_model`` inputs for every ``d_models`` × ``dtypes``, over ``impls``
  (see :data:`RMSNORM_IMPLS`).
- ``model``: the LM (``model`` group, with each size preset of ``sizes``) on ``batch_size`` ×
  ``context_length`` tokens, for every ``dtypes`` (fp32, or bf16/fp16 autocast) × ``compile``.
- ``collectives``: ``impls`` ⊆ all_reduce, all_gather, reduce_scatter on float32 buffers of
  ``sizes_mb`` MiB, for every ``world_sizes`` × ``backends`` (local processes).
- ``gpu_acceptance``: ``lmrun.kernels.acceptance`` — the GPU acceptance check (correctness and
  speed of the kernels, training step, inference against targets) within ``budget_s`` seconds,
  ``parts`` ⊆ env, flash, rmsnorm, train, inference.
- ``ddp``: one training step of the LM at each ``sizes`` preset on a global batch of
  ``batch_size`` × ``context_length``, per distributed strategy in ``impls`` (and ``local``: the
  same per-rank work without communication), for every ``world_sizes`` (gloo, CPU).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from lmrun.errors import check, check_choice

BENCHMARK_KINDS = ["attention", "rmsnorm", "model", "collectives", "ddp", "inference", "gpu_acceptance"]
#: benchmark=gpu_acceptance: the parts of ``lmrun.kernels.acceptance``, in order
ACCEPTANCE_PARTS = ["env", "flash", "rmsnorm", "train", "inference"]
COLLECTIVE_OPS = ["all_reduce", "all_gather", "reduce_scatter"]
#: benchmark=ddp: the strategies of ``lmrun.distributed`` plus ``local`` (no communication)
DDP_IMPLS = ["local", "ddp_naive", "ddp_flat", "ddp", "ddp_bucketed", "zero1", "fsdp", "tp", "torch_ddp", "torch_fsdp"]
ATTENTION_IMPLS = ["naive", "compiled", "sdpa", "sdpa_math", "flash_torch", "flash_triton"]
RMSNORM_IMPLS = ["torch", "compiled", "functional", "triton"]
TRITON_IMPLS = {"flash_triton", "triton"}
KERNEL_PASSES = ["forward", "backward", "forward_backward"]
MODEL_PASSES = ["forward", "forward_backward", "step"]
DTYPES = ["fp32", "bf16", "fp16"]


@dataclass
class BenchmarkConfig:
    """``benchmark`` (``stage=benchmark``; ``lmrun.stages.benchmark``).

    kind: attention | rmsnorm | model (what is timed; the preset picks it).
    device: auto (CUDA if available, else CPU), cpu or cuda.
    impls: implementations compared (attention: naive, compiled — ``torch.compile`` of naive —,
        sdpa, sdpa_math — SDPA's math backend —, flash_torch, flash_triton; rmsnorm: torch,
        compiled, functional — ``torch.nn.functional.rms_norm`` —, triton). Triton ones run on
        CUDA only (on a CPU they are skipped with a note). Ignored by kind model.
    baseline: the impl (kind model: the variant label, e.g. ``fp32``) speed-ups are relative to.
    passes: attention/rmsnorm: forward, backward, forward_backward; model: forward,
        forward_backward, step (forward, backward and the optimizer step).
    dtypes: fp32 | bf16 | fp16 — input dtype (kernels) or autocast dtype (model; fp32: none).
    batch_size, num_heads, seq_lens, head_dims, is_causal: attention shapes (model: batch_size).
    rows, d_models: RMSNorm inputs are ``(rows, d_model)``.
    sizes: model size presets (``conf/model/size/``); context_length: tokens per sequence;
        compile: list of false/true (``torch.compile`` the model).
    warmup_ms, rep_ms, min_reps: timing — warm-up for at least warmup_ms, then repeat for about
        rep_ms (at least min_reps calls); median and 20th/80th percentiles are reported
        (``triton.testing.do_bench`` on CUDA, a synchronised wall-clock timer on CPU).
    peak_flops: the device's peak FLOP/s for MFU (null: known GPUs only).
    threads: CPU intra-op threads (``torch.set_num_threads``; null: PyTorch's default). On a
        loaded machine 1 avoids OpenMP spin contention, which can slow small ops 100-fold.
    profile: also write a ``torch.profiler`` trace per implementation (first grid point) and, on
        CUDA, a memory snapshot (``profile/``).
    plot: write ``benchmark.png``.
    batch_sizes, new_tokens, speculative_ks, memory_bandwidth: kind inference
        (``lmrun.inference.bench``): prompts per batch, greedy tokens decoded per prompt
        (prompt lengths: seq_lens; models: sizes), draft tokens per speculative round, and the
        device's memory bandwidth in bytes/s (null: the bandwidth fraction is not reported).
    budget_s, parts: kind gpu_acceptance — the whole run's time budget in seconds, and which
        parts run (env, flash, rmsnorm, train, inference).
    """

    kind: str = "attention"
    device: str = "auto"
    impls: list[str] = field(default_factory=lambda: ["naive", "sdpa", "flash_torch", "flash_triton"])
    baseline: str = "naive"
    passes: list[str] = field(default_factory=lambda: ["forward", "forward_backward"])
    dtypes: list[str] = field(default_factory=lambda: ["fp32"])
    batch_size: int = 1
    num_heads: int = 4
    seq_lens: list[int] = field(default_factory=lambda: [128, 256, 512])
    head_dims: list[int] = field(default_factory=lambda: [32, 64])
    is_causal: bool = True
    rows: int = 4096
    d_models: list[int] = field(default_factory=lambda: [256, 1024])
    sizes: list[str] = field(default_factory=lambda: ["tiny"])
    context_length: int = 128
    compile: list[bool] = field(default_factory=lambda: [False])
    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    min_reps: int = 5
    peak_flops: float | None = None
    threads: int | None = None
    profile: bool = False
    plot: bool = True
    sizes_mb: list[float] = field(default_factory=lambda: [1.0, 16.0, 64.0])
    world_sizes: list[int] = field(default_factory=lambda: [2])
    backends: list[str] = field(default_factory=lambda: ["gloo"])
    bucket_size_mb: float = 25.0
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8])
    new_tokens: int = 64
    speculative_ks: list[int] = field(default_factory=lambda: [2, 4])
    memory_bandwidth: float | None = None
    budget_s: float = 420.0
    parts: list[str] = field(default_factory=lambda: list(ACCEPTANCE_PARTS))


def model_variant(dtype: str, compiled: bool) -> str:
    """The label of a model-benchmark variant: ``fp32``, ``bf16``, ``fp32+compile``, ..."""
    return dtype + ("+compile" if compiled else "")


def _nonempty_positive(key: str, values) -> None:
    check(key, list(values), len(values) > 0 and all(int(v) >= 1 for v in values), "a non-empty list of integers >= 1")


def validate_benchmark(cfg: BenchmarkConfig) -> None:
    """Raise ConfigError (key, value, what is allowed) for an impossible benchmark config."""
    check_choice("benchmark.kind", cfg.kind, BENCHMARK_KINDS)
    check_choice("benchmark.device", cfg.device, ["auto", "cpu", "cuda"])
    for d in cfg.dtypes:
        check_choice("benchmark.dtypes", d, DTYPES)
    check("benchmark.dtypes", list(cfg.dtypes), len(cfg.dtypes) > 0, "a non-empty list")
    if cfg.kind == "gpu_acceptance":
        check("benchmark.budget_s", cfg.budget_s, cfg.budget_s > 0, "seconds > 0")
        check("benchmark.parts", list(cfg.parts), len(cfg.parts) > 0 and all(p in ACCEPTANCE_PARTS for p in cfg.parts),
              f"a non-empty list of {', '.join(ACCEPTANCE_PARTS)}")
        return
    passes = MODEL_PASSES if cfg.kind == "model" else KERNEL_PASSES
    if cfg.kind in ("collectives", "ddp"):
        passes = passes + ["collective", "step"]
    check("benchmark.passes", list(cfg.passes), len(cfg.passes) > 0 and all(p in passes for p in cfg.passes),
          f"a non-empty list of {', '.join(passes)} (benchmark.kind={cfg.kind})")
    for key in ("batch_size", "num_heads", "rows", "context_length", "min_reps"):
        check(f"benchmark.{key}", getattr(cfg, key), getattr(cfg, key) >= 1, "an integer >= 1")
    check("benchmark.warmup_ms", cfg.warmup_ms, cfg.warmup_ms >= 0, "a number of milliseconds >= 0")
    check("benchmark.rep_ms", cfg.rep_ms, cfg.rep_ms > 0, "a number of milliseconds > 0")
    if cfg.threads is not None:
        check("benchmark.threads", cfg.threads, cfg.threads >= 1, "null or an integer >= 1")
    if cfg.peak_flops is not None:
        check("benchmark.peak_flops", cfg.peak_flops, cfg.peak_flops > 0, "null or FLOP/s > 0")
    if cfg.kind in ("collectives", "ddp"):
        allowed = COLLECTIVE_OPS if cfg.kind == "collectives" else DDP_IMPLS
        check("benchmark.impls", list(cfg.impls), len(cfg.impls) > 0 and all(i in allowed for i in cfg.impls),
              f"a non-empty list of {', '.join(allowed)} (benchmark.kind={cfg.kind})")
        check("benchmark.baseline", cfg.baseline, cfg.baseline in cfg.impls, f"one of benchmark.impls ({', '.join(cfg.impls)})")
        check("benchmark.world_sizes", list(cfg.world_sizes), len(cfg.world_sizes) > 0
              and all(int(w) >= 2 for w in cfg.world_sizes), "a non-empty list of integers >= 2")
        for b in cfg.backends:
            check_choice("benchmark.backends", b, ["gloo", "nccl"])
        check("benchmark.sizes_mb", list(cfg.sizes_mb), len(cfg.sizes_mb) > 0 and all(v > 0 for v in cfg.sizes_mb),
              "a non-empty list of MiB > 0")
        check("benchmark.bucket_size_mb", cfg.bucket_size_mb, cfg.bucket_size_mb > 0, "MiB > 0")
        return
    if cfg.kind == "inference":
        check("benchmark.sizes", list(cfg.sizes), len(cfg.sizes) > 0, "a non-empty list of model size presets")
        _nonempty_positive("benchmark.batch_sizes", cfg.batch_sizes)
        _nonempty_positive("benchmark.seq_lens", cfg.seq_lens)
        _nonempty_positive("benchmark.speculative_ks", cfg.speculative_ks)
        check("benchmark.new_tokens", cfg.new_tokens, cfg.new_tokens >= 1, "an integer >= 1")
        return
    if cfg.kind == "model":
        check("benchmark.sizes", list(cfg.sizes), len(cfg.sizes) > 0, "a non-empty list of model size presets")
        check("benchmark.compile", list(cfg.compile), len(cfg.compile) > 0, "a non-empty list of true/false")
        variants = [model_variant(d, c) for d in cfg.dtypes for c in cfg.compile]
        check("benchmark.baseline", cfg.baseline, cfg.baseline in variants,
              f"one of the variants {', '.join(variants)} (dtype[+compile])")
        return
    allowed = ATTENTION_IMPLS if cfg.kind == "attention" else RMSNORM_IMPLS
    check("benchmark.impls", list(cfg.impls), len(cfg.impls) > 0 and all(i in allowed for i in cfg.impls),
          f"a non-empty list of {', '.join(allowed)} (benchmark.kind={cfg.kind})")
    check("benchmark.baseline", cfg.baseline, cfg.baseline in cfg.impls, f"one of benchmark.impls ({', '.join(cfg.impls)})")
    if cfg.kind == "attention":
        _nonempty_positive("benchmark.seq_lens", cfg.seq_lens)
        _nonempty_positive("benchmark.head_dims", cfg.head_dims)
    else:
        _nonempty_positive("benchmark.d_models", cfg.d_models)
