"""Linear algebra of one interior-point step: step lengths to the PSD boundary and the Schur
system solve (:mod:`sdp.solvers._interior_point`)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import linalg
from scipy.sparse.linalg import ArpackError, ArpackNoConvergence, LinearOperator, eigsh

from sdp.ir import Array
from sdp.solvers._lmi_structure import cholesky_upper

_DENSE_MAX = 300  # max_step: dense eigenvalue below this size, Lanczos above
_LANCZOS_RESTARTS = 15  # then the dense eigenvalue (seen: ARPACK looping for minutes)


def max_step(r: Array, d: Array, v0: Array | None = None) -> tuple[float, Array | None]:
    """Largest alpha with R^T R + alpha D >= 0: 1 / max(0, -lambda_min(R^{-T} D R^{-1})).

    Above ``_DENSE_MAX`` rows by Lanczos (ARPACK), started from ``v0`` if given (the previous
    call's eigenvector: predictor and corrector directions are close); returns that vector.
    Ritz values lie inside the spectrum, so a loose tolerance errs towards a longer step, which
    the caller's Cholesky check then shortens.
    """
    n = d.shape[0]
    vec: Array | None = None
    lam: float | None = None
    if n > _DENSE_MAX:

        def mv(v: Array) -> Array:
            w = linalg.solve_triangular(r, v, check_finite=False)
            return linalg.solve_triangular(r, d @ w, trans="T", check_finite=False)

        op = LinearOperator((n, n), matvec=mv, dtype=np.float64)
        try:
            vals, vecs = eigsh(
                op, k=1, which="SA", tol=1e-3, ncv=min(n - 1, 24), v0=v0, maxiter=_LANCZOS_RESTARTS
            )
            lam, vec = float(vals[0]), vecs[:, 0]
        except (ArpackNoConvergence, ArpackError):
            lam = None  # clustered spectrum: fall back to the dense eigenvalue below
    if lam is None:
        b = linalg.solve_triangular(r, d, trans="T", check_finite=False)
        c = linalg.solve_triangular(r, b.T, trans="T", check_finite=False)
        lam = float(linalg.eigvalsh((c + c.T) / 2, subset_by_index=[0, 0])[0])
    return (math.inf if lam >= 0 else 1.0 / -lam), vec


def step_ratio(v: Array, dv: Array) -> float:
    """Largest alpha with v + alpha dv >= 0 (inf if dv >= 0)."""
    neg = dv < 0
    return float(np.min(-v[neg] / dv[neg])) if neg.any() else math.inf


class SchurSystem:
    """Cholesky factor of the SPD Schur matrix with Jacobi scaling, reused for several
    right-hand sides (regularised if numerically singular, least squares as the last resort)."""

    def __init__(self, h: Array) -> None:
        self.dsc = 1.0 / np.sqrt(np.maximum(np.diagonal(h), 1e-300))
        self.hs = h * self.dsc[:, None] * self.dsc[None, :]
        self.factor: Any = None
        k = len(h)
        for reg in (0.0, 1e-13, 1e-11, 1e-9, 1e-7):
            try:
                self.factor = linalg.cho_factor(self.hs + reg * np.eye(k), check_finite=True)
                break
            except (linalg.LinAlgError, ValueError):
                continue

    def solve(self, rhs: Array) -> Array:
        if self.factor is None:
            return np.asarray(linalg.lstsq(self.hs, rhs * self.dsc)[0]) * self.dsc
        return np.asarray(linalg.cho_solve(self.factor, rhs * self.dsc)) * self.dsc


def cholesky_step(base: Array, d: Array, alpha: float) -> tuple[float, Array | None]:
    """Shrink alpha until base + alpha d is positive definite; returns (alpha, its factor)."""
    for _ in range(30):
        r = cholesky_upper(base + alpha * d)
        if r is not None:
            return alpha, r
        alpha *= 0.7
    return 0.0, None
