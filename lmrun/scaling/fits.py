"""Compute-optimal scaling fits (Hoffmann et al. 2022, "Training Compute-Optimal Large Language
Models", section 3) with bootstrap confidence intervals.

* Approach 1 — the lowest loss reached at each compute level across runs (from training
  curves where available, else each budget's best final loss) gives N_opt(C); power laws
  N_opt = k_N·C^a and D_opt = C/(6·N_opt) are fitted in log space.
* Approach 2 — IsoFLOP profiles: per budget, a parabola of loss against log N; its vertex is
  N_opt(C); the same power laws.
* Approach 3 — the parametric loss L(N, D) = E + A/N^α + B/D^β fitted by minimising the Huber
  loss (δ = 1e-3) between log L̂ (a log-sum-exp of the three terms) and log L with L-BFGS-B from
  a grid of initialisations, run to convergence; the compute-optimal allocation under C = 6·N·D
  follows in closed form: N_opt = G·(C/6)^{β/(α+β)}, D_opt = G⁻¹·(C/6)^{α/(α+β)}, G = (αA/(βB))^{1/(α+β)}.

For approaches 1 and 2 the predicted loss at a target budget comes from the best loss per
budget fitted as L*(C) = E_L + k_L·C^γ (on log loss; a plain power law below four budgets); for
approach 3 it is L(N_opt, D_opt).
Confidence intervals: percentile bootstrap over runs (approach 3, each resample refitted from
several starts to convergence) or over budgets (approaches 1 and 2, which fit one point per
budget), ``n_boot`` resamples.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from lmrun.errors import DataError
from lmrun.scaling.data import ScalingRun, budgets


@dataclass
class PowerLaw:
    """y = k·x^a, fitted by least squares on (log x, log y)."""

    k: float
    a: float

    def __call__(self, x):
        return self.k * np.asarray(x, dtype=float) ** self.a


def fit_power_law(x, y) -> PowerLaw:
    """Least-squares line through (log x, log y). ValueError with fewer than 2 distinct x."""
    lx, ly = np.log(np.asarray(x, float)), np.log(np.asarray(y, float))
    if len(np.unique(lx)) < 2:
        raise ValueError("a power law needs at least two distinct x values")
    a, logk = np.polyfit(lx, ly, 1)
    return PowerLaw(float(math.exp(logk)), float(a))


@dataclass
class SaturatingPowerLaw:
    """y = e + k·x^a (a < 0): a power law approaching an irreducible floor e ≥ 0."""

    e: float
    k: float
    a: float

    def __call__(self, x):
        return self.e + self.k * np.asarray(x, dtype=float) ** self.a


def fit_loss_law(c, loss) -> "SaturatingPowerLaw | PowerLaw":
    """The best loss per budget against compute: ``e + k·C^a`` fitted by least squares on log
    loss (L-BFGS-B over e in [0, min loss), a < 0, from a few starts); a plain power law when
    there are fewer than four budgets."""
    from scipy.optimize import minimize

    c, y = np.asarray(c, float), np.asarray(loss, float)
    if len(np.unique(c)) < 4:
        return fit_power_law(c, y)
    lc, ly, top = np.log(c) - np.log(c).mean(), np.log(y), float(y.min())

    def obj(theta):
        e, logk, a = theta
        pred = e + np.exp(logk + a * lc)
        return float(((np.log(pred) - ly) ** 2).sum())

    best = None
    for frac in (0.0, 0.5, 0.9):
        e0 = frac * top
        x0 = [e0, math.log(max(float(y.mean()) - e0, 1e-6)), -0.3]
        res = minimize(obj, x0, method="L-BFGS-B", bounds=[(0.0, top * 0.999), (-50, 50), (-5.0, -1e-6)])
        if best is None or res.fun < best.fun:
            best = res
    e, logk, a = best.x
    return SaturatingPowerLaw(float(e), float(math.exp(logk - a * np.log(c).mean())), float(a))


def parabola_vertex(log_n, loss) -> tuple[float, np.ndarray]:
    """Fit loss = c2·x² + c1·x + c0 over x = log N; return (N at the vertex, coefficients).
    ValueError with fewer than 3 points or a parabola that opens downwards (no minimum)."""
    x, y = np.asarray(log_n, float), np.asarray(loss, float)
    if len(np.unique(x)) < 3:
        raise ValueError("an IsoFLOP parabola needs at least three model sizes")
    coef = np.polyfit(x, y, 2)
    if coef[0] <= 0:
        raise ValueError("the IsoFLOP profile has no minimum (the parabola opens downwards)")
    return float(math.exp(-coef[1] / (2 * coef[0]))), coef


# --- approaches 1 and 2: optimal N per budget, then power laws ------------------------------------
def optimal_points_envelope(runs: list[ScalingRun]) -> list[tuple[float, float, float]]:
    """Approach 1: ``[(C, N_opt, L*)]`` — for each budget, the run with the lowest loss at that
    compute. With training curves, the envelope is taken at each run's budget over every run's
    curve (a run counts at compute C only if it reached C)."""
    out = []
    for c, group in budgets(runs):
        best = min(group, key=lambda r: r.loss)
        if any(r.curve for r in runs):  # lowest loss reached at compute c by any run
            for r in runs:
                reached = [loss for cc, loss in r.curve if cc <= c * 1.0001]
                if reached and min(reached) < best.loss:
                    best = ScalingRun(r.parameters, c / (6 * r.parameters), c, min(reached))
        out.append((c, best.parameters, best.loss))
    return out


def optimal_points_isoflop(runs: list[ScalingRun]) -> list[tuple[float, float, float, np.ndarray]]:
    """Approach 2: ``[(C, N_opt, L at the vertex, parabola coefficients)]`` per budget with at
    least three sizes and a convex profile (a profile whose parabola opens downwards has no
    minimum and is left out)."""
    out = []
    for c, group in budgets(runs):
        if len({r.parameters for r in group}) < 3:
            continue
        x = [math.log(r.parameters) for r in group]
        try:
            n_opt, coef = parabola_vertex(x, [r.loss for r in group])
        except ValueError:  # a concave profile (optimum far outside the sizes tried): no vertex
            continue
        out.append((c, n_opt, float(np.polyval(coef, math.log(n_opt))), coef))
    if len(out) < 2:
        raise DataError("approach 2 needs at least two compute budgets with three or more model sizes each and a "
                        "convex loss profile (a minimum)")
    return out


@dataclass
class AllocationFit:
    """N_opt(C) = n_law(C), D_opt(C) = C / (6·N_opt(C)) (= d_law(C)), best loss l_law(C)."""

    n_law: PowerLaw
    d_law: PowerLaw
    l_law: "SaturatingPowerLaw | PowerLaw"
    points: list

    def predict(self, c: float) -> dict:
        n = float(self.n_law(c))
        return {"compute": c, "n_opt": n, "d_opt": c / (6 * n), "loss": float(self.l_law(c))}

    def coefficients(self) -> dict:
        out = {"a": self.n_law.a, "k_N": self.n_law.k, "b": self.d_law.a, "k_D": self.d_law.k,
               "loss_exponent": self.l_law.a, "k_L": self.l_law.k}
        if isinstance(self.l_law, SaturatingPowerLaw):
            out["E_L"] = self.l_law.e
        return out


def fit_allocation(points) -> AllocationFit:
    """Power laws through ``(C, N_opt, L*, ...)`` points."""
    c = np.array([p[0] for p in points])
    n = np.array([p[1] for p in points])
    loss = np.array([p[2] for p in points])
    return AllocationFit(fit_power_law(c, n), fit_power_law(c, c / (6 * n)), fit_loss_law(c, loss), list(points))


def approach1(runs: list[ScalingRun]) -> AllocationFit:
    points = optimal_points_envelope(runs)
    if len(points) < 2:
        raise DataError("approach 1 needs runs at two or more compute budgets")
    return fit_allocation(points)


def approach2(runs: list[ScalingRun]) -> AllocationFit:
    return fit_allocation(optimal_points_isoflop(runs))


# --- approach 3: parametric loss -------------------------------------------------------------------
@dataclass
class ParametricFit:
    """L(N, D) = E + A/N^alpha + B/D^beta."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    objective: float
    optima: list = field(default_factory=list, repr=False)  # distinct optima [log A, log B, log E, α, β], best first

    def loss(self, n, d):
        return self.E + self.A / np.asarray(n, float) ** self.alpha + self.B / np.asarray(d, float) ** self.beta

    def predict(self, c: float) -> dict:
        a, b, alpha, beta = self.A, self.B, self.alpha, self.beta
        g = (alpha * a / (beta * b)) ** (1 / (alpha + beta))
        n = g * (c / 6) ** (beta / (alpha + beta))
        d = (c / 6) ** (alpha / (alpha + beta)) / g
        return {"compute": c, "n_opt": float(n), "d_opt": float(d), "loss": float(self.loss(n, d))}

    def coefficients(self) -> dict:
        return {"E": self.E, "A": self.A, "B": self.B, "alpha": self.alpha, "beta": self.beta,
                "a": self.beta / (self.alpha + self.beta), "b": self.alpha / (self.alpha + self.beta)}


