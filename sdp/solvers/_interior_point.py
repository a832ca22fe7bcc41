"""Primal-dual interior-point method (HKM direction) for LipSDP on the rank-2 structure.

The structured solver's problem (S = -M, :mod:`sdp.solvers._lmi_structure`):

    minimise rho  s.t.  S(y) = S_c + rho E_0 + sum_k x_k F_k >= 0,  x_k >= 0 (k with w_k = 1),

with y = (rho, x) and F_k = A_i (LipSDP-Neuron) or sum_{i in layer k} A_i (LipSDP-Layer);
w_k = 1 only where S > 0 does not already imply x_k > 0 (:meth:`Grouping.sign_needed`).
Its dual: maximise <Z_LL, W_L^T W_L> s.t. tr Z_00 = 1, <Z, F_k> + w_k z_k = 0, Z >= 0,
z >= 0; any such Z proves rho* >= <Z_LL, W_L^T W_L> (weak duality).

The iterate keeps S = S(y) + pi I (pi > 0 only for a start that is not strictly feasible;
the residual shrinks by (1 - a_p) per step and is dropped once negligible). Each iteration
solves the (m+1) x (m+1) Schur system of the HKM direction (Helmberg, Rendl, Vanderbei &
Wolkowicz 1996; Kojima, Shindoh & Hara 1997; Monteiro 1997) twice, as Mehrotra's
predictor-corrector (Mehrotra 1992; for SDP as in SDPT3, Toh, Todd & Tutuncu 1999):

    (M + diag(0, w z/x)) dy = sigma mu (<X, F_k> + w_k/x_k) - c + pi <sym(Z X), F_k>
                              - <C, F_k> - w_k c_k/x_k,      M_kl = tr(F_k Z F_l X),
    dS = sum_k dy_k F_k - pi I,   dZ = sigma mu X - Z - sym(Z dS X) - C,
    dz = w (sigma mu/x - z - (z dx + c)/x),

with X = S^{-1}. The predictor has sigma = 0 and no correction; its step lengths give
sigma = (gap after the predictor step / gap)^3 and the corrector uses C = sym(dZ_a dS_a X),
c = dx_a dz_a. M is built in O(N^2) from rank-2 projections of Z and X; one iteration costs
three dense n x n products, Cholesky factors of S and Z and the inverse of S. The corrector
cuts the iteration count about 3x (mnistfc-256x2: 17 instead of 54). Step lengths use the
smallest eigenvalue of R^{-T} dS R^{-1} (Lanczos), then a Cholesky check. S's factor,
inverse and step length use its block-tridiagonal structure as the backend provides it
(:func:`primal_ops`, :mod:`sdp.solvers._block_tridiag`); Z is dense. While the
complementarity <S, Z> is large relative to |S| |Z|, the predictor's two products run in
float32 (2.7x faster here): they only set sigma and C, and any symmetric C keeps the
corrected equations exact. So does the corrected direction's product (``float32_step``):
its error only leaves a dual residual A(Z) - c of ~1e-7 |Z|, which the next Newton step
removes (its right-hand side aims at A(Z + dZ) = c whatever A(Z) is), and the primal iterate
is exact; measured: same iterations and certified bounds on mnistfc-256x6 and ERAN 9x200.
A numerical failure mid-solve ends it with the best iterate.

The n x n matrices live in the backend ``lmi.ops`` (:mod:`sdp.solvers.dense`: numpy/LAPACK,
or torch on a GPU); the multipliers and the Schur system stay in numpy on the host.
On the numpy backend, nets of depth >= ``IpmTuning.chordal_min_depth`` (3) keep Z on the
block-tridiagonal pattern of S and use its max-determinant completion Zh in the products
(:mod:`sdp.solvers._chordal`, the iterate's ``dual``); the steps are the same with Zh for Z.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from sdp.ir import Array
from sdp.solvers._chordal import ChordalDualOps, DenseDualOps
from sdp.solvers._ipm_steps import SchurSystem, cholesky_step, step_ratio
from sdp.solvers._lmi_structure import (
    Rank2Blocks,
    StructuredLmi,
    constraint_values,
    constraint_values_banded,
    linear_part_times,
    rank2_blocks,
    rho_for_multipliers,
    schur_matrix,
    sym_product_values,
)
from sdp.solvers.base import Progress
from sdp.solvers.dense import DenseOps, Mat, NumpyOps, PrimalOps

Mask = npt.NDArray[np.bool_]


@dataclass(frozen=True)
class IpmTuning:
    """The interior-point method's tuning knobs, typed (defaults: the measured best, see
    docs/benchmarks.md). :class:`~sdp.solvers.structured.StructuredSolver` takes one."""

    sigma_min: float = 0.0
    sigma_fixed: float | None = None
    corrector: bool = True  # Mehrotra's second-order correction
    float32_above: float = 1e-4  # predictor products in float32 while <S,Z> > this |S| |Z|
    float32_predictor: float | None = 1e-5  # dense dual: the predictor's alone, down to this
    float32_step: bool = True  # the corrected direction's Z dS X too, under the same test
    float32_projections: bool = True  # the rank-2 projections' products too (same test)
    float32_corrector: float | None = 1e-6  # corrector in float32 while <S,Z> > this |S| |Z|
    step_frac: float = 0.95  # fraction of the step to the boundary (without the adaptive one)
    step_frac_adaptive: bool = True  # 0.9 + 0.09 min(last a_p, a_d) instead (SDPT3): with
    # rho_factor 1.05, 256x6 16 -> 15 and ERAN 21 -> 20 iterations, and 256x6 no longer swings
    # 15-31 with rho_factor (docs/benchmarks.md)
    z0_scale: float = 100.0  # tr Z_0,00 = z0_scale (the dual constraint asks for 1)
    z0_identity: bool = True  # Z_0 = z0_scale I / r; False: z0_scale X_0 / tr X_0,00
    newton_start_depth: int = 4  # Z_0 from the barrier Newton step (dual feasible) up to it
    shift0: float = 0.0  # S_0 = S(y_0) + shift0 max|diag S(y_0)| I (an infeasible start)
    rho_factor: float = 1.05  # start at rho = rho_factor * rho(t0) (1.1 with the fixed fraction)
    chordal_min_depth: int | None = 3  # Z on the block-tridiagonal pattern from this depth
    chordal_newton_start: bool = True  # with the chordal dual: the Newton start at any depth
    float32_start: bool = True  # the Newton dual start's X dS X in float32
    predictor_finish: float | None = 0.8  # last step: the predictor alone if it reaches this x eps
    floor_gap: float | None = 1e-8  # below this gap, stop (inaccurate) once it stops falling:
    floor_window: int = 10  # it has not halved in this many iterations (the float64 floor)


@dataclass(frozen=True)
class IpmSettings(IpmTuning):
    """One solve's settings: the tuning plus its targets and limits."""

    eps: float = 1e-7  # relative gap target (rho(t) - lower) / rho(t)
    max_iters: int = 100
    deadline: float | None = None  # time.perf_counter() value
    progress: Progress | None = None
    cancelled: Any = None  # optional zero-argument callable; True stops the solve


