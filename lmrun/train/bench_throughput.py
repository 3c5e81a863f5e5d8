"""Training throughput: lmrun's training step against a straightforward PyTorch implementation
of the same model and batch, in the same run.

The baseline (:class:`NaiveLM`) is what one writes first: ``nn.Linear`` / ``nn.Embedding``,
RMSNorm, RoPE and SwiGLU as plain tensor expressions, attention as ``softmax(QKᵀ/√d + mask) V``
materialising the (seq × seq) matrix, ``F.cross_entropy``, ``torch.optim.AdamW``, no compile.
lmrun's step is the pretrain stage's: :class:`lmrun.model.TransformerLM` built from the config
(SDPA attention by default), the fused LM-head loss (``train.fused_loss``), lmrun's optimizer,
glibc's heap kept between steps on CPU (``train.keep_heap_memory``) and ``train.compile`` if set.
A third contender, ``baseline_heap``, is the baseline with lmrun's allocator setting, so the
table separates what the allocator gives from what the model and loss code give.
All use the same shapes, batch, parameter count (checked) and thread count; steps alternate in
rounds so machine load hits them alike; tokens/s is the median over rounds and a ratio the median
of the per-round ratios.

Usage::

    python -m lmrun.train.bench_throughput [--steps 20] [--rounds 3] [--compile] [overrides ...]

Overrides are lmrun config overrides (e.g. ``model/size=tiny train.batch_size=16``); the default
is the main job's configuration.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn


class NaiveBlock(nn.Module):
    def __init__(self, d_model: int, num_heads: int, d_ff: int, theta: float, context_length: int, dropout: float = 0.0):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.h, self.dk = num_heads, d_model // num_heads
        self.q_proj, self.k_proj, self.v_proj, self.output_proj = (nn.Linear(d_model, d_model, bias=False)
                                                                    for _ in range(4))
        self.w1 = nn.Linear(d_model, d_ff, bias=False)
        self.w2 = nn.Linear(d_ff, d_model, bias=False)
        self.w3 = nn.Linear(d_model, d_ff, bias=False)
        self.ln1 = nn.Parameter(torch.ones(d_model))
        self.ln2 = nn.Parameter(torch.ones(d_model))
        self.theta = theta

    @staticmethod
    def rmsnorm(x, w, eps=1e-5):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    def rope(self, x):  # x: (b, h, s, dk); cos/sin recomputed every call
        s = x.shape[-2]
        inv = self.theta ** (-torch.arange(0, self.dk, 2, dtype=torch.float32) / self.dk)
        ang = torch.arange(s, dtype=torch.float32)[:, None] * inv[None, :]
        cos, sin = ang.cos(), ang.sin()
        x1, x2 = x[..., 0::2], x[..., 1::2]
        out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
        return out.flatten(-2)

    def forward(self, x):
        b, s, d = x.shape
        h = self.rmsnorm(x, self.ln1)
        q, k, v = (p(h).view(b, s, self.h, self.dk).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        q, k = self.rope(q), self.rope(k)
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.dk)
        mask = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1)
        att = torch.softmax(scores.masked_fill(mask, float("-inf")), dim=-1)
        x = x + self.drop(self.output_proj((att @ v).transpose(1, 2).reshape(b, s, d)))
        h = self.rmsnorm(x, self.ln2)
        return x + self.drop(self.w2(F.silu(self.w1(h)) * self.w3(h)))


class NaiveLM(nn.Module):
    """A straightforward pre-norm SwiGLU/RoPE Transformer LM (the benchmark's baseline)."""

    def __init__(self, vocab_size, context_length, d_model, num_layers, num_heads, d_ff, theta=10000.0, dropout=0.0):
        super().__init__()
        self.token_embeddings = nn.Embedding(vocab_size, d_model)
        self.drop = nn.Dropout(dropout)  # embedding and residual-branch dropout, as lmrun's model
        self.layers = nn.ModuleList(NaiveBlock(d_model, num_heads, d_ff, theta, context_length, dropout)
                                    for _ in range(num_layers))
        self.ln_final = nn.Parameter(torch.ones(d_model))
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)

    def forward(self, ids):
        x = self.drop(self.token_embeddings(ids))
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(NaiveBlock.rmsnorm(x, self.ln_final))


def paired_ratio(ours: list[float], base: list[float]) -> float:
    """Median over rounds of the per-round tokens/s ratio: each round's contenders ran back to back,
    so a load change on the shared machine between rounds cancels out."""
    return round(statistics.median(a / b for a, b in zip(ours, base)), 3)


