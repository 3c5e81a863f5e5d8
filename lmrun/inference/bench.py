"""``stage=benchmark benchmark=inference``: prefill and decode throughput, cached vs uncached,
weight-only int8, speculative decoding — each against the uncached baseline in the same run.

Per size preset × batch size × prompt length (``benchmark.sizes``, ``batch_sizes``,
``seq_lens``), a randomly initialised model (fixed seed) decodes ``new_tokens`` greedy tokens:

- ``prefill``: one cached forward pass over the prompts (tokens/s = batch·prompt / time);
- ``decode``: the ``new_tokens`` steps after it — ``uncached`` (full recomputation each step,
  the baseline), ``cached``, ``cached_int8`` (weight-only int8 linears) and, at batch 1,
  ``spec_k{k}`` (speculative decoding; the draft is the int8 copy of the target — self-speculation,
  since random weights give a trained draft nothing to agree on; acceptance is reported).
  The implementations take turns, ``min_reps`` rounds; tokens/s is from the median decode time,
  the speed-up is the median over rounds of ``uncached time / time`` (paired, as the load of a
  shared machine drifts).

Also: cache bytes, and the bytes a decode step must read (weights + cache) per token against
``benchmark.memory_bandwidth`` (bytes/s; null: not reported) — how close to the memory-bound limit.
"""
from __future__ import annotations

import copy
import statistics
import time

import torch

from lmrun.inference.engine import InferenceEngine, SamplingParams
from lmrun.inference.kv_cache import InferenceCache, forward_cached
from lmrun.inference.quantize import quantize_int8, weight_bytes


def _time(fn, reps: int) -> tuple[float, object]:
    out, times = None, []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def inference_rows(cfg, device: torch.device) -> list[dict]:
    from lmrun.model import build_model
    from lmrun.train.bench_model import size_model_config

    b = cfg.benchmark
    rows: list[dict] = []
    reps = max(1, int(b.min_reps))
    for size in b.sizes:
        mc = size_model_config(cfg.model, size)
        torch.manual_seed(int(cfg.seed))
        model = build_model(mc, device=device).eval()
        q8 = quantize_int8(copy.deepcopy(model))
        n_new = int(b.new_tokens)
        for batch in b.batch_sizes:
            for prompt in b.seq_lens:
                if prompt + n_new > mc.context_length:
                    continue
                gen = torch.Generator().manual_seed(int(cfg.seed))
                ids = torch.randint(0, mc.vocab_size, (batch, prompt), generator=gen).tolist()
                common = {"size": size, "batch": batch, "prompt": prompt}

                def prefill(model=model, ids=ids):
                    cache = InferenceCache(model, len(ids), len(ids[0]))
                    with torch.no_grad():
                        forward_cached(model, torch.tensor(ids, device=device), cache)
                    return cache

                t, cache = _time(prefill, reps)
                rows.append({**common, "pass": "prefill", "impl": "cached", "status": "ok", "median_ms": t * 1e3,
                             "tokens_per_s": batch * prompt / t, "note": ""})
                params = SamplingParams(max_new_tokens=n_new, temperature=0)
                variants = [("uncached", InferenceEngine(model, use_cache=False)), ("cached", InferenceEngine(model)),
                            ("cached_int8", InferenceEngine(q8))]
                if batch == 1:
                    variants += [(f"spec_k{k}", InferenceEngine(model, draft_model=q8, speculative_k=int(k)))
                                 for k in b.speculative_ks]
                # rounds alternate the implementations, so that each speed-up compares decode times
                # taken together (a shared machine's load drifts): the median of the per-round ratios
                decode_s: dict[str, list[float]] = {impl: [] for impl, _ in variants}
                for _ in range(reps):
                    for impl, engine in variants:
                        t0 = time.perf_counter()
                        engine.generate(ids, params)
                        wall = time.perf_counter() - t0
                        decode_s[impl].append(engine.last_stats.decode_s if engine.last_stats.decode_s > 0 else wall)
                for impl, engine in variants:
                    st, dec = engine.last_stats, statistics.median(decode_s[impl])
                    ratios = [u / d for u, d in zip(decode_s["uncached"], decode_s[impl])]
                    row = {**common, "pass": "decode", "impl": impl, "status": "ok", "median_ms": dec * 1e3,
                           "tokens_per_s": batch * n_new / dec, "note": "",
                           "acceptance": st.acceptance_rate, "speedup": statistics.median(ratios)}
                    m = q8 if impl == "cached_int8" else model
                    full = InferenceCache(m, batch, prompt + n_new)
                    row["cache_mb"] = full.nbytes() / 2**20 if impl != "uncached" else None
                    if impl in ("cached", "cached_int8"):
                        per_token = (weight_bytes(m) + full.nbytes() / 2) / batch  # weights + average cache read
                        row["bytes_per_token"] = per_token
                        if b.memory_bandwidth:
                            row["bandwidth_frac"] = per_token * row["tokens_per_s"] / float(b.memory_bandwidth)
                    rows.append(row)
                del cache
    for r in rows:  # decode: median over rounds of (uncached time / this time); prefill: none
        r.setdefault("speedup", None)
    return rows


def inference_markdown(rows: list[dict], title: str) -> str:
    from lmrun.tracking.tables import pivot_markdown

    keys = ["size", "batch", "prompt"]
    tps = pivot_markdown(rows, keys, lambda r: f"{r['tokens_per_s']:,.0f}"
                         + (f" ({r['speedup']:.2f}×)" if r.get("speedup") else ""))
    acc = [r for r in rows if r.get("acceptance") is not None]
    parts = [f"# {title}", "", "Tokens per second (decode: speed-up against `uncached`, full recomputation each step).",
             "", tps, "", "Cache memory (MiB) at prompt + new tokens.", "",
             pivot_markdown([r for r in rows if r.get("cache_mb") is not None], keys,
                            lambda r: f"{r['cache_mb']:.3g}")]
    if acc:
        parts += ["", "Speculative decoding: acceptance rate (draft = the int8 copy of the target).", "",
                  pivot_markdown(acc, keys, lambda r: f"{r['acceptance']:.2f}")]
    mem = [r for r in rows if r.get("bytes_per_token")]
    if mem:
        parts += ["", "Bytes read per decoded token (weights + cache)"
                  + (", and the fraction of the memory bandwidth it reaches." if any("bandwidth_frac" in r for r in mem)
                     else "."), "",
                  pivot_markdown(mem, keys, lambda r: f"{r['bytes_per_token'] / 2**20:.3g} MiB"
                                 + (f" ({r['bandwidth_frac']:.1%})" if "bandwidth_frac" in r else ""))]
    return "\n".join(parts) + "\n"


def plot_inference(rows: list[dict], path, title: str) -> None:
    """Decode tokens/s (log scale) against batch size, one line per implementation × model size
    × prompt length; speculative rows (batch 1 only) are points. PNG written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lmrun.tracking.files import save_figure

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    lines: dict[str, list[dict]] = {}
    for r in rows:
        if r["pass"] == "decode" and r["status"] == "ok":
            lines.setdefault(f"{r['impl']} {r['size']} prompt {r['prompt']}", []).append(r)
    for label, rs in lines.items():
        rs = sorted(rs, key=lambda r: r["batch"])
        ax.plot([r["batch"] for r in rs], [r["tokens_per_s"] for r in rs], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch (prompts decoded together)")
    ax.set_ylabel("decode tokens/s")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    if lines:
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