@dataclass
class IpmOutcome:
    t: Array  # per-neuron multipliers of the best iterate
    rho: float  # lambda_max(Q(t)) of that iterate (float estimate, not a certificate)
    status: str  # optimal | timeout | cancelled | inaccurate
    iterations: int
    rel_gap: float
    lower_bound: float | None  # dual objective of a dual-feasible Z, if one was found
    history: list[dict[str, float]] = field(default_factory=list)


class Grouping:
    """t = P x: identity (per neuron) or constant per layer."""

    def __init__(self, lmi: StructuredLmi, per_layer: bool) -> None:
        self.per_layer = per_layer
        self.starts = np.array([lmi.layer(j).start for j in range(lmi.depth)], dtype=np.intp)
        self.counts = np.array(
            [lmi.layer(j).stop - lmi.layer(j).start for j in range(lmi.depth)], dtype=np.intp
        )

    def sign_needed(self, lmi: StructuredLmi) -> Array:
        """1.0 where x_k >= 0 must be imposed, 0.0 where S > 0 already implies it.

        The diagonal of S at neuron i of layer j is 2 t_i + 2 sum_k (a b t)_{j+1,k} W_{j+1,ki}^2
        (or 2 t_i - ||W_L e_i||^2 for the last layer), so t_i > 0 follows from S > 0 whenever
        layer j+1 has a_k b_k <= 0 everywhere (ReLU, tanh, sigmoid, GELU, ...), by induction
        from the last layer. Redundant barriers slow interior-point methods down.
        """
        need = np.zeros(lmi.depth)
        a, b = lmi.a_host, lmi.b_host
        for j in range(lmi.depth - 1):
            nxt = lmi.layer(j + 1)
            need[j] = float(np.any(a[nxt] * b[nxt] > 0))
        return need if self.per_layer else np.repeat(need, self.counts)

    def expand(self, x: Array) -> Array:
        return np.repeat(x, self.counts) if self.per_layer else x

    def vec(self, v: Array) -> Array:
        return np.add.reduceat(v, self.starts) if self.per_layer else v

    def mat(self, h: Array) -> Array:
        if not self.per_layer:
            return h
        return np.add.reduceat(np.add.reduceat(h, self.starts, axis=0), self.starts, axis=1)


@dataclass
class _Iterate:
    """Primal (rho, x, S = S(rho, x) + pi I) and dual (Z, z) iterates, X = S^{-1}.

    Host vectors x, z; backend matrices S, X, Z and their factors."""

    rho: float
    x: Array
    s_mat: Mat
    rs: Any  # upper Cholesky factor of S (primal_ops: block or dense)
    xinv: Mat
    zmat: Mat
    rz: Mat  # upper Cholesky factor of Z
    z: Array
    pi: float  # primal residual S(rho, x) - S = -pi I
    dual: Any = None  # dual_ops(): Z dense, or on the pattern with its completion ``zhat``
    zhat: Mat | None = None  # the max-det completion of zmat (chordal dual), else None
    xb: Rank2Blocks | None = None  # rank2_blocks(X) if already known (the Newton start's)

    @property
    def zfull(self) -> Mat:
        """The dense dual matrix the products use: Z, or the completion of P(Z)."""
        return self.zmat if self.zhat is None else self.zhat


@dataclass
class _Direction:
    dy: Array
    ds: Mat
    dzm: Mat
    dz: Array
    k_mat: Mat  # dS X
    dzm_full: Mat | None = None  # a chordal dual's dense dZ (the predictor's, for the corrector)