def _objective(theta, log_n, log_d, log_l, delta):
    """Huber loss of log L̂ - log L summed over runs, and its gradient in theta = [log A, log B,
    log E, α, β] (log L̂ = logsumexp(log A - α log N, log B - β log D, log E))."""
    a, b, e, alpha, beta = theta
    t1, t2 = a - alpha * log_n, b - beta * log_d
    m = np.maximum(np.maximum(t1, t2), e)
    e1, e2, e3 = np.exp(t1 - m), np.exp(t2 - m), np.exp(e - m)
    total = e1 + e2 + e3
    r = m + np.log(total) - log_l
    abs_r = np.abs(r)
    c = np.minimum(abs_r, delta)
    g = np.copysign(c, r) / total  # Huber derivative times d log L̂ / d term, per term's softmax weight
    g1, g2 = g * e1, g * e2
    grad = np.array([g1.sum(), g2.sum(), g @ e3, -(g1 @ log_n), -(g2 @ log_d)])
    return float(c @ (abs_r - 0.5 * c)), grad


#: Hoffmann et al.'s initialisation grid (Appendix D.2), thinned: 4 x 4 x 3 x 3 x 3 = 432 starts
INIT_GRID = {"a": [0.0, 5.0, 10.0, 20.0], "b": [0.0, 5.0, 10.0, 20.0], "e": [-1.0, 0.0, 1.0],
             "alpha": [0.0, 0.5, 1.5], "beta": [0.0, 0.5, 1.5]}