def run_benchmark(overrides: list[str], steps: int, rounds: int, compile_ours: bool) -> dict:
    from lmrun.cli import compose
    from lmrun.model import build_model
    from lmrun.model.config import as_model_config, resolved_d_ff
    from lmrun.optim import build_optimizer, clip_grad_norm
    from lmrun.train.loss import cross_entropy_with_z, linear_cross_entropy
    from lmrun.train.trainer import keep_heap_memory

    cfg = compose(["stage=pretrain", *overrides])
    mc = as_model_config(cfg.model)
    if mc.ffn.kind != "swiglu" or mc.position.kind != "rope" or mc.norm.kind != "rmsnorm":
        raise SystemExit("the baseline implements pre-RMSNorm + SwiGLU + RoPE; use model=swiglu_rope")
    torch.manual_seed(0)
    batch, ctx = int(cfg.train.batch_size), int(mc.context_length)
    x = torch.randint(0, mc.vocab_size, (batch, ctx))
    y = torch.randint(0, mc.vocab_size, (batch, ctx))

    ours = build_model(mc)
    ours_fwd = torch.compile(ours) if compile_ours else ours
    ours_opt = build_optimizer(ours, cfg.optimizer)
    base = NaiveLM(mc.vocab_size, ctx, mc.d_model, mc.num_layers, mc.num_heads, resolved_d_ff(mc), mc.position.theta,
                   mc.dropout)
    base_opt = torch.optim.AdamW(base.parameters(), lr=float(cfg.optimizer.lr),
                                 weight_decay=float(cfg.optimizer.weight_decay))
    n_ours = sum(p.numel() for p in ours.parameters())
    n_base = sum(p.numel() for p in base.parameters())
    if n_ours != n_base:
        raise SystemExit(f"parameter counts differ: lmrun {n_ours}, baseline {n_base}")

    fused = bool(cfg.train.fused_loss) and ours.logit_softcap is None

    def step_ours():
        if fused:
            ce = linear_cross_entropy(ours_fwd(x, return_hidden=True), ours.lm_head.weight, y)[0]
        else:
            ce, _ = cross_entropy_with_z(ours_fwd(x), y, 0.0)
        ce.backward()
        clip_grad_norm([p for p in ours.parameters() if p.grad is not None], 1.0)
        ours_opt.step()
        ours_opt.zero_grad(set_to_none=True)

    def step_base():
        loss = F.cross_entropy(base(x).view(-1, mc.vocab_size), y.view(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(base.parameters(), 1.0)
        base_opt.step()
        base_opt.zero_grad(set_to_none=True)

    heap = bool(cfg.train.keep_heap_memory)
    contenders = [("lmrun", step_ours, heap), ("baseline", step_base, False)]
    if heap:
        contenders.append(("baseline_heap", step_base, True))
    for _, fn, keep in contenders:  # warm-up (and compilation)
        keep_heap_memory(keep)
        for _ in range(3):
            fn()
    times = {name: [] for name, _, _ in contenders}
    for _ in range(rounds):
        for name, fn, keep in contenders:
            keep_heap_memory(keep)
            t0 = time.perf_counter()
            for _ in range(steps):
                fn()
            times[name].append(batch * ctx * steps / (time.perf_counter() - t0))
    tps = {k: statistics.median(v) for k, v in times.items()}
    return {"config": overrides, "params": n_ours, "batch": batch, "context_length": ctx, "threads": torch.get_num_threads(),
            "compile": compile_ours, "fused_loss": fused, "keep_heap_memory": heap,
            "tokens_per_s": {k: round(v, 1) for k, v in tps.items()},
            "ratio": paired_ratio(times["lmrun"], times["baseline"]),
            **({"ratio_vs_baseline_heap": paired_ratio(times["lmrun"], times["baseline_heap"])} if heap else {}),
            "rounds": {k: [round(v, 1) for v in vals] for k, vals in times.items()}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lmrun.train.bench_throughput", description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--compile", action="store_true", help="torch.compile lmrun's model (train.compile=true)")
    ap.add_argument("--json", default=None)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    r = run_benchmark(args.overrides, args.steps, args.rounds, args.compile)
    print(json.dumps(r, indent=2))
    if args.json:
        from lmrun.tracking.files import atomic_write_json

        atomic_write_json(args.json, r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