def _direction(
    lmi: StructuredLmi,
    grp: Grouping,
    sgn: Mask,
    cur: _Iterate,
    xw: Mat,
    h: SchurSystem,
    rhs: Array,
    sig_mu: float,
    corr: tuple[Array, Array] | None,
    low_precision: bool = False,
    low_x: tuple[Mat, Mat] | None = None,
) -> _Direction:
    """HKM step for the Schur system h dy = rhs (``xw`` = W~^T X from :func:`rank2_blocks`):

    dS = F(dy) - pi I,  dZ = sig_mu X - Z - sym(Z dS X) - C,  dz = sig_mu/x - z - (z dx + c)/x,
    with Mehrotra's corrector (C, c) = (sym(dZ_a dS_a X), dx_a dz_a) when given. The
    predictor's product Z dS X may run in float32 (``low_precision``): it only steers sigma and
    the corrector term, which may be any symmetric matrix (the corrected equations stay exact).
    With ``low_precision``, ``low_x`` (float32 X and W~^T X, :func:`_low_x`) makes dS X a
    float32 product too: it only enters the float32 product and the corrector's.
    """
    ops = lmi.ops
    dy = h.solve(rhs)
    dt = grp.expand(dy[1:])
    x_k, xw_k = low_x if low_precision and low_x is not None else (cur.xinv, xw)
    k_mat = linear_part_times(lmi, x_k, xw_k, dy[0], dt)  # F(dy) X
    if cur.pi > 0:
        k_mat -= cur.pi * cur.xinv
    dzm_full = None
    if cur.dual.chordal and corr is None and not sig_mu:  # the predictor's dense dZ_a, for C
        dzm_full = cur.dual.full_sym_product(cur.rz, k_mat, -0.5, low_precision)
        dzm_full -= cur.zfull
        dzm = cur.dual.project(dzm_full.copy())
    else:
        dzm = cur.dual.sym_product(cur.zfull, k_mat, -0.5, low_precision)  # -sym(Z dS X)
        dzm -= cur.zmat
        if sig_mu:
            cur.dual.add_scaled(dzm, cur.xinv, sig_mu)
    ds = lmi.assemble(dy[0], dt, constant=False)
    if cur.pi > 0:
        ops.add_diag(ds, -cur.pi)
    xs = np.where(sgn, cur.x, 1.0)
    dz = np.where(sgn, sig_mu / xs - cur.z - (cur.z / xs) * dy[1:], 0.0)
    if corr is not None:
        dzm -= corr[0]
        dz -= corr[1] / xs
    return _Direction(dy, ds, dzm, dz, k_mat, dzm_full)


def primal_ops(lmi: StructuredLmi) -> PrimalOps:
    """The algebra of S = S(y) + pi I: its factor, inverse and step lengths, as the backend
    provides it (:meth:`DenseOps.primal_ops`): by its block-tridiagonal structure on numpy
    (:class:`~sdp.solvers._block_tridiag.BlockTridiagOps`: block Cholesky, block inverse,
    Lanczos on block solves) and on torch (``models.lipsdp_blocks``)."""
    return lmi.ops.primal_ops(lmi.offsets)


def _step_lengths(
    ops: DenseOps,
    sops: Any,
    sgn: Mask,
    cur: _Iterate,
    d: _Direction,
    frac: float,
    warm: list[Any],
) -> tuple[float, float]:
    """frac times the largest primal and dual steps that keep S, x_w, Z, z_w positive.

    ``warm`` holds the backend's start vectors (Lanczos) for S and Z, updated in place;
    ``sops`` is :func:`primal_ops`.
    """
    s_max, warm[0] = sops.max_step(cur.rs, d.ds, warm[0])
    z_max, warm[1] = cur.dual.max_step(cur.rz, d.dzm, warm[1])
    a_p = min(1.0, frac * s_max, frac * step_ratio(cur.x[sgn], d.dy[1:][sgn]))
    a_d = min(1.0, frac * z_max, frac * step_ratio(cur.z[sgn], d.dz[sgn]))
    return a_p, a_d


def _start(
    lmi: StructuredLmi, grp: Grouping, sgn: Mask, t0: Array, rho: float, settings: IpmSettings
) -> _Iterate:
    """S0 = S(rho, t0) (+ pi I if that is not PD, or if settings.shift0 asks for it) and the
    dual start: :func:`newton_dual_start` on nets of depth <= ``newton_start_depth`` (at any
    depth with the chordal dual and ``chordal_newton_start``: there the deep nets do not
    stall, docs/benchmarks.md), else (or if that fails) Z0 = z0_scale I / r (or z0_scale X0 /
    tr X0_00), z0 = mu0 / x0 where x >= 0 is imposed.

    Per layer, x0 is the layer's largest t0. Sign-constrained entries are floored at 1e-8
    times the largest |x0| (a zero would make z0 and the barrier terms infinite).
    """
    ops, sops = lmi.ops, primal_ops(lmi)
    x = np.maximum.reduceat(t0, grp.starts) if grp.per_layer else t0.copy()
    floor = 1e-8 * max(float(np.max(np.abs(x))) if x.size else 0.0, 1e-300)
    x[sgn] = np.maximum(x[sgn], floor)
    s_mat = lmi.assemble(rho, grp.expand(x))
    rs = sops.cholesky_upper(s_mat)
    diag_max = float(abs(s_mat.diagonal()).max())
    pi = settings.shift0 * diag_max
    if rs is None:
        pi = max(pi, -2.0 * ops.eigvalsh_min(s_mat), 1e-8 * diag_max)
    if pi > 0:
        ops.add_diag(s_mat, pi)
        rs = sops.cholesky_upper(s_mat)
    if rs is None:
        raise ValueError("could not build a positive definite starting S")
    xinv = sops.inverse_from_cholesky(rs)
    dops = dual_ops(lmi, settings)
    if lmi.depth <= settings.newton_start_depth or (dops.chordal and settings.chordal_newton_start):
        dual = newton_dual_start(
            lmi, grp, sgn, x, xinv, dual=dops, low_precision=settings.float32_start
        )
        if dual is not None:
            it = _Iterate(rho, x, s_mat, rs, xinv, dual.zmat, dual.rz, dual.z, pi, xb=dual.xb)
            return _with_dual(dops, it)
    if settings.z0_identity:
        mu0 = settings.z0_scale / lmi.r
        zmat = mu0 * ops.eye(lmi.n)
    else:
        mu0 = settings.z0_scale / float(xinv[: lmi.r, : lmi.r].diagonal().sum())
        zmat = mu0 * xinv
    rz = ops.cholesky_upper(zmat)
    if rz is None:
        raise ValueError("could not build a positive definite starting Z")
    z = np.where(sgn, mu0 / np.where(sgn, x, 1.0), 0.0)
    return _with_dual(dops, _Iterate(rho, x, s_mat, rs, xinv, zmat, rz, z, pi))


