"""Dense linear algebra of the structured LipSDP solver, behind one small interface.

The interior-point method (:mod:`sdp.solvers._interior_point`) keeps its n x n matrices
(S, X = S^{-1}, Z, the directions) and the N x N rank-2 projections in a *backend*; vectors of
length N + 1 (multipliers, Schur system) stay in numpy on the host. :class:`NumpyOps` is the
CPU backend (LAPACK through scipy, Lanczos step lengths). ``models.lipsdp_device.TorchOps``
implements the same protocol with torch, on any torch device (sdp itself never imports torch):

    >>> from sdp.solvers.structured import StructuredSolver
    >>> StructuredSolver(NumpyOps())  # the default  # doctest: +SKIP
    >>> StructuredSolver(TorchOps("cuda"))  # same iterations, matrices on the GPU  # doctest: +SKIP

S = S(y) itself is block tridiagonal (design.md §3.2): a backend hands the interior-point
method the algebra of S through :meth:`DenseOps.primal_ops` (block Cholesky, block inverse,
step lengths by block solves; :class:`NumpyOps` returns
:class:`sdp.solvers._block_tridiag.BlockTridiagOps`, ``TorchOps`` its torch counterpart).

Matrices are passed around as the backend's own arrays; the IPM code only uses what numpy
arrays and torch tensors share (``@``, ``+ - *``, slicing, ``.T``, ``.diagonal()``,
``.any()``, ``.all()``, ``.sum()``, in-place ``+=`` with another array or a scalar) and the
methods below. A backend signals numerical failure (a factorisation that breaks down) by
raising :class:`numpy.linalg.LinAlgError`; the solver then returns its best iterate.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import numpy as np
from scipy import linalg
from scipy.linalg import lapack

from sdp.ir import Array
from sdp.solvers._block_tridiag import BlockTridiagOps
from sdp.solvers._lanczos import lanczos_step

Mat = Any
"""A backend matrix or vector (numpy array for :class:`NumpyOps`, torch tensor for TorchOps)."""


class PrimalOps(Protocol):
    """The algebra of the primal matrix S (a backend matrix whose block-tridiagonal part over
    the given offsets is S): its factor (any object, None if S is not positive definite), the
    dense S^{-1} from that factor, and the largest alpha with S + alpha D >= 0 with a start
    vector for the next call. A dense backend is one (its factor is the dense Cholesky R)."""

    def cholesky_upper(self, a: Mat) -> Any: ...

    def inverse_from_cholesky(self, r: Any) -> Mat: ...

    def max_step(self, r: Any, d: Mat, v0: Any = None) -> tuple[float, Any]: ...


class DenseOps(Protocol):
    """What the structured solver needs from a dense linear-algebra backend (float64)."""

    name: str

    def asarray(self, a: Array) -> Mat:
        """``a`` as a float64 backend array (may share memory)."""
        ...

    def to_numpy(self, a: Mat) -> Array:
        """A numpy float64 copy or view of ``a``."""
        ...

    def zeros(self, shape: tuple[int, ...]) -> Mat: ...

    def zeros_like(self, a: Mat) -> Mat:
        """Zeros of ``a``'s shape (and memory layout, where the backend has a choice)."""
        ...

    def empty(self, shape: tuple[int, ...]) -> Mat: ...

    def eye(self, n: int) -> Mat: ...

    def copy(self, a: Mat) -> Mat: ...

    def add_diag(self, a: Mat, v: float | Mat) -> None:
        """a += diag(v) in place (``a`` may be a square view into a larger matrix)."""
        ...

    def sym(self, a: Mat, scale: float) -> Mat:
        """scale (a + a^T); may overwrite ``a``."""
        ...

    def rowdot(self, a: Mat, b: Mat) -> Mat:
        """sum_k a_ik b_ik, one value per row."""
        ...

    def vdot(self, a: Mat, b: Mat) -> float:
        """<a, b> = sum_ij a_ij b_ij."""
        ...

    def norm(self, a: Mat) -> float:
        """Frobenius norm."""
        ...

    def matmul(self, a: Mat, b: Mat, low_precision: bool = False) -> Mat:
        """a @ b; with ``low_precision`` the backend may compute it in float32 (the result is
        float64 and finite, else it is recomputed in float64)."""
        ...

    def cholesky_upper(self, a: Mat) -> Mat | None:
        """Upper factor R with a = R^T R, or None if ``a`` is not positive definite."""
        ...

    def inverse_from_cholesky(self, r: Mat) -> Mat:
        """The full symmetric (R^T R)^{-1}."""
        ...

    def solve_upper_transposed(self, r: Mat, b: Mat) -> Mat:
        """R^{-T} b for upper triangular R."""
        ...

    def eigvalsh_min(self, a: Mat) -> float: ...

    def eigvalsh_max(self, a: Mat) -> float: ...

    def max_step(self, r: Mat, d: Mat, v0: Any = None) -> tuple[float, Any]:
        """Largest alpha with R^T R + alpha D >= 0, i.e. 1 / max(0, -lambda_min(R^{-T} D R^{-1}))
        (inf if D >= 0), and a start vector for the next call (or None)."""
        ...

    def primal_ops(self, offsets: tuple[int, ...]) -> PrimalOps:
        """The algebra of S, block tridiagonal over ``offsets`` (``offsets[-1]`` = n): a
        structure-exploiting :class:`PrimalOps`, or the backend itself (dense)."""
        ...