#: how many of the grid's best distinct end points are polished to full convergence
N_POLISH = 8

#: L-BFGS-B to convergence, on the objective divided by delta. With scipy's defaults on the raw
#: Huber sum (~1e-3) the stopping rules (ftol is relative to max(|f|, 1); gtol 1e-5) end the run
#: along the shallow A-alpha / B-beta ridges long before the optimum: a bootstrap refit from the
#: full-data optimum then barely moves and the intervals collapse (issue 26).
_TIGHT = {"maxiter": 5000, "ftol": 1e-15, "gtol": 1e-10}


def _grid_starts(grid: dict) -> list[np.ndarray]:
    return [np.array([a, b, e, al, be]) for a in grid["a"] for b in grid["b"] for e in grid["e"]
            for al in grid["alpha"] for be in grid["beta"]]


def _scaled_objective(theta, log_n, log_d, log_l, delta):
    f, g = _objective(theta, log_n, log_d, log_l, delta)
    return f / delta, g / delta


def _lbfgs(x0, args, tight: bool):
    """One L-BFGS-B run: ``tight`` to convergence (the objective scaled by 1/delta, ``_TIGHT``);
    otherwise the quick screening run of the grid (scipy's defaults on the raw objective, which
    stop early). Returns (x, raw objective) or None when the end point is not finite."""
    from scipy.optimize import minimize

    if tight:
        res = minimize(_scaled_objective, x0, args=args, jac=True, method="L-BFGS-B", options=_TIGHT)
        fun = res.fun * args[3]
    else:
        res = minimize(_objective, x0, args=args, jac=True, method="L-BFGS-B", options={"maxiter": 1000})
        fun = res.fun
    if not (np.all(np.isfinite(res.x)) and np.isfinite(fun)):
        return None
    return res.x, float(fun)


def _distinct(points: list, tol: float = 1e-3) -> list:
    """``[(x, fun)]`` sorted by fun with near-duplicates of x (max abs difference < tol) dropped."""
    out = []
    for x, fun in sorted(points, key=lambda p: p[1]):
        if all(np.max(np.abs(x - y)) >= tol for y, _ in out):
            out.append((x, fun))
    return out


def fit_parametric(log_n, log_d, log_l, delta: float = 1e-3, starts: list | None = None, screen: bool = True,
                   n_polish: int = N_POLISH, progress=None, single_thread: bool = True) -> list:
    """Minimise the Huber loss of log L̂ against ``log_l`` (arrays of log N, log D, log L, shape
    (n,)) from every start ``[log A, log B, log E, α, β]``; returns the distinct optima
    ``[(x, objective)]``, best first. screen: run every start with the quick settings first and
    polish only the ``n_polish`` best distinct end points to convergence (the grid fit);
    otherwise every start runs to convergence (a few starts). single_thread: limit the BLAS pools
    to one thread meanwhile (``_single_thread``; False where the caller already did). ValueError
    when no start ends at a finite point."""
    if single_thread:
        with _single_thread():
            return fit_parametric(log_n, log_d, log_l, delta, starts, screen, n_polish, progress, False)
    args = (np.asarray(log_n, float), np.asarray(log_d, float), np.asarray(log_l, float), float(delta))
    ends = []
    for x0 in starts:
        r = _lbfgs(np.asarray(x0, float), args, tight=not screen)
        if r is not None:
            ends.append(r)
        if progress is not None:
            progress.update(1, best_objective=min(f for _, f in ends) if ends else math.nan)
    if screen:
        ends = [r for r in (_lbfgs(x, args, tight=True) for x, _ in _distinct(ends)[:n_polish]) if r is not None]
    if not ends:
        raise ValueError("approach 3: no start of the fit ended at a finite point")
    return _distinct(ends)