def dual_ops(lmi: StructuredLmi, settings: IpmTuning) -> ChordalDualOps | DenseDualOps:
    """The dual matrix's algebra: on the block-tridiagonal pattern (:mod:`sdp.solvers._chordal`)
    on the numpy backend for nets of depth >= ``chordal_min_depth``, else the backend's dense Z."""
    depth = settings.chordal_min_depth
    if depth is not None and lmi.depth >= depth and isinstance(lmi.ops, NumpyOps):
        return ChordalDualOps(lmi.ops, lmi.offsets)
    return DenseDualOps(lmi.ops)


def _with_dual(dops: ChordalDualOps | DenseDualOps, it: _Iterate) -> _Iterate:
    """``it`` with its dual algebra; a chordal dual keeps P(Z) and its completion (P(Z) of a PD
    Z always has a PD completion: Z itself)."""
    it.dual = dops
    if dops.chordal:
        it.zmat = dops.project(it.zmat)
        it.rz = dops.cholesky_upper(it.zmat)
        if it.rz is None:
            raise ValueError("could not complete the starting Z")
        it.zhat = dops.completed(it.rz)
    return it


def _schur_matrix(
    lmi: StructuredLmi, grp: Grouping, zb: Rank2Blocks, xb: Rank2Blocks, diag: Array
) -> Array:
    """The (m+1) x (m+1) matrix [tr(F_k Z F_l X)] in the unknowns (rho, x), plus ``diag`` on
    the multipliers' diagonal."""
    m_rr, m_rt, m_tt = schur_matrix(lmi.ops, zb, xb)
    m = len(diag)
    h = np.empty((m + 1, m + 1))
    h[0, 0] = m_rr
    h[0, 1:] = h[1:, 0] = grp.vec(m_rt)
    h[1:, 1:] = grp.mat(m_tt)
    h[1:, 1:][np.diag_indices(m)] += diag
    return h


@dataclass
class DualStart:
    """A dual starting point: Z (backend), its upper Cholesky factor, z (host), mu, and the
    fraction theta of the Newton correction taken (1: dual feasible)."""

    zmat: Mat
    rz: Mat
    z: Array
    mu: float
    theta: float
    xb: Rank2Blocks  # rank2_blocks(X) at the start, which the first iteration reuses


