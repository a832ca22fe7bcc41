"""Linear algebra of one interior-point step on the host: step lengths of the sign-constrained
multipliers, the Cholesky check of a matrix step, and the Schur system solve
(:mod:`sdp.solvers._interior_point`; step lengths to the PSD boundary are the backend's
:meth:`sdp.solvers.dense.DenseOps.max_step`)."""

from __future__ import annotations

import math
from typing import Any, Protocol

import numpy as np
from scipy import linalg

from sdp.ir import Array
from sdp.solvers._block_tridiag import BlockTridiagOps
from sdp.solvers._chordal import ChordalDualOps, DenseDualOps
from sdp.solvers.dense import Mat, NumpyOps


def step_ratio(v: Array, dv: Array) -> float:
    """Largest alpha with v + alpha dv >= 0 (inf if dv >= 0)."""
    neg = dv < 0
    return float(np.min(-v[neg] / dv[neg])) if neg.any() else math.inf


class SchurSystem:
    """Cholesky factor of the SPD Schur matrix with Jacobi scaling, reused for several
    right-hand sides (regularised if numerically singular, least squares as the last resort)."""

    def __init__(self, h: Array) -> None:
        self.dsc = 1.0 / np.sqrt(np.maximum(np.diagonal(h), 1e-300))
        self.hs = h * self.dsc[:, None]
        self.hs *= self.dsc[None, :]
        self.factor: Any = None
        if not np.all(np.isfinite(self.hs)):
            return  # least squares (which then raises on the non-finite entries)
        diag = np.diagonal(self.hs).copy()
        for reg in (0.0, 1e-13, 1e-11, 1e-9, 1e-7):
            a = self.hs.copy()
            a[np.diag_indices_from(a)] = diag + reg
            try:
                self.factor = linalg.cho_factor(a, overwrite_a=True, check_finite=False)
                break
            except linalg.LinAlgError:
                continue

    def solve(self, rhs: Array) -> Array:
        if self.factor is None:
            return np.asarray(linalg.lstsq(self.hs, rhs * self.dsc)[0]) * self.dsc
        return np.asarray(linalg.cho_solve(self.factor, rhs * self.dsc)) * self.dsc


class Factorizer(Protocol):
    """What :func:`cholesky_step` needs: a dense backend, or the block-tridiagonal primal
    algebra (:class:`sdp.solvers._block_tridiag.BlockTridiagOps`)."""

    def cholesky_upper(self, a: Mat) -> Any: ...


def cholesky_step(ops: Factorizer, base: Mat, d: Mat, alpha: float) -> tuple[float, Any]:
    """Shrink alpha until base + alpha d is positive definite; returns (alpha, its factor).

    The numpy backends (also behind :class:`~sdp.solvers._chordal.DenseDualOps`) and the
    chordal dual factor the sum without the generic temporaries (``cholesky_upper_of_step``: in
    place for dense, from the bands for block-tridiagonal, one n x n sum for the completion)."""
    fac = ops.ops if isinstance(ops, DenseDualOps) else ops  # the dense dual's backend
    for _ in range(30):
        if isinstance(fac, (NumpyOps, BlockTridiagOps, ChordalDualOps)):
            r = fac.cholesky_upper_of_step(base, d, alpha)
        else:
            r = ops.cholesky_upper(base + alpha * d)
        if r is not None:
            return alpha, r
        alpha *= 0.7
    return 0.0, None
