"""The LipSDP LMI as a sum of rank-2 terms: dense assembly and the interior-point Schur matrix.

With S(rho, t) = -M(rho, T) (blocks as in :mod:`sdp.certificate`, unknowns (x, z_1..z_L)),

    S(rho, t) = S_c + rho E_0 + sum_i t_i A_i,
    S_c = -blkdiag(0, ..., 0, W_L^T W_L),   E_0 = blkdiag(I_r, 0, ..., 0),
    A_i = u_i v_i^T + v_i u_i^T,   u_i = e_i - a_i w_i,   v_i = e_i - b_i w_i,

where neuron i sits in hidden layer j, e_i is its coordinate in block z_{j+1} and w_i is row i
of W_j placed in block j. (Check: 2 (w - a v)(w - b v) = 2abv^2 - 2(a+b)vw + 2w^2 is the
quadratic form of the (v, w) block [[2ab, -(a+b)], [-(a+b), 2]] of -M.)

For symmetric Z and X the interior-point Schur matrix M_kl = tr(F_k Z F_l X) of the
unknowns (rho, t) only needs rank-2 projections (o = elementwise product):

    M_{t_i t_j} = (Z_vv o X_uu + Z_uu o X_vv + Z_uv^T o X_uv + Z_uv o X_uv^T)_ij
    M_{rho t_i} = (U^T Z E_0)_i . (V^T X E_0)_i + (V^T Z E_0)_i . (U^T X E_0)_i
    M_{rho rho} = <Z_00, X_00>,      <X, A_i> = 2 u_i^T X v_i,

with Y_uv = U^T Y V (N x N). Those come from three N x N blocks of Y: Y_hh (hidden rows and
columns), W~^T Y restricted to hidden columns, and W~^T Y W~ (W~ = [w_1..w_N] is block sparse), so
a Schur matrix costs O(n sum_j n_j n_{j+1} + N^2) on top of the dense inverse, n = r + N.
With Z = X it is the Hessian of -log det S (checked against finite differences in the tests).

Matrices live in the backend of :mod:`sdp.solvers.dense` (``lmi.ops``: numpy by default, torch
on a GPU); the functions below only use operations both share, and return host (numpy)
vectors where the Schur system needs them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Literal

import numpy as np
from scipy import linalg
from scipy.linalg import lapack

from sdp.certificate import Lmi
from sdp.ir import Array
from sdp.solvers.dense import DenseOps, Mat, NumpyOps

INPUT_RTOL = 1e-13
"""Singular values of W_0 at or below INPUT_RTOL * s_max are dropped by the input reduction
(below the float64 noise of W_0 itself; certificates are verified on the unreduced LMI)."""


def reduce_input(lmi: Lmi, *, rtol: float = INPUT_RTOL) -> Lmi:
    """The reduced LMI of :func:`reduce_input_by` (without naming the factorisation)."""
    return reduce_input_by(lmi, rtol=rtol)[0]


InputFactorisation = Literal["qr", "svd", "none"]
"""How :func:`reduce_input_by` reduced W_0: R^T of a QR factorisation (nothing dropped), U_r S_r
of an SVD (singular values at or below ``rtol`` * s_max dropped), or not at all."""


def reduce_input_by(lmi: Lmi, *, rtol: float = INPUT_RTOL) -> tuple[Lmi, InputFactorisation]:
    """Input reduction (design.md §3.2): W_0 = U S V^T -> U_r S_r (n_1 x r), and how.

    Multipliers and the SDP optimum are unchanged: M's input block only sees W_0 through
    W_0^T (.) W_0 = V S U^T (.) U S V^T, whose nonzero spectrum equals that of S U^T (.) U S.
    Keeps the singular values above ``rtol`` * s_max (``rtol`` 0: all of them, so r =
    min(n_0, n_1)). Returns ``lmi`` itself ("none") when that leaves W_0 with as many columns.
    A wide W_0 (n_1 < n_0, e.g. 256 x 784) is first reduced by a QR factorisation of W_0^T,
    whose n_1 x n_1 triangle R gives W_0 = R^T Q^T with Q^T a co-isometry, so R^T (n_1 x n_1)
    is already an exact reduction (the same argument with Q for V): it is returned as is
    ("qr") when nothing is to be dropped, i.e. ``rtol`` is 0 or R's reciprocal condition
    number estimate (LAPACK trcon, O(n_1^2)) is above :data:`_KEEP_ALL_RCOND`, far above
    ``rtol``; else U and S come from the SVD of R^T ("svd"; both backward stable; the SVD cost
    17 of the 26 ms of mnistfc-256x2's reduction). R^T and U S differ by an orthogonal change
    of the input coordinates, under which the SDP is invariant.
    """
    w0 = lmi.weights[0]
    if w0.shape[1] <= 1:
        return lmi, "none"
    if w0.shape[0] < w0.shape[1]:  # wide: W_0^T = Q R, so W_0 = R^T Q^T has R^T's U and S
        fac = linalg.qr(w0.T, mode="r", check_finite=False)[0][: w0.shape[0]]
        if rtol <= 0 or _rcond_upper(fac) > _KEEP_ALL_RCOND:
            reduced = Lmi((np.ascontiguousarray(fac.T), *lmi.weights[1:]), lmi.alpha, lmi.beta)
            return reduced, "qr"
        u, s, _ = linalg.svd(fac.T, full_matrices=False, lapack_driver="gesdd")
    else:
        u, s, _ = linalg.svd(w0, full_matrices=False, lapack_driver="gesdd")
    keep = s > rtol * (s[0] if s.size else 0.0) if rtol > 0 else np.ones(s.shape, dtype=bool)
    r = max(int(keep.sum()), 1)
    if r >= w0.shape[1]:
        return lmi, "none"
    return Lmi((u[:, :r] * s[:r], *lmi.weights[1:]), lmi.alpha, lmi.beta), "svd"


_KEEP_ALL_RCOND = 1e-6
"""R^T is kept unreduced (no SVD) above this reciprocal condition estimate: s_min / s_max is
then at least about 1e-6 / n_1 (the 1-norm estimate is rarely 10x off), far above the 1e-13
of :data:`INPUT_RTOL`. Were it wrong, W_0 would only keep a direction the SVD would drop:
the reduced problem stays exact."""


def _rcond_upper(r: Array) -> float:
    """LAPACK's estimate of 1 / (|R|_1 |R^{-1}|_1) for an upper triangular R (0 if it fails)."""
    rcond, info = lapack.dtrcon(r, norm="1", uplo="U")
    return float(rcond) if info == 0 and np.isfinite(rcond) else 0.0


@dataclass(frozen=True, eq=False)
class StructuredLmi:
    """Reduced LMI data laid out for the barrier method, its arrays in the backend ``ops``.

    ``offsets[k]`` is where block k (0 = input, k = z_k) starts in S; ``offsets[-1] = n``.
    Neuron i (global index over hidden layers) has coordinate ``r + i`` in S. The slope facts
    the code branches on are kept on the host (no device round trip per test): ``ab_layers[j]``
    (some a_i b_i != 0 in hidden layer j), ``any_a`` (some a_i != 0), ``all_b_one``.
    """

    weights: tuple[Mat, ...]
    a: Mat
    b: Mat
    offsets: tuple[int, ...]
    wl_gram: Mat
    ops: DenseOps
    a_host: Array
    b_host: Array
    ab_layers: tuple[bool, ...]
    any_a: bool
    all_b_one: bool

    @classmethod
    def from_lmi(cls, lmi: Lmi, ops: DenseOps | None = None) -> StructuredLmi:
        ops = NumpyOps() if ops is None else ops
        sizes = [lmi.input_size, *lmi.hidden_sizes]
        offsets = tuple(int(v) for v in np.concatenate([[0], np.cumsum(sizes)]))
        wl = lmi.weights[-1]
        a = np.concatenate(lmi.alpha) if lmi.depth else np.zeros(0)
        b = np.concatenate(lmi.beta) if lmi.depth else np.zeros(0)
        return cls(
            weights=tuple(ops.asarray(w) for w in lmi.weights),
            a=ops.asarray(a),
            b=ops.asarray(b),
            offsets=offsets,
            wl_gram=ops.asarray(wl.T @ wl),
            ops=ops,
            a_host=a,
            b_host=b,
            ab_layers=tuple(
                bool(np.any(aj * bj != 0)) for aj, bj in zip(lmi.alpha, lmi.beta, strict=True)
            ),
            any_a=bool(np.any(a != 0)),
            all_b_one=bool(np.all(b == 1.0)),
        )

    @property
    def depth(self) -> int:
        return len(self.weights) - 1

    @cached_property
    def weights32(self) -> tuple[Array, ...]:
        """float32 copies of the weights (numpy backend only: low-precision products)."""
        return tuple(np.asarray(w, dtype=np.float32) for w in self.weights)

    @property
    def n(self) -> int:
        return self.offsets[-1]

    @property
    def r(self) -> int:
        return self.offsets[1]

    @property
    def num_neurons(self) -> int:
        return self.n - self.r

    def block(self, k: int) -> slice:
        return slice(self.offsets[k], self.offsets[k + 1])

    def layer(self, j: int) -> slice:
        """Global neuron indices of hidden layer j (= block j+1 shifted by r)."""
        return slice(self.offsets[j + 1] - self.r, self.offsets[j + 2] - self.r)

    def assemble(self, rho: float, t: Array, *, constant: bool = True) -> Mat:
        """Dense S(rho, t) = -M(rho, T) (block tridiagonal, see sdp.certificate), in the backend.

        ``t`` is a host vector. ``constant=False`` leaves out S_c, giving the linear part
        rho E_0 + sum_i t_i A_i.
        """
        ops, n, L = self.ops, self.n, self.depth
        s = ops.zeros((n, n))
        ops.add_diag(s[: self.r, : self.r], rho)
        td = ops.asarray(t)
        for j in range(L):
            w, lay = self.weights[j], self.layer(j)
            tj = td[lay]
            lo, hi = self.block(j), self.block(j + 1)
            if self.ab_layers[j]:
                s[lo, lo] += 2 * (w.T * (self.a[lay] * self.b[lay] * tj)) @ w
            c = -((self.a[lay] + self.b[lay]) * tj)[:, None] * w
            s[hi, lo] = c
            s[lo, hi] = c.T
            ops.add_diag(s[hi, hi], 2 * tj)
        if L and constant:
            s[self.block(L), self.block(L)] -= self.wl_gram
        return s


def linear_part_times(lmi: StructuredLmi, y: Mat, wy: Mat, rho: float, t: Array) -> Mat:
    """(rho E_0 + sum_i t_i A_i) @ Y for symmetric Y, given wy = W~^T Y (:func:`rank2_blocks`).

    Row blocks only (contiguous): with s_j = -(a_j + b_j) t_j, block row z_{j+1} gets
    s_j o (W_j Y_j) + 2 t_j o Y_{j+1} and block row j gets W_j^T (s_j o Y_{j+1})
    (+ 2 W_j^T (a_j b_j t_j o W_j Y_j) where a_j b_j != 0), o scaling rows; W_j Y_j is a row
    block of W~^T Y, already known, so one n_j x n_{j+1} x n product per layer. A float32
    numpy ``y`` (with float32 ``wy``) gives a float32 product (the interior point's
    low-precision directions), with float32 copies of the weights.
    """
    ops = lmi.ops
    low = isinstance(y, np.ndarray) and y.dtype == np.float32
    weights = lmi.weights32 if low else lmi.weights
    out = ops.zeros_like(y)
    out[: lmi.r, :] = rho * y[: lmi.r, :]
    if low:
        td, a, b = (np.asarray(v, dtype=np.float32) for v in (t, lmi.a_host, lmi.b_host))
    else:
        td, a, b = ops.asarray(t), lmi.a, lmi.b
    for j in range(lmi.depth):
        w, lay = weights[j], lmi.layer(j)
        lo, hi = lmi.block(j), lmi.block(j + 1)
        tj = td[lay]
        sj = -((a[lay] + b[lay]) * tj)
        wyj = wy[lay, :]  # W_j Y[block j, :]
        out[hi, :] += sj[:, None] * wyj
        out[hi, :] += (2 * tj)[:, None] * y[hi, :]
        out[lo, :] += w.T @ (sj[:, None] * y[hi, :])
        if lmi.ab_layers[j]:
            out[lo, :] += 2 * (w.T @ ((a[lay] * b[lay] * tj)[:, None] * wyj))
    return out


@dataclass
class Rank2Blocks:
    """Y projected on the rank-2 factors: Y_uu = U^T Y U, Y_vv, Y_uv (N x N), Y_u0 = U^T Y E_0,
    Y_v0 (N x r) and Y_00 (r x r), for a symmetric n x n matrix Y."""

    uu: Mat
    vv: Mat
    uv: Mat
    u0: Mat
    v0: Mat
    y00: Mat
    wy: Mat  # W~^T Y (N x n): gives U^T Y = Y[hidden, :] - diag(a) wy, V^T Y likewise


def rank2_blocks(lmi: StructuredLmi, y: Mat, *, low_precision: bool = False) -> Rank2Blocks:
    """Projections of Y on u_i = e_i - a_i w_i and v_i = e_i - b_i w_i (module doc).

    Built from row blocks (contiguous): W~^T Y by layers, then the upper block triangle of the
    symmetric W~^T Y W~ (layer j against layers >= j) from column blocks of W~^T Y as a
    transposed BLAS operand, mirrored below (sum_j n_j n_{j+1} (N - offset_j) instead of
    n_j n_{j+1} N flops: 3/4 of them on two hidden layers, 7/12 on six). With
    ``low_precision`` (numpy backend) the products W~^T Y and W~^T Y W~ run in float32 and
    are returned in float64 (relative error ~1e-7); the N x N blocks are assembled in
    float64 either way, and Y_00 is Y's own block.
    """
    r, n, N, L = lmi.r, lmi.n, lmi.num_neurons, lmi.depth
    hid = slice(r, n)
    low = low_precision and isinstance(y, np.ndarray)
    ops = lmi.ops
    weights = lmi.weights32 if low else lmi.weights
    yg = y.astype(np.float32) if low else y
    wy = np.empty((N, n), dtype=np.float32) if low else ops.empty((N, n))  # W~^T Y
    for j in range(L):
        wy[lmi.layer(j), :] = weights[j] @ yg[lmi.block(j), :]
    p_ww = np.empty((N, N), dtype=np.float32) if low else ops.empty((N, N))  # W~^T Y W~
    for j in range(L):
        rows, right = lmi.layer(j), slice(lmi.layer(j).stop, N)
        p_ww[rows, rows.start :] = weights[j] @ wy[rows.start :, lmi.block(j)].T
        p_ww[right, rows] = p_ww[rows, right].T
    if low:
        wy, p_ww = wy.astype(np.float64), p_ww.astype(np.float64)
    p_we = wy[:, hid]  # (k, i): w_k^T Y e_i
    p_ee = y[hid, hid]
    a, b = lmi.a, lmi.b
    qb = p_we if lmi.all_b_one else b[:, None] * p_we  # (b o W~^T Y E)_ki
    uv = p_ee - qb.T
    vv = uv - qb
    vv += p_ww if lmi.all_b_one else (b[:, None] * b[None, :]) * p_ww
    if lmi.any_a:  # not for ReLU-like slopes [0, b]: saves four N x N passes
        qa = a[:, None] * p_we
        uv -= qa
        uv += (a[:, None] * b[None, :]) * p_ww
        uu = p_ee - qa
        uu -= qa.T
        uu += (a[:, None] * a[None, :]) * p_ww
    else:
        uu = p_ee  # a view of Y: the blocks are used before Y changes
    y_e = y[hid, :r]
    y_w = wy[:, :r]
    return Rank2Blocks(uu, vv, uv, y_e - a[:, None] * y_w, y_e - b[:, None] * y_w, y[:r, :r], wy)


def schur_matrix(ops: DenseOps, zb: Rank2Blocks, xb: Rank2Blocks) -> tuple[float, Array, Array]:
    """M_kl = tr(F_k Z F_l X) for F = (E_0, A_1..A_N): returns (M_rr, M_rt, M_tt) on the host.

    M_tt = Z_vv o X_uu + Z_uu o X_vv + Z_uv^T o X_uv + Z_uv o X_uv^T (o = elementwise);
    with Z = X this is the Hessian of -log det S.
    """
    m = zb.vv * xb.uu
    m += zb.uu * xb.vv
    m += ops.sym(zb.uv * xb.uv.T, 1.0)  # P + P^T, P = Z_uv o X_uv^T (P^T = Z_uv^T o X_uv)
    m_rt = ops.rowdot(zb.u0, xb.v0) + ops.rowdot(zb.v0, xb.u0)
    return float((zb.y00 * xb.y00).sum()), ops.to_numpy(m_rt), ops.to_numpy(m)


def constraint_values(ops: DenseOps, yb: Rank2Blocks) -> tuple[float, Array]:
    """(<Y, E_0>, <Y, A_i>) = (tr Y_00, 2 u_i^T Y v_i), the latter on the host."""
    return float(yb.y00.diagonal().sum()), ops.to_numpy(2.0 * yb.uv.diagonal())


def constraint_values_banded(lmi: StructuredLmi, y: Mat) -> tuple[float, Array]:
    """(<Y, E_0>, <Y, A_i>) for symmetric Y from its block-tridiagonal part only.

    2 u_i^T Y v_i = 2 (Y_ii - (a_i + b_i) e_i^T Y w_i + a_i b_i w_i^T Y w_i), and e_i, w_i
    live in blocks j+1 and j, so O(sum_j n_j^2 n_{j+1}) instead of a full projection, and
    O(sum_j n_j n_{j+1}) on layers with a_i b_i = 0 (ReLU-like: no w_i^T Y w_i term).
    """
    ops = lmi.ops
    out = ops.empty((lmi.num_neurons,))
    for j in range(lmi.depth):
        w, lay = lmi.weights[j], lmi.layer(j)
        lo, hi = lmi.block(j), lmi.block(j + 1)
        a, b = lmi.a[lay], lmi.b[lay]
        vals = y[hi, hi].diagonal() - (a + b) * ops.rowdot(y[hi, lo], w)
        if lmi.ab_layers[j]:
            vals += a * b * ops.rowdot(w @ y[lo, lo], w)
        out[lay] = 2.0 * vals
    return float(y[: lmi.r, : lmi.r].diagonal().sum()), ops.to_numpy(out)


def sym_product_values(
    lmi: StructuredLmi, zb: Rank2Blocks, z: Mat, xb: Rank2Blocks, x: Mat
) -> tuple[float, Array]:
    """(<E_0, sym(ZX)>, <A_i, sym(ZX)>) without forming ZX, sym(Y) = (Y + Y^T) / 2.

    <A_i, sym(ZX)> = (Z u_i).(X v_i) + (X u_i).(Z v_i), with the rows U^T Y and V^T Y read
    off Y[hidden, :] and W~^T Y (kept by :func:`rank2_blocks`): O(n N).
    """
    ops, hid = lmi.ops, slice(lmi.r, lmi.n)
    a, b = lmi.a[:, None], lmi.b[:, None]
    zh, xh = z[hid, :], x[hid, :]
    vals = ops.rowdot(zh - a * zb.wy, xh - b * xb.wy)
    vals += ops.rowdot(xh - a * xb.wy, zh - b * zb.wy)
    return float((z[: lmi.r, :] * x[: lmi.r, :]).sum()), ops.to_numpy(vals)


def rho_for_multipliers(lmi: StructuredLmi, t: Array) -> float:
    """Smallest rho with S(rho, t) > 0 in float64 (diagnostic; inf if the hidden block is not PD).

    S(rho, t) = [[rho I + G_00, G_0h], [G_h0, H]] > 0 iff H > 0 and rho > -lambda_min(G_00 -
    G_0h H^{-1} G_h0) (Schur complement), H and G from S(0, t).
    """
    ops = lmi.ops
    s = lmi.assemble(0.0, t)
    r = lmi.r
    rh = ops.cholesky_upper(s[r:, r:])
    if rh is None:
        return math.inf
    b = ops.solve_upper_transposed(rh, s[r:, :r])
    g = s[:r, :r] - b.T @ b
    return -ops.eigvalsh_min(g)