def newton_dual_start(
    lmi: StructuredLmi,
    grp: Grouping,
    sgn: Mask,
    x: Array,
    xinv: Mat,
    frac: float = 0.9,
    dual: ChordalDualOps | DenseDualOps | None = None,
    low_precision: bool = False,
) -> DualStart | None:
    """The dual estimate of the barrier's Newton step at S = S(y) (X = S^{-1}) as a start.

    With the barrier phi(y) = -log det S(y) - sum_w log x_k, its gradient -g
    (g_k = <X, F_k> + w_k / x_k) and Hessian H (H_kl = tr(F_k X F_l X) + w_k delta_kl / x_k^2,
    the Schur matrix with Z = X), the Newton step of rho / mu + phi is H dy = g - c / mu
    (c = e_rho), and with dS = F(dy)

        Z = mu (X - X dS X) = mu X (S - dS) X,   z = mu (1 / x - dx / x^2)

    satisfies <Z, F_k> + w_k z_k = mu (g - H dy)_k = c_k: tr Z_00 = 1 and every other dual
    equation hold exactly, and Z > 0 iff S - dS > 0 (the dual matrix of DSDP: Benson, Ye &
    Zhang, "Solving large-scale sparse semidefinite programs for combinatorial
    optimization", SIAM J. Optim. 10, 2000). mu minimises the Newton decrement
    (g - c / mu)^T H^{-1} (g - c / mu): 1 / mu = (H^{-1} g)_rho / (H^{-1})_rho,rho, the
    central-path point nearest S in the barrier's metric, so Z is as centred as the step
    allows. Where S - dS is not PD, only the fraction theta = frac * (largest step keeping Z
    and z positive) of the correction is taken (dual residual (1 - theta) (mu g - c)).
    Measured (docs/benchmarks.md): mnistfc-256x2 14 iterations instead of 19, 256x4 17
    instead of 20; on deeper nets (256x6, ERAN 9x200) the dual steps stall, so the solver
    uses it up to a depth (:class:`IpmTuning` ``newton_start_depth``). None if mu <= 0 or no
    PD Z is found. With a chordal ``dual`` (:mod:`sdp.solvers._chordal`) only P(Z) is formed
    (P(X dS X) by block rows, 3 n_k / n of the dense product) and theta keeps P(Z) completable
    (clique step lengths), which a PD Z implies: theta is at least the dense one.
    ``low_precision`` (numpy backend, dense dual; not measured with the chordal one) computes
    X dS X in float32: Z then solves the dual equations only to ~1e-7 relative, which the
    first Newton step removes like any dual residual (its right-hand side does not involve
    A(Z)); Z > 0 is checked in float64 as always. The solver's start uses it (one float64 n^3
    product less).
    """
    ops = lmi.ops
    w = sgn.astype(np.float64)
    xs = np.where(sgn, x, 1.0)
    xb = rank2_blocks(lmi, xinv)
    tr_x00, cx = constraint_values(ops, xb)
    h = _schur_matrix(lmi, grp, xb, xb, w / xs**2)
    g = np.concatenate([[tr_x00], grp.vec(cx) + w / xs])
    schur = SchurSystem(h)
    e_rho = np.zeros(len(g))
    e_rho[0] = 1.0
    hg, hc = schur.solve(g), schur.solve(e_rho)
    if not (hg[0] > 0 and hc[0] > 0 and math.isfinite(hg[0] / hc[0])):
        return None
    mu = hc[0] / hg[0]
    dy = hg - hc / mu
    k_mat = linear_part_times(lmi, xinv, xb.wy, dy[0], grp.expand(dy[1:]))  # dS X
    dops = DenseDualOps(ops) if dual is None else dual
    corr = dops.sym_product(
        xinv, k_mat, -0.5 * mu, low_precision and not dops.chordal
    )  # -mu X dS X (on the pattern)
    base = dops.project(mu * xinv)
    r_base = dops.cholesky_upper(base)
    if r_base is None:
        return None
    z_max, _ = dops.max_step(r_base, corr)
    theta = min(1.0, frac * z_max, frac * step_ratio(x[sgn], -dy[1:][sgn]))
    theta, rz = cholesky_step(dops, base, corr, theta)
    if rz is None:
        return None
    base += theta * corr
    z = np.where(sgn, mu * (1.0 / xs - theta * dy[1:] / xs**2), 0.0)
    return DualStart(base, rz, z, mu, theta, xb)


@dataclass
class _Score:
    """What one look at the iterate tells: the blocks of X and Z the Schur system needs, the
    complementarity gap and mu, the relative gap to the dual estimate, that estimate, and
    whether this iteration's products may run in float32 (``low``)."""

    tr_x00: float
    cx: Array
    gap: float
    mu: float
    rel_gap: float
    lower: float | None
    low: bool
    size: float  # |S| |Z| (Frobenius), the scale of the float32 tests
    low_proj: bool  # the projections' products in float32 (see _score)
    xb: Any = None  # rank2_blocks of X and Z: by _project, once the solve goes on
    zb: Any = None


@dataclass
class _Best:
    """The best scored multipliers so far (every iterate's t is scored by its exact rho)."""

    t: Array
    rho: float


def _score(
    lmi: StructuredLmi,
    grp: Grouping,
    sgn: Mask,
    cur: _Iterate,
    best: _Best,
    nu: float,
    pi_tol: float,
    lower: float | None,
    settings: IpmTuning,
) -> _Score:
    """Score ``cur`` (updating ``best``) and measure its gaps.

    rho(t) is exact for a feasible S (rho - 1 / lambda_max(X_00)), recomputed otherwise. The
    relative gap compares the best rho with the weak-duality estimate of Z / tr Z_00 (positive
    <Z, F_k>, a dual residual, charged at x_k: an estimate, not a bound) and the
    complementarity gap <S, Z> / tr Z_00; it is infinite until Z gives an estimate.

    While <S, Z> > ``float32_above`` |S| |Z| (``low``) the predictor's products run in float32
    and, with ``float32_projections``, so do the products behind the rank-2 projections of X
    and Z (numpy backend): they only feed the Schur matrix, whose ~1e-7 relative error only
    perturbs the direction (the primal step stays exact and any dual residual it leaves is
    aimed at by the next Newton step, whose right-hand side does not involve A(Z)). The
    constraint values <X, F_k>, <Z, F_k> come from the float64 bands (O(sum_j n_j n_{j+1})
    on ReLU-like layers); the projections themselves are left to :func:`_project`, which
    only runs when the solve goes on (the last score of a solve needs none: two float64
    projections, about 1 % of mnistfc-256x2's solve, saved).
    """
    ops = lmi.ops
    gap = ops.vdot(cur.s_mat, cur.zmat) + float(cur.x[sgn] @ cur.z[sgn])
    size = ops.norm(cur.s_mat) * ops.norm(cur.zfull)
    low = gap > settings.float32_above * size
    low_proj = low and settings.float32_projections and isinstance(ops, NumpyOps)
    tr_x00, cx = constraint_values_banded(lmi, cur.xinv)
    tr_z00, cz = constraint_values_banded(lmi, cur.zmat)
    az = grp.vec(cz)
    if cur.pi > 0:
        rho_t = rho_for_multipliers(lmi, grp.expand(cur.x))
    else:  # S = S(rho, t) > 0: rho(t) = rho - 1 / lambda_max(X_00)
        rho_t = cur.rho - 1.0 / ops.eigvalsh_max(cur.xinv[: lmi.r, : lmi.r])
    if rho_t < best.rho:
        best.t, best.rho = grp.expand(cur.x).copy(), rho_t
    mu = gap / nu
    rel_gap = math.inf
    if tr_z00 > 0 and cur.pi <= pi_tol and math.isfinite(best.rho):
        bl = lmi.block(lmi.depth)
        lower = ops.vdot(cur.zmat[bl, bl], lmi.wl_gram) - float(cur.x @ np.maximum(az, 0.0))
        lower /= tr_z00
        scale = abs(best.rho) or 1.0  # rho = 0 (e.g. a zero layer): absolute gap
        rel_gap = max((best.rho - lower) / scale, gap / (tr_z00 * scale))
    return _Score(tr_x00, cx, gap, mu, rel_gap, lower, low, size, low_proj)