def cholesky_upper(s: Array) -> Array | None:
    """Upper Cholesky factor R (S = R^T R) via LAPACK, or None if S is not positive definite.

    S is symmetric, so a C-ordered S is passed as S^T, its Fortran-ordered self: LAPACK then
    gets a plain copy instead of a transposing one (8.8 instead of 10.4 ms at n = 768)."""
    r, info = lapack.dpotrf(s.T if s.flags.c_contiguous else s, lower=0, clean=1, overwrite_a=0)
    return r if info == 0 else None


def cholesky_upper_of_step(base: Array, d: Array, alpha: float) -> Array | None:
    """:func:`cholesky_upper` of the symmetric base + alpha d, factored in place in one
    temporary (no copy for LAPACK: 6.5 instead of 10.3 ms at n = 768, measured)."""
    a = np.multiply(d, alpha)
    a += base
    r, info = lapack.dpotrf(a.T if a.flags.c_contiguous else a, lower=0, clean=1, overwrite_a=1)
    return r if info == 0 else None


def inverse_from_cholesky(r: Array) -> Array:
    """Full symmetric S^{-1} from the upper Cholesky factor (LAPACK potri, mirrored)."""
    x, info = lapack.dpotri(r, lower=0, overwrite_c=0)
    if info != 0:
        raise np.linalg.LinAlgError(f"dpotri failed ({info})")
    x += np.triu(x, 1).T  # potri filled the upper triangle; the lower one is zero
    return x


_SYM_TILE = 128


def sym_inplace(a: Array, scale: float) -> Array:
    """a <- scale (a + a^T) in place, tile by tile: the transposed read of a whole n x n
    matrix strides through memory (2.5-4x slower at n = 1792, measured); 128 x 128 tiles
    stay in cache."""
    n = a.shape[0]
    for i in range(0, n, _SYM_TILE):
        ii = slice(i, min(i + _SYM_TILE, n))
        d = a[ii, ii]
        d += d.T.copy()
        d *= scale
        for j in range(i + _SYM_TILE, n, _SYM_TILE):
            jj = slice(j, min(j + _SYM_TILE, n))
            t = a[ii, jj] + a[jj, ii].T
            t *= scale
            a[ii, jj] = t
            a[jj, ii] = t.T
    return a


_DENSE_MAX = 300  # max_step: dense eigenvalue below this size, Lanczos above