def approach3(runs: list[ScalingRun], delta: float = 1e-3, init_grid: dict | None = None,
              starts: list | None = None, progress: bool = False, bar: bool = False) -> ParametricFit:
    """Fit L(N, D) = E + A/N^α + B/D^β: Huber loss (``delta``) on log L, L-BFGS-B from every start of
    a grid (``INIT_GRID``, Hoffmann et al. Appendix D.2, as Besiroglu et al. 2024 replicate it),
    the ``N_POLISH`` best distinct end points run on to convergence, the best optimum kept;
    ``starts`` (``[log A, log B, log E, α, β]`` each) replace the grid and each runs to
    convergence. The fit's ``optima`` holds every distinct optimum, best first (the bootstrap's
    starts). DataError with fewer than 5 runs. progress: log ``approach 3 fit: done/total
    starts, elapsed, ETA`` (``lmrun.tracking.progress.Progress``; ``bar``: also a bar on a
    terminal)."""
    if len(runs) < 5:
        raise DataError(f"approach 3 needs at least 5 runs (got {len(runs)})")
    log_n = np.log([r.parameters for r in runs])
    log_d = np.log([r.tokens for r in runs])
    log_l = np.log([r.loss for r in runs])
    screen = starts is None
    if screen:
        starts = _grid_starts(init_grid or INIT_GRID)
    with _single_thread(), _progress(progress, len(starts), "approach 3 fit", "start", bar) as p:
        optima = fit_parametric(log_n, log_d, log_l, delta, starts, screen=screen, progress=p, single_thread=False)
    return _parametric(optima)


def _parametric(optima: list) -> ParametricFit:
    (a, b, e, alpha, beta), fun = optima[0]
    return ParametricFit(float(math.exp(e)), float(math.exp(a)), float(math.exp(b)), float(alpha), float(beta),
                         float(fun), optima=[x for x, _ in optima])


def _single_thread():
    """One BLAS/OpenMP thread while fitting: the arrays are tiny, and on a loaded machine a pool
    of spinning BLAS threads made the approach-3 fit ~20x slower (issue 26: 48.8 s against 2.5 s
    with OPENBLAS_NUM_THREADS=1)."""
    import scipy.optimize  # noqa: F401 - load SciPy's own OpenBLAS first, so that the limit covers it too

    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - a declared dependency
        import contextlib

        return contextlib.nullcontext()
    return threadpool_limits(limits=1)


# --- bootstrap ---------------------------------------------------------------------------------------
class _Silent:
    def update(self, n=1, **fields):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def _progress(enabled: bool, total: int, desc: str, unit: str, bar: bool):
    """A ``Progress`` (a start line, a line every ``LOG_EVERY_S`` and a final one) or a no-op."""
    if not enabled:
        return _Silent()
    from lmrun.tracking.progress import Progress

    return Progress(total, desc, unit=unit, bar=bar, log_start=True)


def refit_parametric(logs, optima: list, boot_starts: int | None, grid: list, rng: np.random.Generator) -> list:
    """One approach-3 bootstrap refit of ``logs`` = (log N, log D, log L) of a resample: from the
    full data's ``optima`` (up to ``boot_starts``, each run to convergence) and, to make up
    ``boot_starts``, points of ``grid`` drawn with ``rng``, screened with the best end point run to
    convergence; ``boot_starts=None``: the whole grid fit. Returns the distinct optima, best
    first. Call it inside ``_single_thread()``."""
    if boot_starts is None:
        return fit_parametric(*logs, starts=grid, screen=True, single_thread=False)

    def attempt(starts, screen):
        try:
            return fit_parametric(*logs, starts=starts, screen=screen, n_polish=1, single_thread=False)
        except ValueError:  # no finite end point from these starts
            return []

    near = list(optima[:boot_starts])
    found = attempt(near, False)
    if len(near) < boot_starts:
        pick = rng.choice(len(grid), min(boot_starts - len(near), len(grid)), replace=False)
        found += attempt([grid[i] for i in pick], True)
    if not found:
        raise ValueError("approach 3: no start of the refit ended at a finite point")
    return _distinct(found)


