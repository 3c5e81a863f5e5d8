"""Figure of the alignment_cpu chain: held-out accuracy of SFT, GRPO, expert iteration and DPO
against each stage's wall-clock seconds, and DPO's held-out preference accuracy.
Usage: python experiments/alignment_cpu_plot.py <workdir> <out.png>"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from lmrun.tracking.files import save_figure  # noqa: E402


def latest(work: Path, stage: str) -> Path:
    return sorted((work / "runs" / stage).iterdir())[-1]


def series(run: Path, key: str) -> tuple[list[float], list[float]]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r.get(key) is not None]
    t0 = rows[0]["time"] if rows else 0.0
    return [r["time"] - t0 for r in rows], [r[key] for r in rows]


def main(work: Path, out: Path) -> None:
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4), dpi=120)
    for stage, key, label in (("sft", "accuracy", "SFT (noisy demonstrations)"), ("grpo", "eval_accuracy", "GRPO"),
                              ("expert_iteration", "eval_accuracy", "expert iteration"),
                              ("dpo", "eval_accuracy", "DPO")):
        x, y = series(latest(work, stage), key)
        ax.plot(x, [100 * v for v in y], "o-", ms=3, label=label)
    ax.set_xlabel("seconds since the stage's first evaluation")
    ax.set_ylabel("held-out greedy accuracy (%)")
    ax.set_title("2-digit addition, held-out questions (align.eval_examples)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    dpo = latest(work, "dpo")
    for key, label in (("val_preference_accuracy", "held-out pairs"), ("preference_accuracy", "train batch")):
        rows = [json.loads(x) for x in (dpo / "metrics.jsonl").read_text().splitlines()]
        pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        bx.plot([p[0] for p in pts], [100 * p[1] for p in pts], "o-", ms=3, label=label)
    bx.axhline(50, color="gray", lw=0.8, ls="--")
    bx.set_xlabel("DPO step")
    bx.set_ylabel("preference accuracy (%)")
    bx.set_title("DPO on verifier-ranked pairs")
    bx.grid(alpha=0.3)
    bx.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, out)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