def _project(lmi: StructuredLmi, cur: _Iterate, sc: _Score) -> None:
    """The rank-2 projections of X (the Newton start's if kept) and Z that the Schur system
    needs, in float32 where ``sc.low_proj`` (:func:`_score`)."""
    sc.xb = cur.xb if cur.xb is not None else rank2_blocks(lmi, cur.xinv, low_precision=sc.low_proj)
    sc.zb = rank2_blocks(lmi, cur.zfull, low_precision=sc.low_proj)


def _stop_status(
    sc: _Score, it: int, now: float, t_iter: float, settings: IpmSettings, gaps: list[float]
) -> str | None:
    """optimal | None (iteration limit or stall at the float floor: inaccurate) | timeout |
    cancelled, or "" to go on. ``gaps``: the relative gap of every iteration so far."""
    if sc.rel_gap <= settings.eps:
        return "optimal"
    if it >= settings.max_iters or _stalled_at_floor(gaps, settings):
        return None
    if settings.deadline is not None and now + t_iter > settings.deadline:
        return "timeout"
    if settings.cancelled is not None and settings.cancelled():
        return "cancelled"
    return ""


def _stalled_at_floor(gaps: list[float], settings: IpmTuning) -> bool:
    """True when the gap is below ``floor_gap`` and has not halved over the last
    ``floor_window`` iterations. Measured on the tests' random nets (numpy backend): from a
    relative gap near 1e-9 (mu ~ 1e-13 rho) the dual steps collapse (a_d 0.001-0.1 for tens
    of iterations) while rho(t) no longer changes in its 12th digit, so further iterations
    only creep the lower bound up (a 6-layer leaky net at a target of 1e-11: optimal after 134
    iterations, rho fixed from the 22nd; at 1e-12 the limit of 200). It is the numpy
    backend's cheaper arithmetic at that depth (the chordal dual and the float32 products:
    with both off, or on torch, 1e-12 takes 27-39 iterations), which the default gap target
    (1e-5) never reaches. The best iterate stands either way (its multipliers are certified
    in float64 by the caller); the status says the target was missed, as at the limit.
    """
    window = settings.floor_window
    if settings.floor_gap is None or len(gaps) <= window:
        return False
    return gaps[-1] < settings.floor_gap and gaps[-1] > 0.5 * gaps[-1 - window]


def _schur_system(
    lmi: StructuredLmi, grp: Grouping, sgn: Mask, w: Array, cur: _Iterate, sc: _Score
) -> tuple[SchurSystem, Array, Array, Array]:
    """(Schur system, g = <X, F_k> + w_k/x_k, xs, base rhs) of the HKM direction at ``cur``.

    ``xs`` is x where x >= 0 is imposed, else 1 (x only divides there); ``base`` is -c plus
    the residual term -A(sym(Z (-pi I) X)) of an infeasible iterate.
    """
    xs = np.where(sgn, cur.x, 1.0)  # x only divides where x >= 0 is imposed (w = 1)
    h = _schur_matrix(lmi, grp, sc.zb, sc.xb, w * cur.z / xs)
    g = np.concatenate([[sc.tr_x00], grp.vec(sc.cx) + w / xs])
    c = np.zeros(len(cur.x) + 1)
    c[0] = 1.0
    base = -c
    if cur.pi > 0:  # the residual -pi I enters as -A(sym(Z (-pi I) X))
        tr_zx, v_zx = sym_product_values(lmi, sc.zb, cur.zfull, sc.xb, cur.xinv)
        base = base + cur.pi * np.concatenate([[tr_zx], grp.vec(v_zx)])
    return SchurSystem(h), g, xs, base


def _low_x(lmi: StructuredLmi, xinv: Mat, xw: Mat) -> tuple[Mat, Mat] | None:
    """float32 copies of X and W~^T X for the low-precision products dS X (numpy backend,
    finite copies only; else None and dS X stays float64)."""
    if not isinstance(lmi.ops, NumpyOps):
        return None
    with np.errstate(over="ignore"):
        x32, xw32 = xinv.astype(np.float32), xw.astype(np.float32)
    return (x32, xw32) if np.isfinite(x32).all() and np.isfinite(xw32).all() else None


def _gap_along(
    ops: DenseOps, sgn: Mask, cur: _Iterate, d: _Direction, gap: float
) -> Callable[[float, float], float]:
    """<S + a_p dS, Z + a_d dZ> + (x + a_p dx)^T (z + a_d dz) as a function of (a_p, a_d),
    from three inner products (no n x n temporaries)."""
    s_dz, ds_z, ds_dz = (
        ops.vdot(cur.s_mat, d.dzm),
        ops.vdot(d.ds, cur.zmat),
        ops.vdot(d.ds, d.dzm),
    )
    xz = float(cur.x[sgn] @ cur.z[sgn])

    def at(a_p: float, a_d: float) -> float:
        lin = float((cur.x + a_p * d.dy[1:])[sgn] @ (cur.z + a_d * d.dz)[sgn])
        return gap - xz + a_d * s_dz + a_p * ds_z + a_p * a_d * ds_dz + lin

    return at


