"""Synthetic IsoFLOP runs drawn from a known law, and a coverage check of the approach-3 bootstrap
intervals against it (issue 26): draw the runs ``reps`` times with fresh noise, fit and bootstrap
each draw as ``lmrun stage=scaling`` does, and count how often each interval contains the true
value. A 95% interval that is honest covers it in about 95% of the draws.

    python -m lmrun.scaling.synthetic                       # 20 draws of 81 runs, 200 resamples each
    python -m lmrun.scaling.synthetic --reps 40 --noise 0.05
    python -m lmrun.scaling.synthetic --write noisy_law.json   # one draw, for lmrun stage=scaling

The law defaults to Hoffmann et al. 2022's fit (eq. 10: E = 1.69, A = 406.4, B = 410.7,
α = 0.34, β = 0.28); the runs are IsoFLOP profiles like their Figure 3 (budgets 6e18–3e21 FLOPs,
sizes spread ``spread``-fold either side of each budget's optimum, D = C/(6N)), each loss
multiplied by exp(noise · z), z standard normal.
"""
from __future__ import annotations

import argparse
import math
import time

import numpy as np

from lmrun.scaling import fits
from lmrun.scaling.data import ScalingRun

#: Hoffmann et al. 2022, eq. 10 (their approach-3 fit)
CHINCHILLA = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}
#: the budgets of Hoffmann et al.'s Figure 3 IsoFLOP profiles (FLOPs)
BUDGETS = (6e18, 1e19, 3e19, 6e19, 1e20, 3e20, 6e20, 1e21, 3e21)


def law_fit(law: dict = CHINCHILLA) -> fits.ParametricFit:
    """The law as a ``ParametricFit`` (its coefficients and compute-optimal predictions are the
    true values the intervals should cover)."""
    return fits.ParametricFit(law["E"], law["A"], law["B"], law["alpha"], law["beta"], 0.0)


def isoflop_runs(law: dict = CHINCHILLA, budgets=BUDGETS, sizes: int = 9, spread: float = 8.0, noise: float = 0.02,
                 seed: int = 0) -> list[ScalingRun]:
    """``len(budgets) × sizes`` runs: per budget C, sizes N log-spaced ``spread``-fold either side
    of the law's N_opt(C), D = C/(6N), loss = L(N, D)·exp(noise·z) with z ~ N(0, 1) (seeded)."""
    rng = np.random.default_rng(seed)
    truth = law_fit(law)
    runs = []
    for c in budgets:
        n_opt = truth.predict(c)["n_opt"]
        for n in n_opt * np.geomspace(1 / spread, spread, sizes):
            d = c / (6 * n)
            loss = float(truth.loss(n, d)) * math.exp(noise * rng.standard_normal())
            runs.append(ScalingRun(float(n), float(d), float(c), loss))
    return runs


def coverage(law: dict = CHINCHILLA, reps: int = 20, n_boot: int = 200, targets=(1e23, 1e24),
             confidence: float = 0.95, boot_starts: int | None = fits.BOOT_STARTS, init_grid: dict | None = None,
             seed: int = 0, **runs_kw) -> dict:
    """Approach-3 bootstrap intervals on ``reps`` independent draws of ``isoflop_runs(law,
    seed=seed + i, **runs_kw)``; returns ``{"reps", "seconds", "quantities": {name: {"covered",
    "width" (median interval width relative to the true value), "true"}}}`` for E, A, B, alpha,
    beta, a, b and n_opt / d_opt / loss at each target (``n_opt@1e+23`` …)."""
    truth = law_fit(law)
    true = dict(truth.coefficients())
    for c in targets:
        true.update({f"{k}@{c:.0e}": v for k, v in truth.predict(c).items() if k != "compute"})
    covered = {k: 0 for k in true}
    widths = {k: [] for k in true}
    t0 = time.perf_counter()
    for i in range(reps):
        runs = isoflop_runs(law, seed=seed + i, **runs_kw)
        b = fits.bootstrap(runs, "3", list(targets), n_boot=n_boot, seed=seed + i, confidence=confidence,
                           boot_starts=boot_starts, init_grid=init_grid)
        got = dict(b["coefficients"])
        for p in b["predictions"]:
            got.update({f"{k}@{p['compute']:.0e}": v for k, v in p.items() if k != "compute"})
        for k, v in true.items():
            _, lo, hi = got[k]
            covered[k] += int(lo <= v <= hi)
            widths[k].append((hi - lo) / abs(v))
    return {"reps": reps, "seconds": time.perf_counter() - t0,
            "quantities": {k: {"covered": covered[k], "width": float(np.median(widths[k])), "true": true[k]}
                           for k in true}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lmrun.scaling.synthetic", description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--n-boot", type=int, default=200)
    ap.add_argument("--boot-starts", type=int, default=fits.BOOT_STARTS, help="0: the whole grid per resample")
    ap.add_argument("--noise", type=float, default=0.02)
    ap.add_argument("--sizes", type=int, default=9)
    ap.add_argument("--spread", type=float, default=8.0)
    ap.add_argument("--confidence", type=float, default=0.95)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--write", metavar="FILE", help="write one draw (seed --seed) as a runs file (JSON: parameters, "
                    "tokens, compute_budget, final_loss) for scaling.input, and stop")
    args = ap.parse_args(argv)
    if args.write:
        from lmrun.tracking.files import atomic_write_json

        runs = isoflop_runs(noise=args.noise, sizes=args.sizes, spread=args.spread, seed=args.seed)
        atomic_write_json(args.write, [{"parameters": r.parameters, "tokens": r.tokens, "compute_budget": r.compute,
                                        "final_loss": r.loss} for r in runs])
        print(f"{len(runs)} runs -> {args.write}")
        return 0
    r = coverage(reps=args.reps, n_boot=args.n_boot, boot_starts=args.boot_starts or None, noise=args.noise,
                 sizes=args.sizes, spread=args.spread, confidence=args.confidence, seed=args.seed)
    n = len(BUDGETS) * args.sizes
    print(f"{args.reps} draws of {n} runs (noise {args.noise:g}), {args.n_boot} resamples, "
          f"{args.boot_starts or 'grid'} starts per resample, {r['seconds']:.0f} s\n")
    print(f"| quantity | true | {int(round(args.confidence * 100))}% intervals covering it | median width / true |")
    print("|---|---|---|---|")
    for k, q in r["quantities"].items():
        print(f"| {k} | {q['true']:.4g} | {q['covered']}/{r['reps']} | {q['width']:.3g} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
