"""Data-mixing law: each loss as a function of the mixture proportions ``r`` (on the simplex),
``L_i(r) = c_i + k_i exp(sum_j t_ij r_j)``.

Since ``sum_j r_j = 1``, adding a constant to every ``t_ij`` only rescales ``k_i``; the fit fixes
this by ``sum_j t_ij = 0``, so ``c_i + k_i`` is the loss at the uniform mixture. Each loss is
fitted by least squares on relative residuals (scipy ``least_squares``, several starts); the
proportions minimising ``sum_i w_i L_i(r)`` are found by SLSQP on the simplex.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
from scipy.optimize import least_squares, minimize


@dataclass(frozen=True)
class MixingLaw:
    c: float
    k: float
    t: tuple[float, ...]  # one per proportion, summing to 0

    def loss(self, r):
        r = np.atleast_2d(np.asarray(r, dtype=np.float64))
        return self.c + self.k * np.exp(r @ np.asarray(self.t))


def n_params(n_proportions: int) -> int:
    """Free parameters of one loss's law: c, k and t less its gauge."""
    return 2 + n_proportions - 1


def _unpack(x, m: int) -> MixingLaw:
    free = x[2:]
    t = (*free, -float(np.sum(free)))
    return MixingLaw(c=float(x[0]), k=float(np.exp(x[1])), t=tuple(float(v) for v in t[:m]))


def _residuals(x, r, loss):
    law = _unpack(x, r.shape[1])
    return law.loss(r) / loss - 1.0


def fit_mixing_law(r, loss) -> tuple[MixingLaw, float]:
    """The law of one loss column and its RMS relative residual."""
    from megadiff.study.scaling import one_blas_thread

    with one_blas_thread():
        return _fit_mixing_law(r, loss)


def _fit_mixing_law(r, loss) -> tuple[MixingLaw, float]:
    r, loss = np.asarray(r, dtype=np.float64), np.asarray(loss, dtype=np.float64)
    m = r.shape[1]
    lo = float(loss.min())
    best, best_cost = None, np.inf
    for c_frac, t0 in itertools.product((0.0, 0.5, 0.9), (-1.0, 0.0, 1.0)):
        c0 = c_frac * lo
        x0 = np.array([c0, np.log(max(float(loss.mean()) - c0, 1e-6)), *([t0] * (m - 1))])
        if m > 1 and t0 != 0.0:
            x0[2] = -t0  # break the symmetry between proportions
        res = least_squares(
            _residuals,
            x0,
            args=(r, loss),
            bounds=([0.0, -30.0, *([-30.0] * (m - 1))], [lo, 30.0, *([30.0] * (m - 1))]),
            x_scale="jac",
            xtol=1e-12,
            ftol=1e-12,
        )
        if res.cost < best_cost:
            best, best_cost = res.x, res.cost
    law = _unpack(best, m)
    rms = float(np.sqrt(np.mean(_residuals(best, r, loss) ** 2)))
    return law, rms


def optimal_mixture(laws: list[MixingLaw], weights: list[float]) -> tuple[np.ndarray, float]:
    """Proportions on the simplex minimising ``sum_i w_i L_i(r)``, and that target."""
    m = len(laws[0].t)

    def target(r):
        return float(sum(w * law.loss(r)[0] for law, w in zip(laws, weights)))

    starts = [np.full(m, 1.0 / m)] + [np.eye(m)[j] * 0.8 + 0.2 / m for j in range(m)]
    best, best_value = None, np.inf
    for x0 in starts:
        res = minimize(
            target,
            x0,
            method="SLSQP",
            bounds=[(0.0, 1.0)] * m,
            constraints=[{"type": "eq", "fun": lambda r: np.sum(r) - 1.0}],
            options={"ftol": 1e-12, "maxiter": 500},
        )
        if res.fun < best_value:
            best, best_value = np.clip(res.x, 0.0, 1.0), res.fun
    best = best / best.sum()
    return best, target(best)