def _predictor_finishes(
    settings: IpmSettings, sc: _Score, low: bool, gap: float, gap_next: float
) -> bool:
    """True when the predictor's own step (sigma = 0), at the fraction of the boundary the
    iteration takes, is predicted to end the solve: its relative gap, scaled by the
    complementarity it leaves, is at most ``predictor_finish`` times the target. Only for a
    predictor computed in float64 (``low`` False): then the corrector's two products and
    step lengths are saved in the last iteration, which has no later iterate to keep centred
    (Mehrotra's corrector only serves the centring of the iterates that follow). The next
    score measures the gap as always; a short prediction only costs one more iteration.
    """
    if settings.predictor_finish is None or low or not gap > 0:
        return False
    predicted = sc.rel_gap * max(gap_next, 0.0) / gap
    return predicted <= settings.predictor_finish * settings.eps


def _predictor_corrector(
    lmi: StructuredLmi,
    grp: Grouping,
    sgn: Mask,
    w: Array,
    cur: _Iterate,
    sc: _Score,
    settings: IpmSettings,
    warm: list[Any],
    frac: float,
) -> tuple[_Direction, float, bool]:
    """(direction, sigma, float32 used): Mehrotra's predictor sets sigma, the corrector adds
    the second-order terms sym(dZ_a dS_a X) and dx_a dz_a. ``warm`` holds the Lanczos start
    vectors of the step-length searches for this iteration; ``frac`` the fraction of the step
    to the boundary that the iteration takes."""
    ops = lmi.ops
    schur, g, xs, base = _schur_system(lmi, grp, sgn, w, cur, sc)
    gap, mu = sc.gap, sc.mu
    # predictor (sigma = 0); its step lengths set sigma = (gap_aff / gap)^3 (Mehrotra)
    # float32 products are 2.7x faster; their error (~1e-7 ||Z|| ||dS X||, and dS ~ S in the
    # predictor) must stay far below the complementarity they steer: only while <S, Z> is
    # large relative to ||S|| ||Z||; on the dense dual the predictor's own products stay
    # float32 further down (float32_predictor), the corrected direction's do not
    low = sc.low or (
        settings.float32_predictor is not None
        and sc.gap > settings.float32_predictor * sc.size
        and isinstance(ops, NumpyOps)
        and not cur.dual.chordal
    )
    low_step = sc.low and settings.float32_step
    low_x = _low_x(lmi, cur.xinv, sc.xb.wy) if low else None
    pred = _direction(lmi, grp, sgn, cur, sc.xb.wy, schur, base, 0.0, None, low, low_x)
    a_p, a_d = _step_lengths(ops, primal_ops(lmi), sgn, cur, pred, 1.0, warm)
    gap_along = _gap_along(ops, sgn, cur, pred, gap)
    gap_aff = gap_along(a_p, a_d)
    sigma = min(1.0, max(gap_aff / gap, 0.0) ** 3) if gap > 0 else 0.1
    sigma = max(sigma, settings.sigma_min)
    if settings.sigma_fixed is not None:
        sigma = settings.sigma_fixed
    if _predictor_finishes(settings, sc, low, gap, gap_along(frac * a_p, frac * a_d)):
        return pred, 0.0, low
    if settings.corrector:  # the second-order terms sym(dZ_a dS_a X) and dx_a dz_a
        # float32 with float32_corrector down to a gap of that times |S| |Z|: any
        # symmetric C keeps the corrected equations exact (its bands enter the right-hand side
        # as computed), so this second-order term's rounding (~1e-7 of |dZ_a| |dS_a X|) only
        # moves the target; below that it would swamp the centring (eps 1e-9: 44 iterations
        # instead of 14 on a 320-row net with float32 throughout)
        dense32 = (
            settings.float32_corrector is not None
            and gap > settings.float32_corrector * sc.size
            and isinstance(ops, NumpyOps)
        )
        dz_a = pred.dzm if pred.dzm_full is None else pred.dzm_full
        corr = cur.dual.corrector(dz_a, pred.k_mat, 0.5, low or dense32)
        corr_lin = np.where(sgn, pred.dy[1:] * pred.dz, 0.0)
        tr_c, v_c = constraint_values_banded(lmi, corr)
        rhs = base + sigma * mu * g - np.concatenate([[tr_c], grp.vec(v_c) + corr_lin / xs])
        d = _direction(
            lmi, grp, sgn, cur, sc.xb.wy, schur, rhs, sigma * mu, (corr, corr_lin), low_step, low_x
        )
    else:
        rhs = base + sigma * mu * g
        d = _direction(lmi, grp, sgn, cur, sc.xb.wy, schur, rhs, sigma * mu, None, low_step, low_x)
    return d, sigma, low


def _step_fraction(settings: IpmTuning, last: dict[str, float], it: int) -> float:
    """Fraction of the step to the boundary: with ``step_frac_adaptive`` (the default)
    gamma = 0.9 + 0.09 min(a_p, a_d) of the last iteration (0.9 at the first; Toh, Todd &
    Tutuncu 1999, SDPT3): after short steps the iterate stays further from the boundary, closer
    to the central path; else the fixed ``step_frac``.
    """
    if not settings.step_frac_adaptive:
        return settings.step_frac
    return 0.9 + 0.09 * (min(last["a_p"], last["a_d"]) if it > 0 else 0.0)


