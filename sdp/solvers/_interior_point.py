"""Primal-dual interior-point method (HKM direction) for LipSDP on the rank-2 structure.

The structured solver's problem (S = -M, :mod:`sdp.solvers._lmi_structure`):

    minimise rho  s.t.  S(y) = S_c + rho E_0 + sum_k x_k F_k >= 0,  x >= 0,

with y = (rho, x) and F_k = A_i (LipSDP-Neuron) or sum_{i in layer k} A_i (LipSDP-Layer).
Its dual: maximise <Z_LL, W_L^T W_L> s.t. tr Z_00 = 1, <Z, F_k> + z_k = 0, Z >= 0, z >= 0;
any such Z proves rho* >= <Z_LL, W_L^T W_L> (weak duality).

Each iteration solves the (m+1) x (m+1) Schur system of the HKM direction
(Helmberg, Rendl, Vanderbei & Wolkowicz 1996; Kojima, Shindoh & Hara 1997; Monteiro 1997):

    (M + diag(0, z/x)) dy = sigma mu (<X, F_k> + [k>0]/x_k) - c,   M_kl = tr(F_k Z F_l X),
    dS = sum_k dy_k F_k,   dZ = sigma mu X - Z - sym(Z dS X),   dz = sigma mu/x - z - (z/x) dx,

with X = S^{-1}; M is built in O(N^2) from rank-2 projections of Z and X. y stays strictly
feasible (S > 0 by Cholesky), so every iterate is a valid certificate candidate; Z may start
infeasible. sigma follows Mehrotra's heuristic with the affine step length of y, computed
exactly from inner products (no extra matrix products). Step lengths use the smallest
eigenvalue of R^{-T} dS R^{-1} (Lanczos), then a Cholesky check.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import linalg
from scipy.sparse.linalg import ArpackError, ArpackNoConvergence, LinearOperator, eigsh

from sdp.ir import Array
from sdp.solvers._lmi_structure import (
    StructuredLmi,
    cholesky_upper,
    constraint_values,
    inverse_from_cholesky,
    rank2_blocks,
    schur_matrix,
    times_linear_part,
)
from sdp.solvers.base import Progress

_DENSE_MAX = 300  # max_step: dense eigenvalue below this size, Lanczos above


@dataclass
class IpmSettings:
    eps: float = 1e-7  # relative gap target (rho(t) - lower) / rho(t)
    max_iters: int = 100
    sigma_min: float = 0.1
    sigma_fixed: float | None = None
    step_frac: float = 0.95  # fraction of the step to the boundary
    z0_scale: float = 1.0  # Z_0 = z0_scale X_0 / tr(X_0,00)
    rho_factor: float = 1.1  # start at rho = rho_factor * rho(t0)
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
        for j in range(lmi.depth - 1):
            nxt = lmi.layer(j + 1)
            need[j] = float(np.any(lmi.a[nxt] * lmi.b[nxt] > 0))
        return need if self.per_layer else np.repeat(need, self.counts)

    def expand(self, x: Array) -> Array:
        return np.repeat(x, self.counts) if self.per_layer else x

    def vec(self, v: Array) -> Array:
        return np.add.reduceat(v, self.starts) if self.per_layer else v

    def mat(self, h: Array) -> Array:
        if not self.per_layer:
            return h
        return np.add.reduceat(np.add.reduceat(h, self.starts, axis=0), self.starts, axis=1)


def max_step(r: Array, d: Array) -> float:
    """Largest alpha with R^T R + alpha D >= 0: 1 / max(0, -lambda_min(R^{-T} D R^{-1}))."""
    n = d.shape[0]
    if n <= _DENSE_MAX:
        b = linalg.solve_triangular(r, d, trans="T", check_finite=False)
        c = linalg.solve_triangular(r, b.T, trans="T", check_finite=False)
        lam = float(linalg.eigvalsh((c + c.T) / 2, subset_by_index=[0, 0])[0])
    else:

        def mv(v: Array) -> Array:
            w = linalg.solve_triangular(r, v, check_finite=False)
            return linalg.solve_triangular(r, d @ w, trans="T", check_finite=False)

        op = LinearOperator((n, n), matvec=mv, dtype=np.float64)
        try:
            lam = float(eigsh(op, k=1, which="SA", tol=1e-4, ncv=min(n - 1, 40))[0][0])
        except ArpackNoConvergence as e:
            lam = float(np.min(e.eigenvalues)) if len(e.eigenvalues) else -1e300
        except ArpackError:
            lam = -1e300
    return math.inf if lam >= 0 else 1.0 / -lam


def _ratio(v: Array, dv: Array) -> float:
    neg = dv < 0
    return float(np.min(-v[neg] / dv[neg])) if neg.any() else math.inf


def _solve(h: Array, rhs: Array) -> Array:
    """Solve the SPD Schur system with Jacobi scaling (regularised if numerically singular)."""
    dsc = 1.0 / np.sqrt(np.maximum(np.diagonal(h), 1e-300))
    hs = h * dsc[:, None] * dsc[None, :]
    k = len(rhs)
    for reg in (0.0, 1e-13, 1e-11, 1e-9, 1e-7):
        try:
            c = linalg.cho_factor(hs + reg * np.eye(k), check_finite=True)
            return np.asarray(linalg.cho_solve(c, rhs * dsc)) * dsc
        except (linalg.LinAlgError, ValueError):
            continue
    return np.asarray(linalg.lstsq(hs, rhs * dsc)[0]) * dsc


def _chol_step(
    base: Array, d: Array, alpha: float, extra_ok: bool = True
) -> tuple[float, Array | None]:
    """Shrink alpha until base + alpha d is positive definite; returns (alpha, its factor)."""
    for _ in range(30):
        if extra_ok:
            r = cholesky_upper(base + alpha * d)
            if r is not None:
                return alpha, r
        alpha *= 0.7
    return 0.0, None


def solve_ipm(
    lmi: StructuredLmi, t0: Array, rho0: float, settings: IpmSettings, *, per_layer: bool
) -> IpmOutcome:
    """Primal-dual path following from the strictly feasible (rho0, t0); best iterate returned."""
    grp = Grouping(lmi, per_layer)
    x = t0[grp.starts].copy() if per_layer else t0.copy()
    m = len(x)
    rho, rs = rho0, None
    for k in range(60):
        rho = rho0 * (1.0 + 0.1 * 2.0**k)
        rs = cholesky_upper(lmi.assemble(rho, grp.expand(x)))
        if rs is not None:
            break
    if rs is None:
        raise ValueError("starting multipliers are not strictly feasible")
    # tighten: rho(t0) = rho - 1 / lambda_max(X_00); start 10% above it
    x00 = inverse_from_cholesky(rs)[: lmi.r, : lmi.r]
    rho_t0 = rho - 1.0 / float(linalg.eigvalsh(x00, subset_by_index=[lmi.r - 1, lmi.r - 1])[0])
    if 0 < rho_t0 < rho:
        r_new = cholesky_upper(lmi.assemble(settings.rho_factor * rho_t0, grp.expand(x)))
        if r_new is not None:
            rho, rs = settings.rho_factor * rho_t0, r_new
    start_t, start_rho = grp.expand(x).copy(), (rho_t0 if 0 < rho_t0 < rho else math.inf)
    s_mat = lmi.assemble(rho, grp.expand(x))
    xinv = inverse_from_cholesky(rs)
    mu0 = settings.z0_scale / float(np.trace(xinv[: lmi.r, : lmi.r]))
    zmat = mu0 * xinv
    rz = cholesky_upper(zmat)
    w = grp.sign_needed(lmi)
    z = mu0 * w / x
    nu = float(lmi.n + w.sum())
    sgn = w > 0
    c = np.zeros(m + 1)
    c[0] = 1.0
    bl = lmi.block(lmi.depth)
    best_t, best_rho = start_t, start_rho
    lower: float | None = None
    status, it, rel_gap = "inaccurate", 0, math.inf
    history: list[dict[str, float]] = []
    t_iter, a_d_prev = 0.0, 1.0
    diag = {"a_p": 0.0, "a_d": 0.0, "sigma": 0.0}
    while True:
        now = time.perf_counter()
        xb, zb = rank2_blocks(lmi, xinv), rank2_blocks(lmi, zmat)
        tr_x00, cx = constraint_values(xb)
        tr_z00, cz = constraint_values(zb)
        az = grp.vec(cz)
        lam = float(linalg.eigvalsh(xb.y00, subset_by_index=[lmi.r - 1, lmi.r - 1])[0])
        rho_t = rho - 1.0 / lam
        if rho_t < best_rho:
            best_t, best_rho = grp.expand(x).copy(), rho_t
        if tr_z00 > 0:
            # weak duality with Z / tr Z_00; positive <Z, F_k> (residual) are charged at x_k
            lb = float(np.sum(zmat[bl, bl] * lmi.wl_gram) - x @ np.maximum(az, 0.0)) / tr_z00
            lower = lb if lower is None else max(lower, lb)
        gap = float(np.sum(s_mat * zmat)) + float(x @ z)
        rel_gap = (best_rho - lower) / abs(best_rho) if lower is not None else math.inf
        entry = {"iteration": it, "rho": best_rho, "gap": rel_gap, "mu": gap / nu, **diag}
        history.append(entry)
        if settings.progress is not None:
            settings.progress({"phase": "solve", **entry})
        if rel_gap <= settings.eps:
            status = "optimal"
            break
        if it >= settings.max_iters:
            break
        if settings.deadline is not None and now + t_iter > settings.deadline:
            status = "timeout"
            break
        if settings.cancelled is not None and settings.cancelled():
            status = "cancelled"
            break
        m_rr, m_rt, m_tt = schur_matrix(zb, xb)
        h = np.empty((m + 1, m + 1))
        h[0, 0] = m_rr
        h[0, 1:] = h[1:, 0] = grp.vec(m_rt)
        h[1:, 1:] = grp.mat(m_tt)
        h[1:, 1:][np.diag_indices(m)] += z / x
        g = np.concatenate([[tr_x00], grp.vec(cx) + w / x])
        mu = gap / nu
        # predictor (sigma = 0): its step length sets sigma (Mehrotra), no extra n^3 work
        dy_a = _solve(h, -c)
        ds_a = lmi.assemble(dy_a[0], grp.expand(dy_a[1:]), constant=False)
        a_p = min(1.0, max_step(rs, ds_a), _ratio(x[sgn], dy_a[1:][sgn]))
        dz_a = -z - (z / x) * dy_a[1:]
        a_d = min(1.0, _ratio(z[sgn], dz_a[sgn]))
        zds = float(dy_a[0] * tr_z00 + dy_a[1:] @ az)  # <Z, dS>
        a = min(a_p, a_d, a_d_prev)
        sdp_aff = (1 - a) * float(np.sum(s_mat * zmat)) - a * a * (zds + float(dy_a @ h @ dy_a))
        lin_aff = float((x + a * dy_a[1:]) @ (z + a * dz_a))
        sigma = min(1.0, max(((sdp_aff + lin_aff) / gap) ** 3, 0.0)) if gap > 0 else 0.1
        sigma = max(sigma, settings.sigma_min)
        if settings.sigma_fixed is not None:
            sigma = settings.sigma_fixed
        dy = _solve(h, sigma * mu * g - c)
        ds = lmi.assemble(dy[0], grp.expand(dy[1:]), constant=False)
        tmp = times_linear_part(lmi, zmat, dy[0], grp.expand(dy[1:])) @ xinv
        dzm = sigma * mu * xinv - zmat
        dzm -= 0.5 * (tmp + tmp.T)
        dz = sigma * mu * w / x - z - (z / x) * dy[1:]
        a_p = min(
            1.0,
            settings.step_frac * max_step(rs, ds),
            settings.step_frac * _ratio(x[sgn], dy[1:][sgn]),
        )
        a_d = min(1.0, settings.step_frac * _ratio(z[sgn], dz[sgn]))
        if rz is not None:
            a_d = min(a_d, settings.step_frac * max_step(rz, dzm))
        a_p, rs_new = _chol_step(s_mat, ds, a_p)
        a_d, rz_new = _chol_step(zmat, dzm, a_d)
        it += 1
        a_d_prev = a_d
        diag = {"a_p": a_p, "a_d": a_d, "sigma": sigma}
        if lower is not None:
            diag["lower"] = lower
        if rs_new is None or a_p == 0.0:
            break  # no feasible progress in float64: keep the best iterate
        rho += a_p * dy[0]
        x = x + a_p * dy[1:]
        s_mat = s_mat + a_p * ds
        rs = rs_new
        xinv = inverse_from_cholesky(rs)
        if rz_new is not None:
            zmat = zmat + a_d * dzm
            z = z + a_d * dz
            rz = rz_new
        t_iter = time.perf_counter() - now
    return IpmOutcome(best_t, best_rho, status, it, rel_gap, lower, history)
