"""Chinchilla-style scaling-law fit: ``L(N, D) = E + A / N**alpha + B / D**beta``.

The fit minimises the Huber loss (``delta = 1e-3``) of the log-loss residuals of the log-sum-exp
form ``log L = LSE(a - alpha log N, b - beta log D, e)`` (``A = e^a``, ``B = e^b``, ``E = e^e``)
with L-BFGS-B, started from the best points of a grid of initialisations. Confidence intervals are
bootstrap percentiles (rows resampled with replacement). Under ``C = 6 N D`` the loss-minimising
split is ``N*(C) = G (C/6)^a``, ``D*(C) = (C/6)^b / G`` with ``a = beta / (alpha + beta)``,
``b = alpha / (alpha + beta)``, ``G = (alpha A / (beta B))^(1 / (alpha + beta))``.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import minimize

HUBER_DELTA = 1e-3
LAW_PARAMS = ("E", "A", "B", "alpha", "beta")
# grid of initialisations (a, b, e, alpha, beta), as in Hoffmann et al. 2022, slightly coarser
GRID = list(
    itertools.product(
        (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
        (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
        (-1.0, 0.0, 1.0),
        (0.2, 0.5, 1.0),
        (0.2, 0.5, 1.0),
    )
)
N_STARTS = 8  # L-BFGS-B runs from the grid points with the lowest objective
BOUNDS = [(-20.0, 60.0), (-20.0, 60.0), (-10.0, 5.0), (1e-3, 3.0), (1e-3, 3.0)]
# relative tolerance when grouping rows of equal compute C = 6 N D into an IsoFLOP profile
ISOFLOP_RTOL = 0.01


@dataclass(frozen=True)
class ScalingLaw:
    E: float
    A: float
    B: float
    alpha: float
    beta: float

    def loss(self, n, d):
        return self.E + self.A / np.power(n, self.alpha) + self.B / np.power(d, self.beta)

    @property
    def exponents(self) -> tuple[float, float]:
        """``(a, b)``: N*(C) ∝ C^a, D*(C) ∝ C^b."""
        s = self.alpha + self.beta
        return self.beta / s, self.alpha / s

    @property
    def coefficient(self) -> float:
        """``G = (alpha A / (beta B))^(1 / (alpha + beta))``."""
        return (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / (self.alpha + self.beta))

    def compute_optimal(self, c):
        """``(N*, D*)`` minimising the loss at compute ``c = 6 N D``."""
        a, b = self.exponents
        g = self.coefficient
        c6 = np.asarray(c, dtype=np.float64) / 6.0
        return g * c6**a, c6**b / g


@dataclass
class ScalingFit:
    law: ScalingLaw
    n_points: int
    ci: dict[str, tuple[float, float]]  # 95% bootstrap intervals of LAW_PARAMS, "a", "b"
    n_boot: int
    rmse_log: float  # root-mean-square of log L residuals
    isoflop: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        law = self.law
        a, b = law.exponents
        out: dict = {"n_points": self.n_points}
        for name in LAW_PARAMS:
            out[name] = getattr(law, name)
            out[f"{name}_ci"] = _interval(self.ci[name])
        out["compute_optimal"] = {
            "a": a,
            "a_ci": _interval(self.ci["a"]),
            "b": b,
            "b_ci": _interval(self.ci["b"]),
            "G": law.coefficient,
            "formula": "N*(C) = G (C/6)^a, D*(C) = (C/6)^b / G, C = 6 N D",
        }
        out["rmse_log_loss"] = self.rmse_log
        out["bootstrap_resamples"] = self.n_boot
        out["isoflop"] = self.isoflop
        out["isoflop_a"] = isoflop_exponent(self.isoflop)
        return out


def _interval(ci: tuple[float, float]) -> list[float] | None:
    """A JSON-ready interval: None without bootstrap resamples."""
    return None if any(math.isnan(v) for v in ci) else list(ci)


def _objective(theta, logn, logd, logl, delta=HUBER_DELTA):
    """Huber loss of the log-loss residuals (scaled by 1/delta) and its gradient."""
    a, b, e, alpha, beta = theta
    t1, t2 = a - alpha * logn, b - beta * logd
    m = np.maximum(np.maximum(t1, t2), e)
    w1, w2, w3 = np.exp(t1 - m), np.exp(t2 - m), np.exp(e - m)
    total = w1 + w2 + w3
    r = m + np.log(total) - logl
    absr = np.abs(r)
    value = np.where(absr <= delta, 0.5 * r * r, delta * (absr - 0.5 * delta)).sum() / delta
    dh = np.clip(r, -delta, delta) / delta
    g1, g2, g3 = dh * w1 / total, dh * w2 / total, dh * w3 / total
    grad = np.array([g1.sum(), g2.sum(), g3.sum(), -(g1 @ logn), -(g2 @ logd)])
    return value, grad


def _grid_objectives(logn, logd, logl, delta=HUBER_DELTA) -> np.ndarray:
    g = np.asarray(GRID)
    terms = np.stack(
        [
            g[:, 0:1] - g[:, 3:4] * logn,
            g[:, 1:2] - g[:, 4:5] * logd,
            np.broadcast_to(g[:, 2:3], (len(g), len(logn))),
        ]
    )
    m = terms.max(axis=0)
    r = np.abs(m + np.log(np.exp(terms - m).sum(axis=0)) - logl)
    return np.where(r <= delta, 0.5 * r * r, delta * (r - 0.5 * delta)).sum(axis=1)


def _minimise(starts, logn, logd, logl) -> np.ndarray:
    best, best_value = None, np.inf
    for x0 in starts:
        res = minimize(
            _objective,
            np.asarray(x0, dtype=np.float64),
            args=(logn, logd, logl),
            jac=True,
            method="L-BFGS-B",
            bounds=BOUNDS,
            options={"maxiter": 2000, "ftol": 1e-13, "gtol": 1e-10},
        )
        if res.fun < best_value:
            best, best_value = res.x, res.fun
    return best


def _law(theta) -> ScalingLaw:
    a, b, e, alpha, beta = (float(v) for v in theta)
    return ScalingLaw(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=alpha, beta=beta)


def fit_law(n, d, loss) -> tuple[ScalingLaw, np.ndarray]:
    """The best law by multi-start L-BFGS-B, and its raw parameters ``(a, b, e, alpha, beta)``."""
    logn, logd, logl = np.log(n), np.log(d), np.log(loss)
    order = np.argsort(_grid_objectives(logn, logd, logl))[:N_STARTS]
    theta = _minimise([GRID[i] for i in order], logn, logd, logl)
    return _law(theta), theta


def isoflop_profiles(n, d, loss, rtol: float = ISOFLOP_RTOL) -> list[dict]:
    """Per group of rows with equal compute ``C = 6 N D`` (within ``rtol``) and >= 3 distinct N:
    a parabola of loss vs log N and its optimum ``N*`` (only where the parabola opens upwards)."""
    c = 6.0 * n * d
    order = np.argsort(c)
    groups, current = [], [order[0]]
    for i in order[1:]:
        if c[i] <= c[current[0]] * (1 + rtol):
            current.append(i)
        else:
            groups.append(current)
            current = [i]
    groups.append(current)
    profiles = []
    for g in groups:
        g = np.asarray(g)
        if len(np.unique(n[g])) < 3:
            continue
        x = np.log(n[g])
        p2, p1, p0 = np.polyfit(x, loss[g], 2)
        if p2 <= 0:
            continue
        x_opt = -p1 / (2 * p2)
        profiles.append(
            {
                "compute": float(np.exp(np.log(c[g]).mean())),
                "n_points": len(g),
                "params_opt": float(np.exp(x_opt)),
                "loss_opt": float(p0 + p1 * x_opt + p2 * x_opt**2),
                "parabola": [float(p2), float(p1), float(p0)],
                "inside_range": bool(x.min() <= x_opt <= x.max()),
            }
        )
    return profiles


def isoflop_exponent(profiles: list[dict]) -> float | None:
    """Slope of log N* against log C over the IsoFLOP profiles (the exponent ``a`` estimated
    without the law), or None with fewer than 2 profiles."""
    if len(profiles) < 2:
        return None
    c = np.log([p["compute"] for p in profiles])
    n = np.log([p["params_opt"] for p in profiles])
    return float(np.polyfit(c, n, 1)[0])


def fit_scaling(n, d, loss, n_boot: int = 200, seed: int = 0) -> ScalingFit:
    """Fit the law, its bootstrap intervals and the IsoFLOP profiles of ``(N, D, loss)`` rows."""
    with one_blas_thread():
        return _fit_scaling(n, d, loss, n_boot, seed)


def one_blas_thread():
    """Context limiting BLAS to one thread: L-BFGS-B's 5x5 linear algebra is dominated by
    OpenBLAS thread wake-ups otherwise (10x slower on a busy box)."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


def _fit_scaling(n, d, loss, n_boot: int, seed: int) -> ScalingFit:
    n, d, loss = (np.asarray(v, dtype=np.float64) for v in (n, d, loss))
    law, theta = fit_law(n, d, loss)
    logn, logd, logl = np.log(n), np.log(d), np.log(loss)
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(n), len(n))
        t = _minimise([theta], logn[idx], logd[idx], logl[idx])
        s = _law(t)
        samples.append([s.E, s.A, s.B, s.alpha, s.beta, *s.exponents])
    names = [*LAW_PARAMS, "a", "b"]
    ci = {}
    if samples:
        lo, hi = np.percentile(np.asarray(samples), [2.5, 97.5], axis=0)
        ci = {k: (float(lo[i]), float(hi[i])) for i, k in enumerate(names)}
    else:
        ci = {k: (float("nan"), float("nan")) for k in names}
    rmse = float(np.sqrt(np.mean((np.log(law.loss(n, d)) - logl) ** 2)))
    profiles = isoflop_profiles(n, d, loss)
    return ScalingFit(law, len(n), ci, n_boot, rmse, profiles)