def solve_ipm(
    lmi: StructuredLmi, t0: Array, rho0: float, settings: IpmSettings, *, per_layer: bool
) -> IpmOutcome:
    """Primal-dual path following with Mehrotra's predictor-corrector (HKM direction).

    Starts at y = (rho_factor rho0, t0), S = S(y) (+ pi I if needed: an infeasible start whose
    residual shrinks by (1 - a_p) per step). The dual start on nets of depth at most
    ``newton_start_depth`` (default 4) is the barrier Newton step's dual estimate
    (:func:`newton_dual_start`: centred and dual feasible up to a fraction); on deeper nets
    Z = z0_scale I / r, infeasible but large: tr Z_00 = z0_scale (default 100) instead of 1.
    Measured (docs/benchmarks.md): the Newton start saves 3-6 iterations up to depth 4
    (mnistfc-256x2: 14 instead of 19) but stalls on 256x6 and ERAN 9x200; there, as with
    tr Z_00 = 1 or the centred Z = c S^{-1}, the dual steps stay short for 20-50 iterations.
    Every iterate's t is scored by its exact smallest rho; the best is returned.
    """
    grp = Grouping(lmi, per_layer)
    w = grp.sign_needed(lmi)
    sgn = w > 0
    sops = primal_ops(lmi)
    cur = _start(lmi, grp, sgn, t0, settings.rho_factor * rho0, settings)
    nu = float(lmi.n + w.sum())
    best = _Best(grp.expand(cur.x).copy(), math.inf)  # iteration 0 scores t0
    pi_tol = 1e-12 * float(abs(cur.s_mat.diagonal()).max())
    lower: float | None = None
    status, it, rel_gap = "inaccurate", 0, math.inf
    history: list[dict[str, float]] = []
    t_iter = 0.0
    diag: dict[str, float] = {"a_p": 0.0, "a_d": 0.0, "sigma": 0.0}
    try:
        while True:
            now = time.perf_counter()
            sc = _score(lmi, grp, sgn, cur, best, nu, pi_tol, lower, settings)
            lower, rel_gap = sc.lower, sc.rel_gap
            entry = {
                "iteration": it,
                "rho": best.rho,
                "gap": rel_gap,
                "mu": sc.mu,
                "pi": cur.pi,
                **diag,
            }
            history.append(entry)
            if settings.progress is not None:
                settings.progress({"phase": "solve", **entry})
            stop = _stop_status(sc, it, now, t_iter, settings, [e["gap"] for e in history])
            if stop is None:
                break
            if stop:
                status = stop
                break
            _project(lmi, cur, sc)
            warm: list[Any] = [None, None]  # per iteration (kept across: 39 instead of 20
            # iterations on 256x6 with the chordal dual's ARPACK search, measured)
            frac = _step_fraction(settings, diag, it)
            d, sigma, low = _predictor_corrector(lmi, grp, sgn, w, cur, sc, settings, warm, frac)
            a_p, a_d = _step_lengths(lmi.ops, sops, sgn, cur, d, frac, warm)
            a_p, rs_new = cholesky_step(sops, cur.s_mat, d.ds, a_p)
            a_d, rz_new = cholesky_step(cur.dual, cur.zmat, d.dzm, a_d)
            it += 1
            diag = {"a_p": a_p, "a_d": a_d, "sigma": sigma, "float32": float(low)}
            if lower is not None:
                diag["lower"] = lower
            if rs_new is None or a_p == 0.0:
                break  # no feasible progress in float64: keep the best iterate
            _advance(lmi.ops, sops, cur, d, a_p, a_d, rs_new, rz_new, pi_tol)
            t_iter = time.perf_counter() - now
    except (np.linalg.LinAlgError, ValueError, FloatingPointError):
        status = "inaccurate"  # numerical failure mid-solve: the best scored iterate stands
    return IpmOutcome(best.t, best.rho, status, it, rel_gap, lower, history)


def _advance(
    ops: DenseOps,
    sops: Any,
    cur: _Iterate,
    d: _Direction,
    a_p: float,
    a_d: float,
    rs_new: Mat,
    rz_new: Mat | None,
    pi_tol: float,
) -> None:
    """Take the step (a_p primal, a_d dual when Z stays PD) in place; the residual pi I
    shrinks by (1 - a_p) and is dropped once it is below ``pi_tol`` (S = S(y) exactly)."""
    cur.rho += a_p * d.dy[0]
    cur.x = cur.x + a_p * d.dy[1:]
    cur.s_mat += a_p * d.ds
    cur.pi *= 1.0 - a_p
    if 0.0 < cur.pi <= pi_tol:  # drop the vanishing residual: S = S(y) exactly from now on
        snapped = ops.copy(cur.s_mat)
        ops.add_diag(snapped, -cur.pi)
        r_snap = sops.cholesky_upper(snapped)
        if r_snap is not None:
            cur.s_mat, rs_new, cur.pi = snapped, r_snap, 0.0
    cur.rs = rs_new
    cur.xinv = sops.inverse_from_cholesky(rs_new)
    cur.xb = None
    if rz_new is not None:
        cur.zmat += a_d * d.dzm
        cur.z = cur.z + a_d * d.dz
        cur.rz = rz_new
        cur.zhat = cur.dual.completed(rz_new)
