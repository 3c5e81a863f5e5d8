"""Results of a sweep as tables: one row per job (its overrides joined with its ``summary.json``),
jobs that differ only by ``seed`` grouped with mean, standard deviation and a Student-t
confidence interval, Welch's t-test between the variants of one swept key, and plots of a
metric against a swept value. Used by ``stage=collect``.

Statistics: for n runs with mean m and sample standard deviation s (ddof=1), the confidence
interval is m ± t_{(1+c)/2, n-1} · s/√n (Student 1908); Welch's unequal-variance t-test (Welch
1947) via :func:`scipy.stats.ttest_ind` with ``equal_var=False``.
"""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from lmrun.errors import DataError
from lmrun.tracking.files import save_figure
from lmrun.launch import sweep as sweeps

SEED_KEY = "seed"


def _parse_override(o: str) -> tuple[str, str]:
    key, _, value = o.partition("=")
    return key.lstrip("+~"), value


def load_sweep(sweep_dir: str | Path) -> list[dict]:
    """Every job of a sweep directory: ``{"num", "params": {key: value}, "state", "summary",
    "dir"}``, from its manifest (jobs submitted but not started included) and its numbered run
    directories (sweeps run without a manifest). DataError if the directory holds no sweep."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise DataError(f"sweep={sweep_dir}: no such directory")
    rows = {r["num"]: r for r in sweeps.job_rows(sweep_dir)} if (sweep_dir / sweeps.MANIFEST).exists() else {}
    for sub in sweep_dir.iterdir():
        if sub.name.isdigit() and int(sub.name) not in rows and (sub / "run.json").exists():
            info = sweeps.read_json(sub / "run.json") or {}
            rows[int(sub.name)] = {"num": int(sub.name), "overrides": info.get("overrides", []),
                                   "state": str(info.get("status", "running")), "dir": str(sub)}
    if not rows:
        raise DataError(f"sweep={sweep_dir}: no jobs found (expected {sweeps.MANIFEST} or numbered run directories)")
    jobs = []
    for num in sorted(rows):
        r = rows[num]
        params = dict(_parse_override(o) for o in sweeps.job_identity(r.get("overrides", [])))
        summary = (sweeps.read_json(Path(r["dir"]) / "summary.json") or {}) if r["state"] == "completed" else {}
        jobs.append({"num": num, "params": params, "state": r["state"], "summary": summary, "dir": r["dir"]})
    return jobs


def swept_keys(jobs: list[dict]) -> list[str]:
    """Override keys whose value is not the same in every job (in first-seen order)."""
    keys: list[str] = []
    for j in jobs:
        for k in j["params"]:
            if k not in keys:
                keys.append(k)
    return [k for k in keys if len({j["params"].get(k) for j in jobs}) > 1]


#: the metrics an ablation reports, when the runs have them (pretrain, evaluate)
HEADLINE_METRICS = ("val_loss", "val_bpb", "val_perplexity", "final_train_loss", "tokens_per_s", "mfu",
                    "bytes_per_token", "train_seconds")


def numeric_metrics(jobs: list[dict]) -> list[str]:
    """The default metrics: numeric summary keys present in every completed job — the headline
    ones (:data:`HEADLINE_METRICS`) where the runs have any, else those not constant across jobs."""
    done = [j["summary"] for j in jobs if j["state"] == "completed" and j["summary"]]
    if not done:
        return []
    keys = [k for k, v in done[0].items() if _is_number(v)]
    keys = [k for k in keys if all(_is_number(s.get(k)) for s in done)]
    headline = [k for k in HEADLINE_METRICS if k in keys]
    if headline:
        return headline
    return [k for k in keys if len(done) == 1 or len({float(s[k]) for s in done}) > 1]


def summarize_groups(groups: list[dict], metrics: list[str], confidence: float) -> list[dict]:
    """The group table with one cell per metric, ``mean ± CI half-width (sd std)``, for reading."""
    rows = []
    for g in groups:
        row = {k: v for k, v in g.items() if not any(k.startswith(f"{m}_") for m in metrics)}
        for m in metrics:
            mean, std, hi = g[f"{m}_mean"], g[f"{m}_std"], g[f"{m}_ci_high"]
            row[f"{m} (±{int(round(confidence * 100))}% CI)"] = _fmt(mean) if math.isnan(hi) else (
                f"{_fmt(mean)} ± {_fmt(hi - mean)} (sd {_fmt(std)})")
        rows.append(row)
    return rows


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def seed_statistics(values: list[float], confidence: float = 0.95) -> dict:
    """``{n, mean, std, ci_low, ci_high}`` of ``values`` (std with ddof=1; the interval is
    Student-t at ``confidence``; std and interval are NaN for a single value)."""
    from scipy import stats

    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(vals)
    if n == 0:
        return {"n": 0, "mean": math.nan, "std": math.nan, "ci_low": math.nan, "ci_high": math.nan}
    mean = sum(vals) / n
    if n == 1:
        return {"n": 1, "mean": mean, "std": math.nan, "ci_low": math.nan, "ci_high": math.nan}
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1)) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "ci_low": mean - half, "ci_high": mean + half}


def job_table(jobs: list[dict], keys: list[str], metrics: list[str]) -> list[dict]:
    """One row per job: num, state, the swept keys, the metrics (None where absent)."""
    return [{"job": j["num"], "state": j["state"], **{k: j["params"].get(k) for k in keys},
             **{m: j["summary"].get(m) for m in metrics}} for j in jobs]


def group_table(jobs: list[dict], keys: list[str], metrics: list[str], confidence: float = 0.95) -> list[dict]:
    """Completed jobs grouped by every swept key except ``seed``: per group the key values,
    ``n`` (seeds), and for each metric its mean, std and CI bounds (``<m>_mean`` ...)."""
    group_keys = [k for k in keys if k != SEED_KEY]
    groups: dict[tuple, list[dict]] = {}
    for j in jobs:
        if j["state"] == "completed":
            groups.setdefault(tuple(j["params"].get(k) for k in group_keys), []).append(j)
    rows = []
    for values, members in groups.items():
        row = {**dict(zip(group_keys, values)), "n": len(members)}
        for m in metrics:
            st = seed_statistics([j["summary"].get(m) for j in members], confidence)
            row.update({f"{m}_mean": st["mean"], f"{m}_std": st["std"], f"{m}_ci_low": st["ci_low"],
                        f"{m}_ci_high": st["ci_high"]})
        rows.append(row)
    return rows


def welch_tests(jobs: list[dict], key: str, keys: list[str], metrics: list[str]) -> list[dict]:
    """Welch's t-test between every pair of values of ``key``, within each combination of the
    other swept keys (seeds are the samples): rows with the pair, the means, their difference
    and the two-sided p-value (NaN with fewer than 2 runs on a side)."""
    from scipy import stats

    if key not in keys:
        raise DataError(f"collect.compare={key}: not a swept key of this sweep; swept: {', '.join(keys) or 'none'}")
    others = [k for k in keys if k not in (key, SEED_KEY)]
    cells: dict[tuple, dict[str, list[dict]]] = {}
    for j in jobs:
        if j["state"] == "completed":
            ctx = tuple(j["params"].get(k) for k in others)
            cells.setdefault(ctx, {}).setdefault(j["params"].get(key), []).append(j)
    rows = []
    for ctx, variants in cells.items():
        names = list(variants)
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                for m in metrics:
                    xa = [float(j["summary"][m]) for j in variants[a] if _is_number(j["summary"].get(m))]
                    xb = [float(j["summary"][m]) for j in variants[b] if _is_number(j["summary"].get(m))]
                    p = math.nan
                    if len(xa) >= 2 and len(xb) >= 2:
                        p = float(stats.ttest_ind(xa, xb, equal_var=False).pvalue)
                    mean_a = sum(xa) / len(xa) if xa else math.nan
                    mean_b = sum(xb) / len(xb) if xb else math.nan
                    rows.append({**dict(zip(others, ctx)), "metric": m, f"{key} A": a, f"{key} B": b,
                                 "mean A": mean_a, "mean B": mean_b, "B - A": mean_b - mean_a,
                                 "n A": len(xa), "n B": len(xb), "p (Welch)": p})
    return rows


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.4g}" if abs(v) >= 1e4 or (v != 0 and abs(v) < 1e-3) else f"{v:.4f}".rstrip("0").rstrip(".")
    return str(v)


def to_markdown(rows: list[dict]) -> str:
    """A GitHub Markdown table of ``rows`` (columns from the first row)."""
    if not rows:
        return "(no rows)\n"
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def to_csv(rows: list[dict]) -> str:
    if not rows:
        return ""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def plot_metric(groups: list[dict], x_key: str, keys: list[str], metric: str, out: Path, confidence: float) -> None:
    """``metric`` (mean with its CI as error bars) against the swept ``x_key``, one line per
    combination of the other swept keys; numeric x values on a numeric (log if spread > 100x)
    axis, others categorical. Written atomically as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    others = [k for k in keys if k not in (x_key, SEED_KEY)]
    lines: dict[tuple, list[dict]] = {}
    for g in groups:
        lines.setdefault(tuple(g.get(k) for k in others), []).append(g)
    xs_all = [g.get(x_key) for g in groups]
    numeric = all(_as_float(x) is not None for x in xs_all)
    categories = list(dict.fromkeys(xs_all))
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    for ctx, members in lines.items():
        members = sorted(members, key=lambda g: _as_float(g.get(x_key)) if numeric else categories.index(g.get(x_key)))
        xs = [_as_float(g.get(x_key)) if numeric else categories.index(g.get(x_key)) for g in members]
        ys = [g[f"{metric}_mean"] for g in members]
        err = [0.0 if math.isnan(g[f"{metric}_ci_high"]) else g[f"{metric}_ci_high"] - g[f"{metric}_mean"]
               for g in members]
        label = ", ".join(f"{k}={v}" for k, v in zip(others, ctx)) or metric
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=label)
    if numeric:
        vals = [v for v in (_as_float(x) for x in xs_all) if v is not None and v > 0]
        if vals and max(vals) / min(vals) > 100:
            ax.set_xscale("log")
    else:
        ax.set_xticks(range(len(categories)), [str(c) for c in categories])
    ax.set_xlabel(x_key)
    ax.set_ylabel(f"{metric} (mean, {int(confidence * 100)}% CI)")
    ax.grid(alpha=0.3)
    if len(lines) > 1:
        ax.legend(fontsize=8)
    save_figure(fig, out)


def _as_float(v) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None
