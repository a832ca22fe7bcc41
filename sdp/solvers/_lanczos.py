"""The smallest eigenpair of a symmetric operator by Lanczos, stopped as soon as it is accurate.

The interior-point step lengths (:func:`sdp.solvers.dense.max_step`,
:meth:`sdp.solvers._block_tridiag.BlockTridiagOps.max_step`) need lambda_min(R^{-T} D R^{-1})
to a relative 1e-4 or so. ARPACK (``scipy.sparse.linalg.eigsh``) tests convergence only at the
end of each cycle of ``ncv`` Lanczos vectors, so it always paid a full cycle (25 products with
``ncv`` 24 on mnistfc-256x2) while the Ritz value was accurate after 6-22. Here the Lanczos
recurrence (Golub & Van Loan, Matrix Computations, 4th ed., section 10.1) runs with full
reorthogonalisation (twice, as Daniels, Gragg, Kaufman & Stewart 1976), and after step k the
smallest eigenpair (theta, s) of the tridiagonal T_k gives the residual of its Ritz vector
y = Q_k s exactly, ||A y - theta y|| = beta_k |s_k| (Paige's bound, section 10.1.4): it stops
once that is at most ``tol`` |theta|, ARPACK's own test. Some eigenvalue then lies within that
residual of theta, and theta >= lambda_min always (Cauchy interlacing), so a step length taken
from theta errs long, never short; the callers check the step by a Cholesky factorisation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy.linalg import lapack

from sdp.ir import Array

_SEED = 20261207  # the start vector when none is given: fixed, so solves are reproducible
LANCZOS_TOL = 1e-3  # step lengths: Ritz residual / |Ritz value| (ARPACK's nominal one before)


def smallest_eigenpair(
    matvec: Callable[[Array], Array],
    n: int,
    v0: Array | None = None,
    *,
    tol: float = 1e-4,
    max_steps: int = 120,
) -> tuple[float, Array] | None:
    """(theta, y): the smallest Ritz pair of the symmetric operator ``matvec`` (n x n) once
    ||A y - theta y|| <= tol |theta| (|y| = 1; |theta| floored at 1e-12 of the largest entry of
    T_k), or None if ``max_steps`` steps do not get there or the products are not finite (the
    caller then computes the eigenvalue densely).

    ``v0`` is the start vector (e.g. the previous call's y), else a fixed pseudo-random one.
    An exhausted Krylov space (beta ~ 0: an invariant subspace) ends the run with its exact
    smallest eigenvalue. Cost: one product and O(k n) flops per step k.
    """
    steps = max(1, min(n, max_steps))
    q = None if v0 is None else np.asarray(v0, dtype=np.float64).ravel()
    if q is None or q.shape != (n,) or not np.all(np.isfinite(q)) or not np.any(q):
        q = np.random.default_rng(_SEED).standard_normal(n)
    basis = np.empty((steps + 1, n))
    basis[0] = q / np.linalg.norm(q)
    alpha = np.empty(steps)
    beta = np.empty(steps)
    anorm = 0.0  # max |T_k| entry: the scale of the operator seen so far
    for k in range(steps):
        w = np.asarray(matvec(basis[k]), dtype=np.float64).ravel()
        alpha[k] = float(w @ basis[k])
        prev = basis[: k + 1]
        for _ in range(2):  # full reorthogonalisation against the whole basis, twice
            w -= (prev @ w) @ prev
        beta[k] = float(np.linalg.norm(w))
        if not (np.isfinite(alpha[k]) and np.isfinite(beta[k])):
            return None
        if k == 0:
            theta, s = float(alpha[0]), np.ones(1)
        else:
            vals, vecs, info = lapack.dstev(alpha[: k + 1], beta[:k], compute_v=1)
            if info != 0:
                return None
            theta, s = float(vals[0]), vecs[:, 0]  # ascending: the smallest first
        anorm = max(anorm, abs(alpha[k]), beta[k])
        if beta[k] * abs(s[-1]) <= tol * max(abs(theta), 1e-12 * anorm) or beta[k] <= 1e-13 * anorm:
            y = s @ basis[: k + 1]
            return theta, y / np.linalg.norm(y)
        basis[k + 1] = w / beta[k]
    return None


def lanczos_step(
    r: npt.NDArray[np.floating[Any]], d: Array, v0: Array | None = None
) -> tuple[float | None, Array | None]:
    """(1 / max(0, -lambda_min(R^{-T} D R^{-1})), Ritz vector) by float32 Lanczos products
    (:func:`sdp.solvers.dense.max_step`), or (None, None) if Lanczos fails (the caller then
    decides densely).

    LAPACK reads R in Fortran order: a C-ordered R is passed as the lower factor R^T (the
    same memory; no copy per solve). ``astype`` keeps the order and copies nothing when R is
    float32 already."""
    n = d.shape[0]
    r32, d32 = r.astype(np.float32, copy=False), d.astype(np.float32)
    tri, lower, trans = (r32, 0, (0, 1)) if r32.flags.f_contiguous else (r32.T, 1, (1, 0))

    def mv(v: Array) -> Array:
        w, info1 = lapack.strtrs(tri, v.astype(np.float32), lower=lower, trans=trans[0])
        out, info2 = lapack.strtrs(tri, d32 @ w, lower=lower, trans=trans[1])
        if info1 or info2:
            raise np.linalg.LinAlgError("strtrs failed")
        return out.astype(np.float64)

    try:
        pair = smallest_eigenpair(mv, n, v0, tol=LANCZOS_TOL)
    except np.linalg.LinAlgError:
        pair = None  # a failed float32 solve
    if pair is None:
        return None, None
    lam, vec = pair
    return (math.inf if lam >= 0 else 1.0 / -lam), vec
