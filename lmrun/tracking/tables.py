"""Result tables and plots of benchmark-style runs: long-format CSV, Markdown pivot tables (one
row per grid point and pass, one column per implementation) and a timing plot. Writes are atomic."""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from lmrun.tracking.files import atomic_write_bytes, atomic_write_text


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if not math.isfinite(value):
            return ""
        return f"{value:.4g}"
    return str(value)


def write_csv(rows: list[dict], path: Path) -> None:
    """All rows, all columns (the union of the rows' keys, first-seen order), atomically."""
    columns: list[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: _fmt(r.get(k)) for k in columns})
    atomic_write_text(path, buf.getvalue())


def _cell_time(r: dict) -> str:
    if r["status"] != "ok":
        return r["status"]
    text = f"{r['median_ms']:.3g} ms"
    if r.get("speedup") is not None:
        text += f" ({r['speedup']:.2f}×)"
    return text


def pivot_markdown(rows: list[dict], keys: list[str], cell=_cell_time, column: str = "impl") -> str:
    """A Markdown table: one row per distinct (``keys``…, pass), one column per ``column`` value,
    cells from ``cell(row)``."""
    impls: list[str] = []
    for r in rows:
        if r[column] not in impls:
            impls.append(r[column])
    groups: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in keys) + (r["pass"],), {})[r[column]] = r
    header = [*keys, "pass", *impls]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key, by_impl in groups.items():
        cells = [str(v) for v in key] + [cell(by_impl[i]) if i in by_impl else "" for i in impls]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def benchmark_markdown(rows: list[dict], keys: list[str], title: str, baseline: str, extra_cells: dict | None = None
                       ) -> str:
    """The report: median time with speed-up against ``baseline`` per case, peak memory, any
    extra pivots (``{heading: cell function}``), and notes for skipped or failed cases."""
    parts = [f"# {title}", "", f"Median milliseconds per call (speed-up against `{baseline}`: its time / this time).",
             "", pivot_markdown(rows, keys), "", "Peak memory (MiB) beyond the inputs.", "",
             pivot_markdown(rows, keys, lambda r: _fmt(r.get("peak_mb")) if r["status"] == "ok" else r["status"])]
    for heading, cell in (extra_cells or {}).items():
        parts += ["", heading, "", pivot_markdown(rows, keys, cell)]
    notes = sorted({f"- `{r['impl']}` {r['status']}: {r['note']}" for r in rows if r["status"] != "ok" and r["note"]})
    if notes:
        parts += ["", "Notes:", "", *notes]
    return "\n".join(parts) + "\n"


def plot_benchmark(rows: list[dict], x: str, series: list[str], path: Path, title: str) -> None:
    """Median time (log scale) against ``x``, one panel per pass, one line per implementation ×
    the ``series`` keys, 20th–80th percentile as error bars; PNG written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    passes = list(dict.fromkeys(r["pass"] for r in rows))
    fig, axes = plt.subplots(1, len(passes), figsize=(5.5 * len(passes), 4.2), squeeze=False)
    xs_all = list(dict.fromkeys(r[x] for r in rows))
    numeric = all(isinstance(v, (int, float)) for v in xs_all)
    for ax, pass_ in zip(axes[0], passes):
        lines: dict[str, list[dict]] = {}
        for r in rows:
            if r["pass"] == pass_ and r["status"] == "ok":
                label = " ".join([r["impl"]] + [f"{r[k]}" for k in series])
                lines.setdefault(label, []).append(r)
        for label, rs in lines.items():
            xs = [r[x] if numeric else xs_all.index(r[x]) for r in rs]
            ys = [r["median_ms"] for r in rs]
            err = [[r["median_ms"] - r["p20_ms"] for r in rs], [r["p80_ms"] - r["median_ms"] for r in rs]]
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=2, label=label)
        if numeric:
            ax.set_xscale("log", base=2)
        else:
            ax.set_xticks(range(len(xs_all)), [str(v) for v in xs_all])
        ax.set_yscale("log")
        ax.set_xlabel(x)
        ax.set_ylabel("median ms")
        ax.set_title(pass_)
        ax.grid(True, which="both", alpha=0.3)
        if lines:
            ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
