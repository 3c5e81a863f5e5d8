"""The model grid of ``stage=benchmark benchmark=model``: forward, forward+backward and full
training-step time of the LM for each size preset, with and without mixed precision (autocast)
and ``torch.compile``; tokens/s and model FLOPs utilisation (MFU).

A step is the pretrain stage's: lmrun's cross-entropy, backward, gradient clipping at 1.0 and
the ``optimizer`` group's optimizer. ``forward`` runs without autograd (inference); the others
build the graph. FLOPs per token are ``lmrun.model.flops.forward_flops_per_token`` (×3 for a
training step, Kaplan et al. 2020 / CS336's accounting); MFU needs the device's peak FLOP/s
(known GPUs, or ``benchmark.peak_flops``). Source: CS336 assignment 2 (end-to-end benchmarking).
"""
from __future__ import annotations

import contextlib

import torch
from omegaconf import OmegaConf

from lmrun.errors import ConfigError
from lmrun.kernels.benchmark import TORCH_DTYPES, Case
from lmrun.kernels.config import model_variant
from lmrun.model.config import ModelConfig, as_model_config


def size_model_config(model_cfg, size: str) -> ModelConfig:
    """``model_cfg`` (the composed ``cfg.model``) with the shape keys of the size preset
    ``conf/model/size/<size>.yaml``; ConfigError for an unknown preset."""
    from lmrun.cli import CONF_DIR

    path = CONF_DIR / "model" / "size" / f"{size}.yaml"
    if not path.is_file():
        options = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise ConfigError(f"benchmark.sizes: {size!r} is not a model size preset; available: {', '.join(options)}")
    base = OmegaConf.to_container(model_cfg, resolve=True) if not isinstance(model_cfg, dict) else dict(model_cfg)
    merged = OmegaConf.merge(base, OmegaConf.load(path))
    return as_model_config(OmegaConf.to_container(merged))


def model_cases(cfg, device: torch.device) -> list[Case]:
    """One case per size × dtype × compile × pass; the model and batch of a (size, dtype,
    compile) variant are built when its first pass runs and shared by its passes."""
    from lmrun.model.flops import count_params, forward_flops_per_token

    b = cfg.benchmark
    ctx = int(b.context_length)
    cases = []
    for size in b.sizes:
        mc = size_model_config(cfg.model, size)
        mc.context_length = max(int(mc.context_length), ctx)
        fwd = forward_flops_per_token(mc, ctx)["total"]
        params = count_params(mc)["total"]
        for dtype in b.dtypes:
            for compiled in b.compile:
                state: dict = {}
                for pass_ in b.passes:
                    extra = {"tokens": int(b.batch_size) * ctx, "params": params,
                             "flops_per_token": fwd if pass_ == "forward" else 3 * fwd}
                    cases.append(Case({"size": size, "batch": int(b.batch_size), "context": ctx},
                                      model_variant(dtype, bool(compiled)), pass_,
                                      fn=_model_pass(cfg, mc, dtype, bool(compiled), pass_, device, state), extra=extra))
    return cases


def _model_pass(cfg, mc: ModelConfig, dtype: str, compiled: bool, pass_: str, device: torch.device, state: dict):
    def build():
        from lmrun.model import build_model
        from lmrun.optim import build_optimizer

        torch.manual_seed(int(cfg.seed))
        model = build_model(mc, device=device)
        g = torch.Generator(device=device).manual_seed(0)
        shape = (int(cfg.benchmark.batch_size), int(cfg.benchmark.context_length))
        state.update(model=model, run=torch.compile(model) if compiled else model,
                     optimizer=build_optimizer(model, cfg.optimizer),
                     x=torch.randint(0, mc.vocab_size, shape, generator=g, device=device),
                     y=torch.randint(0, mc.vocab_size, shape, generator=g, device=device))

    def autocast():
        if dtype == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=TORCH_DTYPES[dtype])

    def loss():
        from lmrun.train.loss import cross_entropy_with_z

        with autocast():
            ce, _ = cross_entropy_with_z(state["run"](state["x"]), state["y"], 0.0)
        return ce

    def run():
        if "model" not in state:
            build()
        if pass_ == "forward":
            with torch.no_grad(), autocast():
                return state["run"](state["x"])
        from lmrun.optim import clip_grad_norm

        ce = loss()
        ce.backward()
        if pass_ == "step":
            model = state["model"]
            clip_grad_norm([p for p in model.parameters() if p.grad is not None], 1.0)
            state["optimizer"].step()
        state["optimizer"].zero_grad(set_to_none=True)
        return ce
    return run


def add_throughput(rows: list[dict], peak_flops: float | None) -> None:
    """Add ``tokens_per_s`` and ``mfu`` (FLOPs per token × tokens/s ÷ peak FLOP/s; None without a
    peak) to model-benchmark rows that were timed."""
    for r in rows:
        ms = r.get("median_ms")
        r["tokens_per_s"] = r["tokens"] / (ms / 1000) if ms else None
        r["mfu"] = (r["flops_per_token"] * r["tokens_per_s"] / peak_flops) if (ms and peak_flops) else None