def max_step(r: Array, d: Array, v0: Array | None = None) -> tuple[float, Array | None]:
    """Largest alpha with R^T R + alpha D >= 0: 1 / max(0, -lambda_min(R^{-T} D R^{-1})).

    Above ``_DENSE_MAX`` rows by Lanczos (:func:`sdp.solvers._lanczos.smallest_eigenpair`),
    started from ``v0`` if given (the previous call's eigenvector: predictor and corrector
    directions are close); returns that vector. The Ritz value lies inside the spectrum, so the
    tolerance errs towards a longer step, which the caller's Cholesky check then shortens. The
    Lanczos products run on float32 copies of R and D
    (:func:`sdp.solvers._lanczos.lanczos_step`: half the memory traffic of these
    bandwidth-bound triangular solves; their ~1e-7 relative error is far inside the 1e-3
    tolerance, and the step is checked in float64).
    """
    n = d.shape[0]
    if n > _DENSE_MAX:
        step, vec = lanczos_step(r, d, v0)
        if step is not None:
            return step, vec
    b = linalg.solve_triangular(r, d, trans="T", check_finite=False)
    c = linalg.solve_triangular(r, b.T, trans="T", check_finite=False)
    lam = float(linalg.eigvalsh((c + c.T) / 2, subset_by_index=[0, 0])[0])
    return (math.inf if lam >= 0 else 1.0 / -lam), None


class NumpyOps:
    """The CPU backend: numpy arrays, LAPACK factorisations, Lanczos step lengths."""

    name = "numpy"

    def asarray(self, a: Array) -> Array:
        return np.asarray(a, dtype=np.float64)

    def to_numpy(self, a: Array) -> Array:
        return np.asarray(a)

    def zeros(self, shape: tuple[int, ...]) -> Array:
        return np.zeros(shape)

    def zeros_like(self, a: Array) -> Array:
        return np.zeros_like(a)

    def empty(self, shape: tuple[int, ...]) -> Array:
        return np.empty(shape)

    def eye(self, n: int) -> Array:
        return np.eye(n)

    def copy(self, a: Array) -> Array:
        return a.copy()

    def add_diag(self, a: Array, v: float | Array) -> None:
        idx = np.arange(min(a.shape))
        a[idx, idx] += v

    def sym(self, a: Array, scale: float) -> Array:
        return sym_inplace(a, scale)

    def rowdot(self, a: Array, b: Array) -> Array:
        return np.einsum("ik,ik->i", a, b)

    def vdot(self, a: Array, b: Array) -> float:
        return float(np.vdot(a, b))

    def norm(self, a: Array) -> float:
        return float(np.linalg.norm(a))

    def matmul(self, a: Array, b: Array, low_precision: bool = False) -> Array:
        if low_precision:
            with np.errstate(over="ignore", invalid="ignore"):
                f32 = np.float32
                out = (a.astype(f32, copy=False) @ b.astype(f32, copy=False)).astype(np.float64)
            if np.isfinite(out).all():
                return out
        return a @ b

    def cholesky_upper(self, a: Array) -> Array | None:
        return cholesky_upper(a)

    def cholesky_upper_of_step(self, base: Array, d: Array, alpha: float) -> Array | None:
        return cholesky_upper_of_step(base, d, alpha)

    def inverse_from_cholesky(self, r: Array) -> Array:
        return inverse_from_cholesky(r)

    def solve_upper_transposed(self, r: Array, b: Array) -> Array:
        return linalg.solve_triangular(r, b, trans="T", check_finite=False)

    def eigvalsh_min(self, a: Array) -> float:
        return float(linalg.eigvalsh(a, subset_by_index=[0, 0])[0])

    def eigvalsh_max(self, a: Array) -> float:
        k = a.shape[0] - 1
        return float(linalg.eigvalsh(a, subset_by_index=[k, k])[0])

    def max_step(self, r: Array, d: Array, v0: Any = None) -> tuple[float, Any]:
        return max_step(r, d, v0)

    def primal_ops(self, offsets: tuple[int, ...]) -> BlockTridiagOps:
        return BlockTridiagOps(offsets, dense_max=_DENSE_MAX)
