"""SDP-CROWN: bound propagation with an l2 (SDP-type) coupling of the neurons of each layer.

Problem. Lower-bound a linear function ``c^T f(x)`` of the logits of a chain network
``z_1 = W_1 x + b_1``, ``a_k = phi(z_k)``, ``z_{k+1} = W_{k+1} a_k + b_{k+1}``, ``f = z_{K+1}``
over the ball ``B = {x : ||x - x0||_2 <= eps}``. CROWN relaxes every neuron separately: with
``Lam_k`` the coefficient of ``a_k`` it bounds ``Lam_k^T phi(z_k) >= g_k^T z_k + h_k`` where the
offset ``h_k`` is the sum of per-neuron offsets of lines under/over phi on the box
``l_k <= z_k <= u_k``. On an l2 ball those worst cases cannot happen for all neurons at once
(they would need ``z_k`` in a corner of the box, far outside the ball's image), which costs up
to a factor sqrt(n) on the offsets (Chiu, Chen, Zhang, Zhang, "SDP-CROWN: Efficient Bound
Propagation for Neural Network Verification with Tightness of Semidefinite Programming",
ICML 2025).

Offset with one multiplier (derivation). Let ``c_k`` be any centre and ``rho_k`` a number with
``||(z_k(x) - c_k)_U||_2 <= rho_k`` for every x in B, where U is the set of unstable neurons
(``l < 0 < u``). For any ``lam >= 0`` and every such z (which also lies in the box)::

    Lam^T phi(z) - g^T z  >=  Lam^T phi(z) - g^T z + lam (sum_{i in U} (z_i - c_i)^2 - rho^2)
                          >=  sum_i m_i(lam) - lam rho^2  =:  h(g, lam),
    m_i(lam) = min_{l_i <= t <= u_i}  Lam_i phi(t) - g_i t + q_i (t - c_i)^2,
    q_i = lam for i in U, 0 otherwise,

because the added term is <= 0 on the ball (weak Lagrangian duality for the single quadratic
constraint) and the remaining minimisation separates over coordinates. For a piecewise-linear
phi (relu, leaky relu, identity: slope ``s_-`` for t < 0 and 1 for t >= 0), m_i is the minimum
over the two pieces ``[l, min(u, 0)]`` and ``[max(l, 0), u]`` of the convex quadratic
``beta t + q (t - c)^2``, ``beta = Lam_i s - g_i``: its minimiser is ``clip(c - beta / 2q)``
(an end point when q = 0), the closed form of the paper. ``lam = 0`` gives exactly the best
per-neuron (CROWN) offset for the same g on the box; lam > 0 couples the neurons through the
ball. h is concave in (g, lam) (a minimum of affine functions), so any (g, lam) gives a valid
bound and the optimiser's values are only candidates.

Layers whose inputs are affine images of the ball. The first layer: ``z_1 - c_1 = W_1 (x - x0)
+ (W_1 x0 + b_1 - c_1)``, so ``rho_1 = ||W_{1,U}||_2 eps + ||delta_U||`` (delta the rounding of
the computed centre). Deeper layers: ``a_{k-1}`` stays within ``R_{k-1}`` of the centre
``d_{k-1} = phi(c_{k-1})`` (the smaller of the Lipschitz image of the previous layer's ball on
its non-inactive neurons and the radius of the box ``[phi(l), phi(u)]``), and
``z_k - c_k = W_k (a_{k-1} - d_{k-1}) + (W_k d_{k-1} + b_k - c_k)``, an affine image of a ball
again: ``rho_k = ||W_{k,U}||_2 R_{k-1} + ||delta_U||``. This is the paper's treatment (an l2
ball per layer, radius propagated through the layers).

The whole bound. Backward from ``Lam_K = W_{K+1}^T c``::

    c^T f(x) >= c^T b_{K+1} + sum_k (g_k^T b_k + h_k(g_k, lam_k))
                + g_1^T W_1 x0 - eps ||W_1^T g_1||,        Lam_{k-1} = W_k^T g_k,

jointly concave in all (g_k, lam_k) (the g_k are free vectors, not only CROWN's slopes times
Lam, which makes it at least as tight as alpha-CROWN with the same intermediate bounds). The
optimiser does Adam ascent on the g_k (supergradients by Danskin's theorem: d h / d g_i = -t_i*,
d h / d Lam_i = phi(t_i*)) with lam_k solved exactly per step (1-D concave, bisection on its
derivative ``sum_U (t_i* - c_i)^2 - rho^2``). Intermediate bounds (the boxes ``l_k, u_k``) come
from the same bound with ``c = +-e_i`` on ``z_k``.

Floating point. The reported bound is recomputed from the candidate (g, lam) in float64 with
rigorous error terms (:mod:`sdp.local._ereal`): matrix products carry gamma_n |A||B| error
bounds, each m_i is bounded below by the maximum of three lower bounds of a convex quadratic on
an interval (tangents at both end points and the unconstrained minimum), so a wrong clip
decision in floating point can never raise it; spectral norms are the rigorous upper bounds of
:func:`sdp.bounds.naive.dense_norm`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from sdp.bounds.naive import dense_norm
from sdp.errors import NotApplicable
from sdp.ir import Activation, Array, Conv2d, Dense, Network
from sdp.local._ereal import TINY, EReal, U, gamma, lower, matmul_exact, norm_upper, upper

_PIECEWISE_LINEAR = {"relu": 0.0, "identity": 1.0}


@dataclass(frozen=True, eq=False)
class Layer:
    """One affine map ``z = W a + b`` (exact float64 entries), then ``phi`` (None at the end).

    ``sneg`` is phi's slope for z < 0 (phi(z) = z for z >= 0): relu 0, leaky relu a, identity 1.
    """

    w: Array
    b: Array
    sneg: float | None

    def phi(self, z: Array) -> Array:
        assert self.sneg is not None
        return np.where(z >= 0, z, self.sneg * z)


def _sneg(op: Activation) -> float:
    if op.name in _PIECEWISE_LINEAR:
        return _PIECEWISE_LINEAR[op.name]
    if op.name == "leaky_relu" and 0.0 <= op.param <= 1.0:
        return float(op.param)
    raise NotApplicable(f"sdp-crown handles relu, leaky_relu and identity, not {op.name}")


def _affine(op: Dense | Conv2d) -> tuple[Array, Array]:
    if isinstance(op, Dense):
        return np.asarray(op.weight), np.asarray(op.bias)
    _, ho, wo = op.out_shape
    return op.matrix(), np.repeat(op.bias, ho * wo)


def layers_of(net: Network, max_entries: int = 20_000_000) -> list[Layer]:
    """The network as alternating exact affine maps and piecewise-linear activations.

    Two affine ops in a row get an identity activation between them (exact, no merged
    product); an activation without an affine op before it gets an identity matrix; a
    trailing activation is followed by the identity map. Raises NotApplicable for residual
    networks, other activations, or matrices with more than ``max_entries`` entries.
    """
    if not net.is_chain:
        raise NotApplicable("sdp-crown handles chains of dense/conv layers, not residual networks")
    return layers_from_ops(net.ops, net.input_size, max_entries)


def layers_from_ops(ops: Sequence[object], n_in: int, max_entries: int = 20_000_000) -> list[Layer]:
    """:func:`layers_of` for a flat sequence of Dense / Conv2d / Activation ops."""
    layers: list[Layer] = []
    pending: tuple[Array, Array] | None = None
    n = n_in
    for op in ops:
        if isinstance(op, Activation):
            w, b = pending if pending is not None else (np.eye(n), np.zeros(n))
            layers.append(Layer(w, b, _sneg(op)))
            pending = None
        elif isinstance(op, Dense | Conv2d):
            if op.out_features * op.in_features > max_entries:
                raise NotApplicable("layer too large for the dense sdp-crown path")
            if pending is not None:
                layers.append(Layer(pending[0], pending[1], 1.0))
            pending = _affine(op)
            n = op.out_features
        else:
            raise NotApplicable(f"sdp-crown handles chains only, not {type(op).__name__}")
    w, b = pending if pending is not None else (np.eye(n), np.zeros(n))
    layers.append(Layer(w, b, None))
    return layers


@dataclass
class Geometry:
    """Verified facts about hidden layer k on the ball B(x0, eps).

    ``lo <= z_k <= hi`` (verified), any float centre ``c``, and the coupling
    ``sum_{i in U} scale_i^2 (z_i - c_i)^2 <= tau`` (scale = 0 outside the unstable set U).
    For the next layer: ``a_k - d = J (x - x0) + r`` with J the exact linear map through the
    stably active neurons (``lin`` covers it) and r = sum of parts supported on disjoint
    neuron sets, ``||r_part|| <= bound`` (``rem``: (mask, bound) pairs).
    """

    lo: Array
    hi: Array
    centre: Array
    centre_err: Array  # |exact(W_k d_{k-1} + b_k) - c_k| <= centre_err
    scale: Array = field(default_factory=lambda: np.zeros(0))
    tau: float = 0.0
    d: Array = field(default_factory=lambda: np.zeros(0))
    lin: EReal | None = None
    rem: list[tuple[NDArray[np.bool_], float]] = field(default_factory=list)

    @property
    def unstable(self) -> NDArray[np.bool_]:
        return (self.lo < 0) & (self.hi > 0)

    @property
    def weight(self) -> Array:
        return np.asarray(self.scale * self.scale)


@dataclass
class Candidate:
    """Optimised multipliers for a batch of S specifications: g_k (S, n_k) and lam_k (S,)."""

    g: list[Array]
    lam: list[Array]


# ----------------------------------------------------------------------------- float model


def _pieces(
    lam_: Array, g: Array, q: Array, c: Array, lo: Array, hi: Array, sneg: float
) -> tuple[Array, Array, Array]:
    """m_i, the minimiser t_i* and phi(t_i*) of Lam phi(t) - g t + q (t - c)^2 on [lo, hi]."""
    best = np.full(g.shape, np.inf)
    best_t = np.zeros(g.shape)
    best_phi = np.zeros(g.shape)
    qpos = q > 0
    inv2q = 0.5 / np.where(qpos, q, 1.0)
    for p, r, s in ((lo, np.minimum(hi, 0.0), sneg), (np.maximum(lo, 0.0), hi, 1.0)):
        beta = lam_ * s - g
        free = np.minimum(np.maximum(c - beta * inv2q, p), r)
        t = np.where(qpos, free, np.where(beta >= 0, p, r))
        val = beta * t + q * (t - c) ** 2
        val = np.where(p <= r, val, np.inf)
        take = val < best
        best = np.where(take, val, best)
        best_t = np.where(take, t, best_t)
        best_phi = np.where(take, s * t, best_phi)
    return best, best_t, best_phi


def _solve_lam(
    lam_: Array, g: Array, geo: Geometry, sneg: float, prev: Array | None = None
) -> Array:
    """Per row, the lam >= 0 maximising h(g, lam) (bisection on the concave h's derivative

    ``sum_i w_i (t_i*(lam) - c_i)^2 - tau``, decreasing in lam; only the coupled columns
    depend on lam). ``prev`` (the last step's lam) narrows the bracket.
    """
    w = geo.weight
    mask = w > 0
    s_rows = g.shape[0]
    if not mask.any() or geo.tau <= 0:
        return np.zeros(s_rows)
    lm, gm, wm = lam_[:, mask], g[:, mask], w[mask]
    cm, lom, him = geo.centre[mask], geo.lo[mask], geo.hi[mask]

    def deriv(lam: Array) -> Array:
        _, t, _ = _pieces(lm, gm, lam[:, None] * wm, cm, lom, him, sneg)
        return np.asarray((wm * (t - cm) ** 2).sum(axis=1) - geo.tau)

    scale = np.log(np.abs(lm).mean(axis=1) / np.sqrt(geo.tau) + 1e-30)
    if prev is not None and np.all(prev > 0):
        lo_log, hi_log = np.log(prev) - 1.0, np.log(prev) + 1.0
        d_lo, d_hi = deriv(np.exp(lo_log)), deriv(np.exp(hi_log))
        lo_log = np.where(d_lo > 0, lo_log, scale - 25.0)
        hi_log = np.where(d_hi > 0, scale + 25.0, hi_log)
        iters = 8  # +-1 bracket: 2^-7 in log lam; a wide one 0.4 (any lam is valid)
    else:
        lo_log, hi_log, iters = scale - 25.0, scale + 25.0, 16
    for _ in range(iters):
        mid = 0.5 * (lo_log + hi_log)
        d = deriv(np.exp(mid))
        lo_log = np.where(d > 0, mid, lo_log)
        hi_log = np.where(d > 0, hi_log, mid)
    lam = np.exp(0.5 * (lo_log + hi_log))
    tiny_lam = deriv(np.exp(scale - 25.0)) <= 0
    return np.where(tiny_lam, 0.0, lam)


def _value_and_grad(
    layers: list[Layer],
    geos: list[Geometry],
    x0: Array,
    eps: float,
    top: Array,
    const: Array,
    alpha: list[Array],
    lam_prev: list[Array],
) -> tuple[Array, list[Array], list[Array], list[Array]]:
    """Float bound per row with g_k = Lam_k * alpha_k, its supergradient in each alpha_k, the
    lam_k solved for these g, and the g_k themselves."""
    k_hidden = len(geos)
    lam_ = top
    total = const.copy()
    lams_in: list[Array] = [np.zeros(0)] * k_hidden
    ts, phis, lams, gs = (list(lams_in) for _ in range(4))
    for k in range(k_hidden - 1, -1, -1):
        geo, sneg = geos[k], layers[k].sneg
        assert sneg is not None
        g = lam_ * alpha[k]
        lam = _solve_lam(lam_, g, geo, sneg, lam_prev[k] if lam_prev else None)
        m, t, ph = _pieces(lam_, g, lam[:, None] * geo.weight, geo.centre, geo.lo, geo.hi, sneg)
        total += m.sum(axis=1) - lam * geo.tau + g @ layers[k].b
        ts[k], phis[k], lams[k], gs[k], lams_in[k] = t, ph, lam, g, lam_
        if k > 0:
            lam_ = g @ layers[k].w
    tvec = gs[0] @ layers[0].w
    nrm = np.linalg.norm(tvec, axis=1)
    total += tvec @ x0 - eps * nrm
    unit = tvec / np.maximum(nrm, 1e-300)[:, None]
    grads: list[Array] = [np.zeros(0)] * k_hidden
    dlam = np.zeros(0)
    dg = layers[0].b - ts[0] + (x0[None, :] - eps * unit) @ layers[0].w.T
    for k in range(k_hidden):
        if k > 0:
            dg = layers[k].b - ts[k] + dlam @ layers[k].w.T
        grads[k] = lams_in[k] * dg
        dlam = phis[k] + alpha[k] * dg
    return total, grads, lams, gs


def _slope_range(geo: Geometry, sneg: float) -> tuple[Array, Array]:
    """Range of alpha per neuron: [sneg, 1] if unstable, the fixed slope if stable."""
    lo_a = np.where(geo.lo >= 0, 1.0, sneg)
    hi_a = np.where(geo.hi <= 0, sneg, 1.0)
    return lo_a, hi_a


def _init_alpha(layers: list[Layer], geos: list[Geometry], top: Array) -> list[Array]:
    """CROWN's slopes: the lower line (Lam > 0, adaptive) or the chord (Lam < 0)."""
    k_hidden = len(geos)
    alpha: list[Array] = [np.zeros(0)] * k_hidden
    lam_ = top
    for k in range(k_hidden - 1, -1, -1):
        geo, sneg = geos[k], layers[k].sneg
        assert sneg is not None
        lo, hi = geo.lo, geo.hi
        width = np.where(hi > lo, hi - lo, 1.0)
        upper_slope = np.where(hi > lo, (hi - sneg * lo) / width, 1.0)
        lower_slope = np.where(hi >= -lo, 1.0, sneg)
        slope = np.where(lam_ >= 0, lower_slope, upper_slope)
        alpha[k] = np.where(lo >= 0, 1.0, np.where(hi <= 0, sneg, slope))
        if k > 0:
            lam_ = (lam_ * alpha[k]) @ layers[k].w
    return alpha


def optimise(
    layers: list[Layer],
    geos: list[Geometry],
    x0: Array,
    eps: float,
    top: Array,
    const: Array,
    *,
    iters: int = 40,
    lr: float = 0.2,
    alpha0: list[Array] | None = None,
    stop_above: float | None = None,
) -> Candidate:
    """Projected Adam ascent on the slopes alpha_k (lam_k solved exactly each step).

    Returns the best iterate per row as (g_k = Lam_k alpha_k, lam_k) -- a candidate only.
    Stops early once every row's value exceeds ``stop_above`` by a margin (the float value
    is re-checked rigorously afterwards) or after 8 steps without a gain of 1e-4 relative.
    """
    alpha = [a.copy() for a in (alpha0 if alpha0 is not None else _init_alpha(layers, geos, top))]
    ranges = [_slope_range(geo, lay.sneg or 0.0) for geo, lay in zip(geos, layers, strict=False)]
    m1 = [np.zeros_like(a) for a in alpha]
    m2 = [np.zeros_like(a) for a in alpha]
    rows = top.shape[0]
    best_val = np.full(rows, -np.inf)
    best_g = [np.zeros_like(a) for a in alpha]
    best_lam = [np.zeros(rows) for _ in alpha]
    b1, b2 = 0.9, 0.999
    lams: list[Array] = []
    best_val_prev = best_val.copy()
    stall = 0
    for it in range(iters + 1):
        val, grads, lams, gs = _value_and_grad(layers, geos, x0, eps, top, const, alpha, lams)
        better = val > best_val
        best_val = np.where(better, val, best_val)
        for k in range(len(alpha)):
            best_g[k][better] = gs[k][better]
            best_lam[k][better] = lams[k][better]
        gain = float(np.nan_to_num(np.max(best_val - best_val_prev))) if it else np.inf
        best_val_prev = best_val.copy()
        stall = stall + 1 if gain <= 1e-4 * (1 + np.abs(best_val).max()) else 0
        done = stop_above is not None and bool(np.all(best_val > stop_above + 1e-6))
        if it == iters or done or stall >= 8:
            break
        step = lr * (0.98**it)
        for k in range(len(alpha)):
            m1[k] = b1 * m1[k] + (1 - b1) * grads[k]
            m2[k] = b2 * m2[k] + (1 - b2) * grads[k] ** 2
            mh = m1[k] / (1 - b1 ** (it + 1))
            vh = m2[k] / (1 - b2 ** (it + 1))
            alpha[k] = np.clip(alpha[k] + step * mh / (np.sqrt(vh) + 1e-12), *ranges[k])
    return Candidate(best_g, best_lam)


# ------------------------------------------------------------------------ rigorous check


def _piece_lower(lam_: EReal, g: Array, q: Array, c: Array, p: Array, r: Array, s: float) -> Array:
    """Lower bound of min_{p <= t <= r} beta t + q (t - c)^2, beta = Lam s - g, exactly.

    max of three lower bounds of a convex function on [p, r]: the tangent at p (F(p) +
    min(0, F'(p)) (r - p)), at r (F(r) - max(0, F'(r)) (r - p)) and, for q > 0, the
    unconstrained minimum beta c - beta^2 / (4 q). +inf for an empty piece (p > r).
    """
    ge = EReal.exact(g)
    if s == 0.0:
        beta = -ge
    elif s == 1.0:
        beta = lam_ - ge
    else:
        beta = lam_.scale(s) - ge
    shape = g.shape
    pe = EReal.exact(np.broadcast_to(p, shape))
    re = EReal.exact(np.broadcast_to(r, shape))
    ce = EReal.exact(np.broadcast_to(c, shape))
    qe = EReal.exact(q)
    dp, dr = pe - ce, re - ce
    fp = beta * pe + qe * (dp * dp)
    fr = beta * re + qe * (dr * dr)
    dfp = beta + (qe * dp).scale(2.0)
    dfr = beta + (qe * dr).scale(2.0)
    width = (re - pe).hi()
    a = np.minimum(0.0, dfp.lo()) * width
    cand_a = lower(fp.lo() + lower(a, np.zeros_like(a)), np.zeros_like(a))
    b = np.maximum(0.0, dfr.hi()) * width
    cand_b = lower(fr.lo() - upper(b, np.zeros_like(b)), np.zeros_like(b))
    qpos = q > 0
    qs = np.where(qpos, q, 1.0)
    uncon = (beta * ce - (beta * beta).div(4.0 * qs)).lo()
    cand_c = np.where(qpos, uncon, -np.inf)
    out = np.maximum(np.maximum(cand_a, cand_b), cand_c)
    out = np.where(np.isnan(out), -np.inf, out)
    return np.where(np.broadcast_to(p <= r, shape), out, np.inf)


def offsets_lower(lam_: EReal, g: Array, q: Array, geo: Geometry, sneg: float) -> Array:
    """Rigorous lower bounds of m_i (S, n) for exact g, q and Lam within lam_."""
    lo, hi, c = geo.lo, geo.hi, geo.centre
    neg = _piece_lower(lam_, g, q, c, lo, np.minimum(hi, 0.0), sneg)
    pos = _piece_lower(lam_, g, q, c, np.maximum(lo, 0.0), hi, 1.0)
    return np.minimum(neg, pos)


def certify(
    layers: list[Layer],
    geos: list[Geometry],
    x0: Array,
    eps: float,
    top: EReal,
    const: EReal,
    cand: Candidate,
) -> Array:
    """Verified lower bounds (S,) of the objective rows ``Lam_top^T a_K + const`` on the ball."""
    lam_ = top
    total = const
    for k in range(len(geos) - 1, -1, -1):
        geo, sneg, g = geos[k], layers[k].sneg, cand.g[k]
        assert sneg is not None
        lam = np.maximum(np.nan_to_num(cand.lam[k], nan=0.0, posinf=0.0), 0.0)
        # q_i <= lam scale_i^2 exactly, so sum q_i (z_i - c_i)^2 <= lam tau on the ball
        q = lam[:, None] * geo.weight * (1 - 8 * U)
        m = offsets_lower(lam_, g, q, geo, sneg)
        off = EReal(m, np.zeros_like(m)).sum(axis=1)
        pen = upper(lam * geo.tau, np.zeros_like(lam))
        total = total + off - EReal(pen, np.zeros_like(pen)) + matmul_exact(g, layers[k].b)
        if k > 0:
            lam_ = matmul_exact(g, layers[k].w)
    t = matmul_exact(cand.g[0], layers[0].w)
    total = total + t.matmul(x0[:, None])[:, 0]
    reach = upper(eps * norm_upper(t), np.zeros(t.v.shape[0]))
    total = total - EReal(reach, np.zeros_like(reach))
    out = total.lo()
    return np.where(np.isfinite(out), out, -np.inf)


# ------------------------------------------------------------------------ layer geometry


def _fro_upper(e: Array) -> float:
    return float(norm_upper(EReal(e.reshape(1, -1), np.zeros((1, e.size))))[0])


def _op_upper(
    a: EReal,
    rows: NDArray[np.bool_],
    rscale: Array | None = None,
    cols: NDArray[np.bool_] | None = None,
) -> float:
    """Upper bound of ||diag(rscale) A[rows][:, cols]||_2 for the exact A within ``a``."""
    if not rows.any() or (cols is not None and not cols.any()):
        return 0.0
    v, e = a.v[rows], a.e[rows]
    if cols is not None:
        v, e = v[:, cols], e[:, cols]
    if rscale is not None:
        v = rscale[rows, None] * v
        e = rscale[rows, None] * e + U * np.abs(v)
    return float(upper(np.asarray(dense_norm(v) + _fro_upper(e)), np.zeros(())))


def _vec_upper(v: Array) -> float:
    return _fro_upper(np.abs(v)) if v.size else 0.0


def _add_up(*xs: float) -> float:
    return float(upper(np.asarray(sum(xs) * (1 + 8 * U)), np.zeros(())))


def _mul_up(a: float, b: float) -> float:
    return float(upper(np.asarray(a * b), np.zeros(())))


def _finish(
    geo: Geometry,
    layer: Layer,
    lin_in: EReal | None,
    rem_in: list[tuple[NDArray[np.bool_], float]],
    eps: float,
) -> None:
    """Coupling (scale, tau) and the next layer's linear part / remainder, from the box.

    With L = W_k J_{k-1} (J_{-1} = I, r_{-1} = 0) and delta the centre's rounding:
    z - c = L (x - x0) + W_k r_{k-1} + delta, so for any row scaling D on U
    ||D (z - c)_U|| <= ||D L_U|| eps + sum_parts ||D W_{U,part}|| ||r_part|| + ||D delta_U||
    (= sqrt(tau)).
    Stably active neurons pass z - c on exactly (d = c there), stably inactive relu neurons
    give 0, unstable ones |a - d| <= min(box, |z - c|) go to the remainder.
    """
    sneg = layer.sneg
    assert sneg is not None
    if lin_in is None:
        lin = EReal.exact(layer.w)
    else:
        prod = matmul_exact(layer.w, lin_in.v)
        lin = EReal(prod.v, prod.e + up_mat(layer.w, lin_in.e))
    unst = geo.unstable
    active = geo.lo >= 0 if sneg != 1.0 else np.ones_like(unst)
    dead = (geo.hi <= 0) & (sneg == 0.0)
    other = ~(active | dead)

    def coupling(rows: NDArray[np.bool_], dsc: Array | None) -> float:
        w_rows = EReal.exact(layer.w)
        dv = np.abs(geo.centre_err[rows]) * (1.0 if dsc is None else dsc[rows])
        return _add_up(
            _mul_up(_op_upper(lin, rows, dsc), eps),
            *[_mul_up(_op_upper(w_rows, rows, dsc, m), r) for m, r in rem_in if r > 0],
            _vec_upper(upper(dv, np.zeros_like(dv))),
        )

    half = (geo.hi - geo.lo) / 2
    best: tuple[float, Array, float] | None = None
    row_norm = np.linalg.norm(lin.v, axis=1)
    for dsc in (np.ones_like(geo.lo), 1.0 / np.maximum(row_norm, 1e-12)):
        dsc = np.where(unst, dsc, 0.0)
        if not unst.any():
            break
        r = coupling(unst, dsc)
        box = float(np.sum((dsc * half)[unst] ** 2))
        ratio = r * r / max(box, 1e-300)
        if best is None or ratio < best[0]:
            best = (ratio, dsc, r)
    if best is None:
        geo.scale, geo.tau = np.zeros_like(geo.lo), 0.0
    else:
        geo.scale, geo.tau = best[1], _mul_up(best[2], best[2])
    # next layer's centre d, linear part J and remainder r
    d = np.where(active, geo.centre, layer.phi(geo.centre))
    d = np.where(dead, 0.0, d)
    geo.d = d
    geo.lin = EReal(np.where(active[:, None], lin.v, 0.0), np.where(active[:, None], lin.e, 0.0))
    a_part = _add_up(
        *[_mul_up(_op_upper(EReal.exact(layer.w), active, None, m), r) for m, r in rem_in if r > 0],
        _vec_upper(geo.centre_err[active]),
    )
    if other.any():
        p_hi, p_lo = layer.phi(geo.hi[other]), layer.phi(geo.lo[other])
        dd = d[other]
        obox = np.maximum(np.abs(p_hi - dd), np.abs(p_lo - dd))
        obox = obox + 2 * U * (np.abs(p_hi) + np.abs(p_lo) + np.abs(dd)) + TINY
        lip = max(1.0, abs(sneg)) * coupling(other, None)
        lip += 2 * U * float(np.linalg.norm(dd)) + TINY  # phi(c) rounded (leaky relu)
        o_part = min(_vec_upper(upper(obox, np.zeros_like(obox))), _add_up(lip))
    else:
        o_part = 0.0
    geo.rem = [(np.asarray(active, dtype=bool), a_part), (np.asarray(other, dtype=bool), o_part)]


def up_mat(w: Array, e: Array) -> Array:
    """|W| e (rounded up): the propagated error of a product with an inexact right factor."""
    k = w.shape[1]
    return np.asarray((np.abs(w) @ e) * (1 + 2 * gamma(k)) * (1 + 16 * U) + TINY)


def _lin_box(
    geo: Geometry,
    layer: Layer,
    lin_in: EReal,
    rem_in: list[tuple[NDArray[np.bool_], float]],
    eps: float,
) -> None:
    """|z_i - c_i| <= eps ||L_i|| + ||W_i|| rem + delta_i: a box from the linear part."""
    lin = matmul_exact(layer.w, lin_in.v)
    lin_e = lin.e + up_mat(layer.w, lin_in.e)
    from sdp.rounding import row_norm_upper_bounds

    rl = row_norm_upper_bounds(lin.v) + row_norm_upper_bounds(lin_e)
    spread = eps * rl + geo.centre_err
    for m, r in rem_in:
        if r > 0 and m.any():
            spread = spread + row_norm_upper_bounds(layer.w[:, m]) * r
    spread = upper(spread * (1 + 8 * U), np.zeros_like(rl))
    geo.lo = np.maximum(geo.lo, lower(geo.centre, spread))
    geo.hi = np.minimum(geo.hi, upper(geo.centre, spread))


def _first_geometry(layer: Layer, x0: Array, eps: float) -> Geometry:
    z = matmul_exact(layer.w, x0[:, None])
    z = EReal(z.v[:, 0], z.e[:, 0]) + EReal.exact(layer.b)
    from sdp.rounding import row_norm_upper_bounds

    reach = upper(eps * row_norm_upper_bounds(layer.w), np.zeros(layer.w.shape[0]))
    e = upper(z.e, reach)  # the float sum of two error terms could round below the exact one
    lo = lower(z.v, e)
    hi = upper(z.v, e)
    return Geometry(lo, hi, z.v.copy(), z.e)


def _next_centre(layer: Layer, prev: Geometry) -> EReal:
    """z = W d + b as an EReal (covering the exact product) for the previous centre d."""
    z = matmul_exact(layer.w, prev.d[:, None])
    return EReal(z.v[:, 0], z.e[:, 0]) + EReal.exact(layer.b)


def _ibp(layer: Layer, prev: Geometry, prev_layer: Layer) -> tuple[Array, Array]:
    """Interval bounds of z = W phi(z_prev) + b from the previous box (rigorous)."""
    a_lo = prev_layer.phi(prev.lo)
    a_hi = prev_layer.phi(prev.hi)
    slack = 2 * U * (np.abs(a_lo) + np.abs(a_hi)) + TINY  # leaky product rounding
    # one more ulp outward: a_lo - slack may round back onto a_lo (a tie at half an ulp)
    a_lo, a_hi = np.nextafter(a_lo - slack, -np.inf), np.nextafter(a_hi + slack, np.inf)
    mid = 0.5 * (a_lo + a_hi)
    rad = upper(np.maximum(mid - a_lo, a_hi - mid), np.zeros_like(mid))
    zm = matmul_exact(layer.w, mid[:, None])
    zr = matmul_exact(np.abs(layer.w), rad[:, None])
    zc = EReal(zm.v[:, 0], zm.e[:, 0]) + EReal.exact(layer.b)
    spread = upper(zr.v[:, 0], zr.e[:, 0])
    e = upper(zc.e, spread)  # rounded up: the float sum of the two could undershoot
    return lower(zc.v, e), upper(zc.v, e)


def _pair_rows(w: Array, b: Array) -> tuple[EReal, EReal]:
    """Objective rows +-e_i on z = W a + b: Lam = +-W_i, const = +-b_i (exact)."""
    return EReal.exact(np.concatenate([w, -w])), EReal.exact(np.concatenate([b, -b]))


def _crown_g(layers: list[Layer], top: Array, alpha: list[Array]) -> list[Array]:
    g: list[Array] = [np.zeros(0)] * len(alpha)
    lam_ = top
    for k in range(len(alpha) - 1, -1, -1):
        g[k] = lam_ * alpha[k]
        if k > 0:
            lam_ = g[k] @ layers[k].w
    return g


def _bound_rows(
    layers: list[Layer],
    geos: list[Geometry],
    x0: Array,
    eps: float,
    top: EReal,
    const: EReal,
    iters: int,
    lr: float,
    stored: Candidate | None = None,
    stop_above: float | None = None,
) -> tuple[Array, Candidate | None]:
    """Verified lower bounds of the rows: CROWN's multipliers, and the optimised (or stored)
    candidate; the larger of the two per row, and the candidate used."""
    a0 = _init_alpha(layers, geos, top.v)
    g0 = _crown_g(layers, top.v, a0)
    zero = [np.zeros(len(top.v))] * len(g0)
    base = certify(layers, geos, x0, eps, top, const, Candidate(g0, zero))
    cand = stored
    if cand is None and iters > 0:
        if stop_above is not None and np.all(base > stop_above):
            return base, Candidate(g0, zero)
        cand = optimise(
            layers,
            geos,
            x0,
            eps,
            top.v,
            const.v,
            iters=iters,
            lr=lr,
            alpha0=a0,
            stop_above=stop_above,
        )
    if cand is None:
        return base, None
    return np.maximum(base, certify(layers, geos, x0, eps, top, const, cand)), cand


@dataclass
class Record:
    """The candidates behind one input's bounds: per hidden layer k >= 1 the optimised rows
    (unstable neurons, lower then upper) with their candidate, and the margins' candidate."""

    inter: dict[int, tuple[NDArray[np.intp], Candidate]] = field(default_factory=dict)
    final: Candidate | None = None


def geometry(
    layers: list[Layer],
    x0: Array,
    eps: float,
    *,
    iters: int = 20,
    lr: float = 0.2,
    stored: Record | None = None,
    record: Record | None = None,
) -> list[Geometry]:
    """Verified boxes, centres and couplings of every hidden layer on B(x0, eps).

    Intermediate bounds: IBP, the linear-part box, CROWN's multipliers, and for the neurons
    still unstable the optimised (or ``stored``) SDP-CROWN candidate; ``record`` collects the
    candidates used.
    """
    geos = [_first_geometry(layers[0], x0, eps)]
    _finish(geos[0], layers[0], None, [], eps)
    for k in range(1, len(layers) - 1):
        layer, prev = layers[k], geos[k - 1]
        zc = _next_centre(layer, prev)
        lo, hi = _ibp(layer, prev, layers[k - 1])
        geo = Geometry(lo, hi, zc.v.copy(), zc.e)
        assert prev.lin is not None
        _lin_box(geo, layer, prev.lin, prev.rem, eps)
        n = layer.w.shape[0]
        top, const = _pair_rows(layer.w, layer.b)
        base, _ = _bound_rows(layers[:k], geos, x0, eps, top, const, 0, lr)
        geo.lo = np.maximum(geo.lo, base[:n])
        geo.hi = np.minimum(geo.hi, -base[n:])
        old = stored.inter.get(k) if stored is not None else None
        rows = old[0] if old is not None else np.flatnonzero(geo.unstable)
        if rows.size and (iters > 0 or old is not None):
            sel = np.concatenate([rows, rows + n])
            tb, cand = _bound_rows(
                layers[:k],
                geos,
                x0,
                eps,
                EReal.exact(top.v[sel]),
                EReal.exact(const.v[sel]),
                iters,
                lr,
                old[1] if old is not None else None,
            )
            geo.lo[rows] = np.maximum(geo.lo[rows], tb[: rows.size])
            geo.hi[rows] = np.minimum(geo.hi[rows], -tb[rows.size :])
            if record is not None and cand is not None:
                record.inter[k] = (rows, cand)
        _finish(geo, layer, prev.lin, prev.rem, eps)
        geos.append(geo)
    return geos


def margin_lower_bounds(
    layers: list[Layer],
    x0: Array,
    eps: float,
    label: int,
    *,
    iters: int = 40,
    inter_iters: int = 20,
    lr: float = 0.2,
    stored: Record | None = None,
) -> tuple[Array, Record]:
    """Verified lower bounds of f_y(x) - f_j(x) over ||x - x0||_2 <= eps, per j (+inf at y).

    Args:
        layers: the network from :func:`layers_of`.
        x0: (n0,) float64 centre; eps: radius >= 0; label: the class y.
        iters / inter_iters: optimiser steps for the margins / the intermediate bounds
            (0 = CROWN's multipliers with the exact per-neuron offsets, no coupling).
        stored: candidates of an earlier run to re-check instead of optimising.

    Returns:
        (K,) bounds and the :class:`Record` of the candidates that produced them.
    """
    x0 = np.asarray(x0, dtype=np.float64)
    out = layers[-1]
    n_out = out.w.shape[0]
    others = np.array([j for j in range(n_out) if j != label])
    top_v = out.w[label][None, :] - out.w[others]
    const_v = out.b[label] - out.b[others]
    top = EReal(top_v, upper(U * np.abs(top_v), np.zeros_like(top_v)))
    const = EReal(const_v, upper(U * np.abs(const_v), np.zeros_like(const_v)))
    res = np.full(n_out, np.inf)
    record = Record()
    if len(layers) == 1:
        lin = top.matmul(x0[:, None])[:, 0] + const
        reach = upper(eps * norm_upper(top), np.zeros(len(others)))
        res[others] = (lin - EReal(reach, np.zeros_like(reach))).lo()
        return res, record
    if stored is not None:
        inter_iters = iters = 0
    geos = geometry(layers, x0, eps, iters=inter_iters, lr=lr, stored=stored, record=record)
    old = stored.final if stored is not None else None
    res[others], record.final = _bound_rows(layers[:-1], geos, x0, eps, top, const, iters, lr, old)
    return res, record


# ------------------------------------------------------------------------ certificates

Payload = tuple[tuple[str, Array], ...]


def _cand_items(prefix: str, cand: Candidate) -> list[tuple[str, Array]]:
    out: list[tuple[str, Array]] = []
    for j, (g, lam) in enumerate(zip(cand.g, cand.lam, strict=True)):
        out += [(f"{prefix}:g:{j}", np.asarray(g)), (f"{prefix}:lam:{j}", np.asarray(lam))]
    return out


def encode_record(rec: Record) -> Payload:
    """The record as (key, float64 array) pairs (a LocalCertificate payload)."""
    items: list[tuple[str, Array]] = []
    for k, (rows, cand) in sorted(rec.inter.items()):
        items.append((f"inter:{k}:rows", rows.astype(np.float64)))
        items += _cand_items(f"inter:{k}", cand)
    if rec.final is not None:
        items += _cand_items("final", rec.final)
    return tuple(items)


def _cand_from(
    data: dict[str, Array], prefix: str, layers: list[Layer], n_hidden: int, rows: int
) -> Candidate:
    g, lam = [], []

    def take(key: str) -> Array:
        if key not in data:
            raise ValueError(f"sdp-crown payload lacks {key!r}")
        return np.asarray(data.pop(key), dtype=np.float64)

    for j in range(n_hidden):
        gj, lj = take(f"{prefix}:g:{j}"), take(f"{prefix}:lam:{j}")
        if gj.shape != (rows, layers[j].w.shape[0]) or lj.shape != (rows,):
            raise ValueError(f"sdp-crown payload {prefix} layer {j} has the wrong shape")
        if not (np.isfinite(gj).all() and np.isfinite(lj).all() and (lj >= 0).all()):
            raise ValueError(f"sdp-crown payload {prefix} layer {j} is not finite / lam < 0")
        g.append(gj)
        lam.append(lj)
    return Candidate(g, lam)


def decode_record(layers: list[Layer], payload: Payload, n_classes: int) -> Record:
    """Inverse of :func:`encode_record`, with shape and value checks (ValueError)."""
    data = {str(k): np.asarray(v) for k, v in payload}
    if len(data) != len(payload):
        raise ValueError("sdp-crown payload has repeated keys")
    rec = Record()
    for k in range(1, len(layers) - 1):
        key = f"inter:{k}:rows"
        if key not in data:
            continue
        r = data.pop(key)
        n = layers[k].w.shape[0]
        if r.ndim != 1 or not np.isfinite(r).all() or (r != np.round(r)).any():
            raise ValueError("sdp-crown payload rows must be integers")
        rows = r.astype(np.intp)
        if (rows < 0).any() or (rows >= n).any() or np.unique(rows).size != rows.size:
            raise ValueError("sdp-crown payload rows out of range")
        rec.inter[k] = (rows, _cand_from(data, f"inter:{k}", layers, k, 2 * rows.size))
    if any(key.startswith("final:") for key in data):
        rec.final = _cand_from(data, "final", layers, len(layers) - 1, n_classes - 1)
    if data:
        raise ValueError(f"unknown sdp-crown payload entries {sorted(data)}")
    return rec
