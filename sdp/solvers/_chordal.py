"""The dual matrix of the interior-point method on the block-tridiagonal (chordal) pattern.

The LipSDP data S_c, E_0 and every F_k are block tridiagonal over (x, z_1, ..., z_L)
(design.md §3.2), so the dual objective and equations only see the entries of Z on that
pattern P: Z may be kept as a partial matrix P(Z) that has some positive definite
completion. The pattern is chordal with maximal cliques C_k = blocks {k, k+1}; a partial matrix
on it has a PD completion iff every clique block Z[C_k, C_k] is PD, and its completion of
maximal determinant Zh has a block-tridiagonal inverse (Grone, Johnson, Sa & Wolkowicz, "Positive
definite completions of partial Hermitian matrices", Linear Algebra Appl. 58, 1984; Fukuda,
Kojima, Murota & Nakata, "Exploiting sparsity in semidefinite programming via matrix completion
I", SIAM J. Optim. 11, 2000). For this chain of cliques it is the covariance of the Gauss-Markov
chain with the given consecutive marginals:

    Zh_{l,k} = A_{l-1} Zh_{l-1,k}  (l > k + 1),   A_k = Z_{k+1,k} Z_kk^{-1},
    Zh^{-1} = B^T D^{-1} B,   B unit lower block bidiagonal, B_{k+1,k} = -A_k,
    D = blkdiag(Z_00, P_0, ..., P_{L-1}),   P_k = Z_{k+1,k+1} - Z_{k+1,k} Z_kk^{-1} Z_{k,k+1},

so the factor costs O(sum_k n_k^3) and needs no fill (Andersen, Dahl & Vandenberghe,
"Implementation of nonsymmetric interior-point methods for linear optimization over sparse
matrix cones", Math. Prog. Comp. 2, 2010).

The completion-based HKM step (Fukuda et al. 2000; Nakata, Fujisawa, Fukuda, Kojima & Murota,
"Exploiting sparsity in semidefinite programming via matrix completion II: implementation and
numerical results", Math. Program. 95, 2003) is the dense HKM step of
:mod:`sdp.solvers._interior_point` with Zh in place of Z, kept on the pattern:

    dZ = P(sigma mu X - Z - sym(Zh dS X) - C),   M_kl = tr(F_k Zh F_l X),

which satisfies the same Schur equations (A(dZ) only reads P(dZ)). P(sym(Zh K)) needs only the
blocks (i, j), |i - j| <= 1, of Zh K: block row i of Zh times three column blocks of K, about
3 n_k / n of the dense product. Mehrotra's corrector uses C = P(sym(P(dZ_a) dS_a X)) (block
tridiagonal times dense, restricted to the pattern: O(n_k^3) per block); any symmetric C keeps
the corrected equations exact. The dual step length is the smallest over the cliques (Lanczos on
each clique's R_C^{-T} dZ_C R_C^{-1}, R_C the clique's Cholesky factor, read off the completion
factor), then checked by the completion's Cholesky factors.

:class:`ChordalDualOps` is selected by :class:`~sdp.solvers._interior_point.IpmTuning`
(``chordal_min_depth``) on the numpy backend; :class:`DenseDualOps` is the dense Z of the
backend (the default).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.linalg import lapack

from sdp.ir import Array
from sdp.solvers.dense import DenseOps, Mat, max_step, sym_inplace


def _chol(a: Array) -> Array | None:
    r, info = lapack.dpotrf(a, lower=0, clean=1, overwrite_a=0)
    if info != 0 or not np.all(np.isfinite(np.diagonal(r))):
        return None
    return np.asarray(r)


def _trs(r: Array, b: Array, trans: int) -> Array:
    x, info = lapack.dtrtrs(r, b, lower=0, trans=trans)
    if info != 0:
        raise np.linalg.LinAlgError(f"dtrtrs failed ({info})")
    return np.asarray(x)


@dataclass
class Completion:
    """Factor of the max-determinant completion Zh of a partial block-tridiagonal PD matrix.

    For k = 0..L-1 (L + 1 blocks): ``chol[k]`` = Q_k (upper, Z_kk = Q_k^T Q_k),
    ``h[k]`` = Q_k^{-T} Z_{k,k+1}, ``gain[k]`` = A_k = Z_{k+1,k} Z_kk^{-1} and ``schur[k]`` the
    upper Cholesky factor of P_k = Z_{k+1,k+1} - h_k^T h_k; ``pattern`` is the partial matrix
    (dense array, zero off the pattern). Clique C_k = blocks {k, k+1} has the Cholesky factor
    [[Q_k, h_k], [0, chol(P_k)]].
    """

    pattern: Array
    offsets: tuple[int, ...]
    chol: list[Array]
    h: list[Array]
    gain: list[Array]
    schur: list[Array]
    schur_mat: list[Array]  # P_k

    def clique_factor(self, k: int) -> Array:
        """Upper Cholesky factor of the clique block Z[C_k, C_k] (dense)."""
        o = self.offsets
        nk, m = o[k + 1] - o[k], o[k + 2] - o[k]
        r = np.zeros((m, m))
        r[:nk, :nk] = self.chol[k]
        r[:nk, nk:] = self.h[k]
        r[nk:, nk:] = self.schur[k]
        return r

    def times(self, k: Array, low_precision: bool = False) -> Array:
        """Zh K for a dense K from the factors, Zh = B^{-1} D B^{-T} (module doc): block rows
        W_L = K_L, W_k = K_k + A_k^T W_{k+1}; V = D W; Y_0 = V_0, Y_{k+1} = V_{k+1} + A_k Y_k.
        3 L + 1 products of n_k x n_k x n instead of one n x n x n (0.39 of it on 256x6)."""
        o = self.offsets
        nb = len(o) - 1
        bl = [slice(o[i], o[i + 1]) for i in range(nb)]
        dt = np.float32 if low_precision else np.float64
        gain: list[Any] = [g.astype(dt) for g in self.gain]
        dmat: list[Any] = [self.pattern[bl[0], bl[0]].astype(dt)]
        dmat += [p.astype(dt) for p in self.schur_mat]
        w: Any = k.astype(dt)  # a copy
        for i in reversed(range(nb - 1)):
            w[bl[i]] += gain[i].T @ w[bl[i + 1]]
        y = np.empty_like(w)
        y[bl[0]] = dmat[0] @ w[bl[0]]
        for i in range(nb - 1):
            y[bl[i + 1]] = dmat[i + 1] @ w[bl[i + 1]]
            y[bl[i + 1]] += gain[i] @ y[bl[i]]
        return y.astype(np.float64) if low_precision else y

    def dense(self) -> Array:
        """The completion Zh (dense): Zh_{l, :o_{l-1}} = A_{l-1} Zh_{l-1, :o_{l-1}} by rows."""
        o = self.offsets
        zh = self.pattern.copy()
        for lb in range(2, len(o) - 1):
            rows, prev, cols = slice(o[lb], o[lb + 1]), slice(o[lb - 1], o[lb]), slice(0, o[lb - 1])
            blk = self.gain[lb - 1] @ zh[prev, cols]
            zh[rows, cols] = blk
            zh[cols, rows] = blk.T
        return zh


def completion(z: Array, offsets: tuple[int, ...]) -> Completion | None:
    """The max-det completion factor of the block-tridiagonal part of ``z`` (module doc), or
    None if some clique block is not positive definite (no PD completion exists)."""
    o = offsets
    nb = len(o) - 1
    pattern = np.zeros_like(z)
    for k in range(nb):
        bk = slice(o[k], o[k + 2] if k + 1 < nb else o[k + 1])
        pattern[o[k] : o[k + 1], bk] = z[o[k] : o[k + 1], bk]
        if k + 1 < nb:
            pattern[o[k + 1] : o[k + 2], o[k] : o[k + 1]] = z[
                o[k] : o[k + 1], o[k + 1] : o[k + 2]
            ].T
    chol: list[Array] = []
    h: list[Array] = []
    gain: list[Array] = []
    schur: list[Array] = []
    schur_mat: list[Array] = []
    if nb == 1:
        r = _chol(pattern)
        return None if r is None else Completion(pattern, o, [r], [], [], [], [])
    for k in range(nb - 1):
        bk, bn = slice(o[k], o[k + 1]), slice(o[k + 1], o[k + 2])
        q = _chol(pattern[bk, bk])
        if q is None:
            return None
        hk = _trs(q, pattern[bk, bn], 1)  # Q_k^{-T} Z_{k,k+1}
        p = pattern[bn, bn] - hk.T @ hk
        rp = _chol(p)
        if rp is None:
            return None
        chol.append(q)
        h.append(hk)
        gain.append(_trs(q, hk, 0).T)  # (Z_kk^{-1} Z_{k,k+1})^T = Z_{k+1,k} Z_kk^{-1}
        schur.append(rp)
        schur_mat.append(p)
    return Completion(pattern, o, chol, h, gain, schur, schur_mat)


class ChordalDualOps:
    """The dual matrix on the block-tridiagonal pattern (numpy backend; module doc).

    ``zmat`` iterates are dense arrays that are zero off the pattern; ``cholesky_upper``
    returns their :class:`Completion` (None if not completable), ``completed`` the dense Zh
    that the Schur matrix and the products use.
    """

    chordal = True

    def __init__(self, ops: DenseOps, offsets: tuple[int, ...]) -> None:
        self.ops = ops
        self.offsets = offsets
        nb = len(offsets) - 1
        self._spans = [
            (max(i - 1, 0), min(i + 1, nb - 1)) for i in range(nb)
        ]  # column blocks of the pattern in block row i

    def project(self, a: Array) -> Array:
        """P(a) in place: zero outside the block-tridiagonal pattern."""
        o = self.offsets
        nb = len(o) - 1
        for i in range(nb):
            lo, hi = self._spans[i]
            a[o[i] : o[i + 1], : o[lo]] = 0.0
            a[o[i] : o[i + 1], o[hi + 1] :] = 0.0
        return a

    def cholesky_upper(self, z: Array) -> Completion | None:
        return completion(z, self.offsets)

    def completed(self, fac: Completion) -> Array:
        return fac.dense()

    def add_scaled(self, out: Array, x: Array, scale: float) -> None:
        """out += scale P(x) (``out`` zero off the pattern stays so)."""
        o = self.offsets
        for i, (lo, hi) in enumerate(self._spans):
            out[o[i] : o[i + 1], o[lo] : o[hi + 1]] += scale * x[o[i] : o[i + 1], o[lo] : o[hi + 1]]

    def sym_product(self, zh: Array, k: Array, scale: float, low_precision: bool) -> Array:
        """scale P(Zh K + K^T Zh) for symmetric Zh: block row i of Zh times the pattern's
        column blocks of K (about 3 n_k / n of the dense product), float32 if asked."""
        if low_precision:
            with np.errstate(over="ignore", invalid="ignore"):
                out = self._sym_product(zh.astype(np.float32), k.astype(np.float32), scale)
            if np.isfinite(out).all():
                return out.astype(np.float64)
        return self._sym_product(zh, k, scale)

    def full_sym_product(self, fac: Completion, k: Array, scale: float, low: bool) -> Array:
        """scale (Zh K + K^T Zh), dense, by :meth:`Completion.times` (float32 if ``low`` and
        finite)."""
        y = None
        if low:
            with np.errstate(over="ignore", invalid="ignore"):
                y = fac.times(k, True)
            if not np.isfinite(y).all():
                y = None
        if y is None:
            y = fac.times(k)
        return sym_inplace(y, scale)

    def _sym_product(self, zh: Array, k: Array, scale: float) -> Array:
        o = self.offsets
        nb = len(o) - 1
        rows = []
        for i, (lo, hi) in enumerate(self._spans):
            rows.append(zh[o[i] : o[i + 1], :] @ k[:, o[lo] : o[hi + 1]])
        return self._sym_rows(rows, scale, zh.dtype, nb)

    def _sym_rows(self, rows: list[Array], scale: float, dtype: Any, nb: int) -> Array:
        """scale (Y + Y^T) on the pattern from the pattern rows of Y (``rows[i]`` = block row i
        restricted to column blocks span(i))."""
        o = self.offsets
        out = np.zeros((o[-1], o[-1]), dtype=dtype)
        for i in range(nb):
            bi = slice(o[i], o[i + 1])
            lo = self._spans[i][0]
            yi = rows[i]
            c0 = o[i] - o[lo]
            d = yi[:, c0 : c0 + o[i + 1] - o[i]]
            out[bi, bi] = scale * (d + d.T)
            if i + 1 < nb:
                bn = slice(o[i + 1], o[i + 2])
                up = yi[:, c0 + o[i + 1] - o[i] :]  # Y_{i,i+1}
                low = rows[i + 1][:, : o[i + 1] - o[i]]  # Y_{i+1,i}
                blk = scale * (low + up.T)
                out[bn, bi] = blk
                out[bi, bn] = blk.T
        return out

    def corrector(self, dz: Array, k: Array, scale: float, low_precision: bool) -> Array:
        """scale P(dZ K + K^T dZ) for the predictor's dense dZ (:meth:`sym_product`)."""
        return self.sym_product(dz, k, scale, low_precision)

    def max_step(
        self, fac: Completion, d: Array, v0: list[Array | None] | None = None
    ) -> tuple[float, list[Array | None] | None]:
        """Largest alpha with P(Z) + alpha P(dZ) completable: 1 / max(0, -lambda_min) over
        the cliques of R_C^{-T} dZ_C R_C^{-1}, clique by clique (:func:`sdp.solvers.dense.
        max_step`: Lanczos that stops once converged, float32 solves; dense eigenvalues on small
        cliques). ``v0`` and the returned value are the cliques' Ritz vectors (start vectors
        for the next search). Ritz values err towards a longer step, which the caller's check
        shortens.

        One Lanczos run per clique, not one on their block-diagonal operator: started from the
        predictor's vector, the joint run stops at a converged Ritz value of the clique that
        vector lives in, which need not be the smallest (ERAN 9x200, iteration 1: step 0.70
        against the true 0.63, so the Cholesky check cut it to 0.47 and the solve took one
        more iteration).
        """
        o = self.offsets
        nb = len(o) - 1
        if nb == 1:
            step, vec = self.ops.max_step(fac.chol[0], d, None if v0 is None else v0[0])
            return step, [vec]
        step = math.inf
        vecs: list[Array | None] = []
        for k in range(nb - 1):
            a, b = o[k], o[k + 2]
            start = None if v0 is None else v0[k]
            step_k, vec = max_step(fac.clique_factor(k), d[a:b, a:b], start)
            step = min(step, step_k)
            vecs.append(vec)
        return step, vecs


class DenseDualOps:
    """The dense dual matrix of the backend (``zmat`` is Z itself)."""

    chordal = False

    def __init__(self, ops: DenseOps) -> None:
        self.ops = ops

    def project(self, a: Mat) -> Mat:
        return a

    def cholesky_upper(self, z: Mat) -> Mat | None:
        return self.ops.cholesky_upper(z)

    def completed(self, fac: Any) -> None:
        return None  # zmat is the dense Z

    def add_scaled(self, out: Mat, x: Mat, scale: float) -> None:
        out += scale * x

    def sym_product(self, zh: Mat, k: Mat, scale: float, low_precision: bool) -> Mat:
        return self.ops.sym(self.ops.matmul(zh, k, low_precision), scale)

    def corrector(self, dz: Mat, k: Mat, scale: float, low_precision: bool) -> Mat:
        return self.ops.sym(self.ops.matmul(dz, k, low_precision), scale)

    def max_step(self, fac: Mat, d: Mat, v0: Any = None) -> tuple[float, Any]:
        return self.ops.max_step(fac, d, v0)
