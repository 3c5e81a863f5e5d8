"""The curation ablation's table and figure (experiments/curation_ablation.md) from its sweep.

Usage::

    python -m lmrun.curation.ablation multiruns/pretrain/curation_ablation-<hash> \\
        --out experiments/results/curation_ablation.png [--md table.md] \\
        [--eval 0=runs/evaluate/<run>:wikitext ...]

Each job of the sweep is one arm, named by the folder of its ``data.train`` file (``curated``,
``raw``, ``quality`` for ``runs/curation_ablation/<arm>/clean.txt``). The table gives, per
arm, the training corpus (MB, tokens), the tokens trained on, the final validation loss
(nats/token over the whole held-out set) and bits per byte, the training loss, the wall time;
``--eval JOB=RUN_DIR:NAME`` adds the loss and bits per byte of ``stage=evaluate`` runs of a
job's checkpoint (e.g. on WikiText-2), and a second table averages each arm over its seeds. The
figure shows the validation loss against training tokens (periodic evaluations on the first
``train.eval_tokens`` held-out tokens, and the final one on all of them) and the final bits per
byte per arm.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lmrun.errors import DataError


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def load_arms(sweep: Path) -> list[dict]:
    """One dict per completed job of ``sweep``: arm name, data paths, summary, metric records.
    Raises DataError when the folder holds no completed job."""
    arms = []
    for job in sorted(p for p in Path(sweep).iterdir() if p.is_dir() and p.name.isdigit()):
        if not (job / "summary.json").is_file():
            continue
        run = json.loads((job / "run.json").read_text(encoding="utf-8"))
        train = next((o.split("=", 1)[1] for o in run.get("overrides", []) if o.startswith("data.train=")), None)
        summary = json.loads((job / "summary.json").read_text(encoding="utf-8"))
        records = _jsonl(job / "metrics.jsonl")
        arms.append({"job": job.name, "arm": Path(train).parent.name if train else job.name, "train_file": train,
                     "seed": run.get("seed"), "summary": summary, "records": records})
    if not arms:
        raise DataError(f"{sweep}: no completed pretrain job (summary.json) in this sweep folder")
    return arms


def _corpus_facts(arm: dict) -> dict:
    """Size of the arm's training text and its token count (from the encode meta in the log)."""
    out = {}
    if arm["train_file"] and Path(arm["train_file"]).is_file():
        out["train_mb"] = Path(arm["train_file"]).stat().st_size / 1e6
    return out


def table(arms: list[dict], evals: dict[str, dict]) -> str:
    eval_names = sorted({k for e in evals.values() for k in e})
    head = ["arm", "seed", "training text (MB)", "tokens trained", "val loss (nats/token)", "val bits/byte",
            "final train loss", "train seconds"] + [f"{n} loss / bpb" for n in eval_names]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for a in arms:
        s = a["summary"]
        f = _corpus_facts(a)
        row = [a["arm"], str(a.get("seed")), f"{f.get('train_mb', float('nan')):.2f}", f"{s['tokens']:,}", f"{s['val_loss']:.4f}",
               f"{s['val_bpb']:.4f}", f"{s['final_train_loss']:.4f}", f"{s['train_seconds']:.0f}"]
        for n in eval_names:
            e = evals.get(a["job"], {}).get(n)
            row.append(f"{e['loss']:.4f} / {e['bpb']:.4f}" if e else "-")
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "| arm | runs | val loss, mean (min-max) | val bits/byte, mean |"
              + "".join(f" {n} loss, mean |" for n in eval_names), "|---|---|---|---|" + "---|" * len(eval_names)]
    for name in dict.fromkeys(a["arm"] for a in arms):
        group = [a for a in arms if a["arm"] == name]
        losses = [a["summary"]["val_loss"] for a in group]
        row = [name, str(len(group)), f"{sum(losses) / len(losses):.4f} ({min(losses):.4f}-{max(losses):.4f})",
               f"{sum(a['summary']['val_bpb'] for a in group) / len(group):.4f}"]
        for n in eval_names:
            vals = [evals[a["job"]][n]["loss"] for a in group if n in evals.get(a["job"], {})]
            row.append(f"{sum(vals) / len(vals):.4f}" if vals else "-")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def plot(arms: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lmrun.tracking.files import save_figure

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5), dpi=120, gridspec_kw={"width_ratios": [2, 1]})
    names = list(dict.fromkeys(a["arm"] for a in arms))
    colors = {n: f"C{i}" for i, n in enumerate(names)}
    for a in arms:
        tokens_at = {r["step"]: r["tokens"] for r in a["records"] if "tokens" in r and "loss" in r}
        per_step = a["summary"]["tokens"] / max(a["summary"]["steps"], 1)
        pts = [(tokens_at.get(r["step"], r["step"] * per_step), r["val_loss"]) for r in a["records"] if "val_loss" in r]
        if not pts:
            continue
        xs, ys = zip(*pts)
        c = colors[a["arm"]]
        ax.plot(xs[:-1], ys[:-1], "o-", color=c, alpha=0.8, label=f"{a['arm']} seed {a.get('seed')}")
        ax.plot(xs[-1:], ys[-1:], "s", color=c, markersize=7)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("circles: first 65,536 held-out tokens; squares: final, whole held-out set", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    bpb = [a["summary"]["val_bpb"] for a in arms]
    bx.bar(range(len(arms)), bpb, color=[colors[a["arm"]] for a in arms])
    for i, v in enumerate(bpb):
        bx.text(i, v, f"{v:.3f}", ha="center", va="bottom", fontsize=7)
    bx.set_xticks(range(len(arms)), [f"{a['arm']}\ns{a.get('seed')}" for a in arms], fontsize=8)
    bx.set_ylim(min(bpb) * 0.95, max(bpb) * 1.02)
    bx.set_ylabel("final validation bits/byte")
    fig.suptitle("curated vs raw web text at the same token budget (held-out: curated tutorial/faq/howto pages)")
    save_figure(fig, out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sweep", type=Path)
    ap.add_argument("--out", type=Path, required=True, help="the figure (PNG)")
    ap.add_argument("--md", type=Path, default=None, help="also write the table here")
    ap.add_argument("--eval", nargs="*", default=[], metavar="JOB=RUN_DIR[:NAME]",
                    help="stage=evaluate runs of job number JOB's checkpoint, added as columns (NAME: 'eval')")
    a = ap.parse_args(argv)
    try:
        arms = load_arms(a.sweep)
        evals: dict[str, dict] = {}
        for item in a.eval:
            job, _, rest = item.partition("=")
            run_dir, _, name = rest.partition(":")
            e = json.loads((Path(run_dir) / "eval.json").read_text(encoding="utf-8"))
            evals.setdefault(job, {})[name or "eval"] = {"loss": e["val_loss"], "bpb": e["val_bpb"]}
    except (DataError, OSError, KeyError, json.JSONDecodeError) as e:
        print(f"lmrun.curation.ablation: {e}", file=sys.stderr)
        return 2
    md = table(arms, evals)
    print(md)
    plot(arms, a.out)
    if a.md:
        a.md.write_text(md, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
