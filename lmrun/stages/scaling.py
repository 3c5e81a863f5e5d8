"""Stage ``scaling``: compute-optimal scaling laws from runs —
``lmrun stage=scaling scaling.input=<sweep dir or file> scaling.approach=1|2|3|all
scaling.predict=[1e23,1e24]``.

Writes ``scaling.json`` (coefficients and predictions with intervals per approach),
``scaling.md`` (the same as tables, printed), and the plots ``isoflop_profiles.png``,
``n_opt.png``, ``d_opt.png``, ``loss_vs_compute.png``.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

from lmrun.errors import DataError
from lmrun.tracking.files import atomic_write_json, atomic_write_text
from lmrun.tracking.run import active_run

log = logging.getLogger(__name__)


def _approaches(cfg) -> list[str]:
    return ["1", "2", "3"] if str(cfg.scaling.approach) == "all" else [str(cfg.scaling.approach)]


def plan(cfg) -> dict:
    from lmrun.scaling.data import budgets, load_runs

    if cfg.scaling.mode == "plan":
        sc = cfg.scaling
        return {"stage": "scaling", "mode": "plan", "inputs": {"runs": str(_store_root(cfg))},
                "exploration_budget": f"{sc.exploration_budget:.3g}", "target_budget": f"{sc.target_budget:.3g}",
                "rounds": f"budgets {sc.first_budget:.3g} x {sc.budget_factor:g}^r, {sc.sizes_per_budget} sizes each",
                "outputs": ["plan.json", "plan.md", "isoflop_profiles.png"]}

    runs = load_runs(cfg.scaling.input, cfg.scaling.params_key)
    return {"stage": "scaling", "inputs": {"runs": str(cfg.scaling.input)}, "n_runs": len(runs),
            "budgets": [f"{c:.3g}" for c, _ in budgets(runs)], "approaches": _approaches(cfg),
            "predict": [f"{c:.3g}" for c in cfg.scaling.predict], "bootstrap": int(cfg.scaling.n_boot),
            "boot_starts": cfg.scaling.boot_starts,
            "outputs": ["scaling.json", "scaling.md", "isoflop_profiles.png", "n_opt.png", "d_opt.png",
                        "loss_vs_compute.png"]}


def _fmt(v: tuple) -> str:
    return f"{v[0]:.4g} [{v[1]:.4g}, {v[2]:.4g}]"


def _store_root(cfg) -> Path:
    return Path(cfg.paths.multiruns_dir) / "scaling-plan-runs"


def _model_cfg(cfg):
    """``cfg.model`` as a planned run sees it: by_params shape keys come from the planner; plain
    ``scaling.run_overrides`` applied."""
    import yaml
    from omegaconf import OmegaConf

    c = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    for o in cfg.scaling.run_overrides:
        key, value = o.lstrip("+~").split("=", 1)
        OmegaConf.update(c, key, yaml.safe_load(value), force_add=True)
    return c.model


def run_plan(cfg) -> dict:
    from lmrun.scaling import plots
    from lmrun.scaling.fits import bootstrap, optimal_points_isoflop
    from lmrun.scaling.planner import RunStore, plan_and_run, shape_of, target_for

    run, sc = active_run(), cfg.scaling
    model_cfg = _model_cfg(cfg)
    base = [*sc.run_overrides, "model/size=by_params", "train.max_steps=null", "logger=none", "progress=false",
            "train.samples=0", "train.eval_every=1000000", f"seed={cfg.seed}"]
    store = RunStore(_store_root(cfg), base)
    result = plan_and_run(model_cfg, store, float(sc.exploration_budget), float(sc.target_budget),
                          float(sc.first_budget), float(sc.budget_factor), int(sc.sizes_per_budget),
                          float(sc.size_spread), sc.params_key)
    for rd in result["rounds"]:
        run.log({"budget": rd["budget"], "spent": rd["spent_after"], **({"a": rd["a"]} if rd["a"] is not None else {})},
                step=rd["round"])
    runs = result["runs"]
    lines = [f"# Scaling plan: target {sc.target_budget:.3g} FLOPs, exploration budget {sc.exploration_budget:.3g}",
             "", f"Spent {result['spent']:.3g} FLOPs on {len(runs) - result['reused']} new runs "
             f"({result['reused']} reused).", "", "| round | budget C | sizes around | from | N (val loss) | spent after |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['round']} | {r['budget']:.3g} | {r['center']:.3g} | {r['center_from']} | "
              f"{', '.join(f'{n:.3g} ({x:.3f})' for n, x in zip(r['parameters'], r['losses']))} | {r['spent_after']:.3g} |"
              for r in result["rounds"]]
    summary = {"spent_flops": result["spent"], "runs": len(runs), "reused": result["reused"],
               "rounds": len(result["rounds"])}
    try:
        b = bootstrap(runs, "2", [float(sc.target_budget)], int(sc.n_boot), int(sc.seed), float(sc.confidence),
                      progress=True, bar=bool(cfg.progress))
    except DataError as e:
        lines += ["", f"No recommendation: {e} (raise scaling.exploration_budget)."]
        b = None
    if b is not None:
        p = b["predictions"][0]
        target = target_for(model_cfg, p["n_opt"][0])
        shape = shape_of(model_cfg, target)
        level = f"{int(round(float(sc.confidence) * 100))}%"
        lines += ["", f"## Recommendation for C = {sc.target_budget:.3g} FLOPs (approach 2, {level} bootstrap CI)", "",
                  f"- N_opt ({sc.params_key}): {_fmt(p['n_opt'])}",
                  f"- D_opt (tokens): {_fmt(p['d_opt'])}",
                  f"- predicted loss: {_fmt(p['loss'])}",
                  f"- shape: d_model {shape['d_model']}, {shape['num_layers']} layers, {shape['num_heads']} heads "
                  f"(model/size=by_params model.target_params={target:g}); other hyperparameters as in the planned "
                  f"runs: {' '.join(sc.run_overrides) or '(defaults)'}",
                  f"- allocation exponent a: {_fmt(b['coefficients']['a'])}"]
        summary.update(n_opt=p["n_opt"][0], d_opt=p["d_opt"][0], predicted_loss=p["loss"][0], target_params=target,
                       **{k: v for k, v in shape.items()})
        plots.plot_isoflop_profiles(runs, optimal_points_isoflop(runs), run.dir / "isoflop_profiles.png")
    report = "\n".join(lines) + "\n"
    atomic_write_text(run.dir / "plan.md", report)
    atomic_write_json(run.dir / "plan.json", {"rounds": result["rounds"], "summary": summary,
                                              "runs": [{**r.__dict__, "dir": d} for r, d in zip(runs, result["run_dirs"])]})
    print(report, flush=True)
    return summary


def run(cfg) -> dict:
    if cfg.scaling.mode == "plan":
        return run_plan(cfg)
    import numpy as np

    from lmrun.scaling import plots
    from lmrun.scaling.data import load_runs
    from lmrun.scaling.fits import bootstrap, optimal_points_envelope, optimal_points_isoflop

    run = active_run()
    sc = cfg.scaling
    runs = load_runs(sc.input, sc.params_key)
    log.info("%d runs from %s; approaches %s, %d bootstrap resamples each", len(runs), sc.input,
             ", ".join(_approaches(cfg)), int(sc.n_boot))
    targets = [float(c) for c in sc.predict]
    c_min = min(r.compute for r in runs)
    grid = list(np.logspace(math.log10(c_min), math.log10(max(targets + [max(r.compute for r in runs)])), 40))
    results, errors = {}, {}
    for name in _approaches(cfg):
        try:
            b = bootstrap(runs, name, targets + grid, int(sc.n_boot), int(sc.seed), float(sc.confidence),
                          progress=True, bar=bool(cfg.progress),
                          boot_starts=None if sc.boot_starts is None else int(sc.boot_starts))
        except DataError as e:
            if str(sc.approach) != "all":
                raise
            errors[name] = str(e)
            log.warning("approach %s skipped: %s", name, e)
            continue
        results[name] = {"coefficients": b["coefficients"], "predictions": b["predictions"][:len(targets)],
                         "grid": b["predictions"][len(targets):], "n_boot": b["n_boot"], "fit": b["fit"]}
    if not results:
        raise DataError("no approach could be fitted: " + "; ".join(f"{k}: {v}" for k, v in errors.items()))

    level = f"{int(round(float(sc.confidence) * 100))}%"
    lines = [f"# Scaling laws: {len(runs)} runs from {sc.input}", "",
             f"Intervals: {level} percentile bootstrap. N = {sc.params_key} for lmrun runs."
             + ("" if "3" not in results else " Approach 3 refits each resample from "
                + ("the whole start grid" if sc.boot_starts is None else f"{int(sc.boot_starts)} starts")
                + " (L-BFGS-B to convergence)."), ""]
    for name, r in results.items():
        lines += [f"## Approach {name}", "", "| coefficient | value [" + level + " CI] |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in r["coefficients"].items()]
        lines += ["", "| target C (FLOPs) | N_opt | D_opt (tokens) | loss |", "|---|---|---|---|"]
        lines += [f"| {p['compute']:.3g} | {_fmt(p['n_opt'])} | {_fmt(p['d_opt'])} | {_fmt(p['loss'])} |"
                  for p in r["predictions"]]
        if name in ("1", "2"):
            lines += ["", "(loss: the best loss per budget fitted as E_L + k_L·C^loss_exponent)"]
        lines.append("")
    for name, e in errors.items():
        lines += [f"## Approach {name}: not fitted", "", e, ""]
    report = "\n".join(lines)
    atomic_write_text(run.dir / "scaling.md", report)
    atomic_write_json(run.dir / "scaling.json", {
        "input": str(sc.input), "runs": len(runs), "confidence": float(sc.confidence),
        "approaches": {k: {"coefficients": v["coefficients"], "predictions": v["predictions"], "n_boot": v["n_boot"]}
                       for k, v in results.items()}, "not_fitted": errors})
    print(report, flush=True)

    log.info("plotting: isoflop_profiles.png, n_opt.png, d_opt.png, loss_vs_compute.png")
    opt_points = {}
    if "2" in results:
        iso = optimal_points_isoflop(runs)
        plots.plot_isoflop_profiles(runs, iso, run.dir / "isoflop_profiles.png")
        opt_points["2"] = iso
    if "1" in results:
        opt_points["1"] = optimal_points_envelope(runs)
    for q, fname in (("n_opt", "n_opt.png"), ("d_opt", "d_opt.png")):
        pts = {k: [(p[0], p[1] if q == "n_opt" else p[0] / (6 * p[1])) for p in v] for k, v in opt_points.items()}
        plots.plot_allocation(results, grid, q, pts, run.dir / fname)
    plots.plot_loss_vs_compute(runs, results, run.dir / "loss_vs_compute.png")

    summary = {"runs": len(runs)}
    for name, r in results.items():
        for p in r["predictions"]:
            tag = f"{p['compute']:.0e}".replace("+", "")
            summary[f"approach{name}_n_opt_{tag}"] = p["n_opt"][0]
            summary[f"approach{name}_d_opt_{tag}"] = p["d_opt"][0]
            summary[f"approach{name}_loss_{tag}"] = p["loss"][0]
    return summary