#: starts per approach-3 bootstrap refit (``bootstrap(boot_starts=)``, ``scaling.boot_starts``)
BOOT_STARTS = 8


def bootstrap(runs: list[ScalingRun], approach: str, targets: list[float], n_boot: int = 200, seed: int = 0,
              confidence: float = 0.95, progress: bool = False, bar: bool = False,
              boot_starts: int | None = BOOT_STARTS, init_grid: dict | None = None) -> dict:
    """Fit ``approach`` ("1", "2" or "3") on the data and on ``n_boot`` resamples; returns
    ``{"fit": the full-data fit, "coefficients": {name: (value, low, high)}, "predictions":
    [{compute, n_opt: (value, low, high), d_opt: ..., loss: ...}]}`` with percentile intervals.
    Approaches 1 and 2 resample budgets (whole IsoFLOP profiles); approach 3 resamples runs
    (Besiroglu et al. 2024, "Chinchilla Scaling: A replication attempt") and fits each resample
    as well as the data, from ``boot_starts`` starts: the full data's distinct optima (best first;
    each run to convergence), then points of the grid (``init_grid``, default ``INIT_GRID``)
    drawn at random (seeded), screened as in the grid fit with the best end point run to
    convergence — or, with ``boot_starts=None``, the whole grid fit. Resamples whose fit fails are skipped; with fewer
    than three units to resample the intervals are NaN (no honest interval exists).
    progress: log the approach-3 grid fit's and the resamples' progress (``approach 2 bootstrap:
    40/200 resamples (20%), elapsed …, ETA …``); bar: also bars on a terminal."""
    import logging

    rng = np.random.default_rng(seed)
    if progress:
        logging.getLogger(__name__).info("approach %s: fitting %d runs", approach, len(runs))
    fit = (approach3(runs, init_grid=init_grid, progress=progress, bar=bar) if approach == "3"
           else {"1": approach1, "2": approach2}[approach](runs))
    if approach == "3":
        grid = _grid_starts(init_grid or INIT_GRID)
        start_rng = np.random.default_rng([seed, 3])

        def refit(sample):
            logs = [np.log([getattr(r, k) for r in sample]) for k in ("parameters", "tokens", "loss")]
            return _parametric(refit_parametric(logs, fit.optima, boot_starts, grid, start_rng))
        units = [[r] for r in runs]
    else:
        refit = {"1": approach1, "2": approach2}[approach]
        used = {p[0] for p in fit.points}  # approach 2 leaves out budgets without a minimum
        units = [group for c, group in budgets(runs) if c in used]
    coefs, preds = [], []
    if len(units) < 3:  # resampling two units gives back the data or a degenerate sample: no interval
        n_boot = 0
    with _single_thread(), _progress(progress and n_boot > 0, n_boot, f"approach {approach} bootstrap", "resample",
                                     bar) as p:
        for i_boot in range(n_boot):
            idx = rng.integers(0, len(units), len(units))
            sample = [r for i in idx for r in units[i]]
            try:
                f = refit(sample)
            except (DataError, ValueError, np.linalg.LinAlgError):
                p.update(1, failed=i_boot + 1 - len(coefs))
                continue
            coefs.append(f.coefficients())
            preds.append([f.predict(c) for c in targets])
            p.update(1)
    if n_boot and len(coefs) < max(10, n_boot // 4):
        raise DataError(f"approach {approach}: only {len(coefs)} of {n_boot} bootstrap resamples could be fitted")
    lo_q, hi_q = 100 * (1 - confidence) / 2, 100 * (1 + confidence) / 2

    def interval(values, center):
        v = np.asarray(values, float)
        if np.isnan(v).all():
            return (center, math.nan, math.nan)
        return (center, float(np.nanpercentile(v, lo_q)), float(np.nanpercentile(v, hi_q)))

    full = fit.coefficients()
    out_coefs = {k: interval([c.get(k, math.nan) for c in coefs], full[k]) for k in full}
    out_preds = []
    for i, c in enumerate(targets):
        p = fit.predict(c)
        out_preds.append({"compute": c, **{k: interval([pp[i][k] for pp in preds], p[k])
                                           for k in ("n_opt", "d_opt", "loss")}})
    return {"fit": fit, "coefficients": out_coefs, "predictions": out_preds, "n_boot": len(coefs)}
