"""Optimised lower slopes (alpha-CROWN; Xu et al., "Fast and Complete: Enabling Complete
Neural Network Verification with Rapid and Massively Parallel Incomplete Verifiers", ICLR 2021).

For every unstable ReLU-like neuron the lower line alpha z is valid for any alpha in
[alpha_min, alpha_max] (:class:`sdp.local.relax.Relaxation`); the CROWN bound of each objective row
is a function of the alphas of that row only. We maximise it by projected Adam (Kingma & Ba,
ICLR 2015) with gradients computed by hand, and keep, per row, the best iterate: every iterate's
bound is computed by the rigorous :func:`sdp.local.propagate.backward`, so the maximum over
iterates is a sound bound and the stored alphas reproduce it.

Gradient (for a fixed sign pattern of the multipliers, a.e.): the bound of row r equals the
relaxed network evaluated at the minimiser x*_r = x0 - eps Lambda_x / ||Lambda_x|| of the input
stage (Danskin's theorem), so d bound / d alpha_{k,i} = Lambda_{k,i} v_{k,i}(x*_r) where
Lambda_{k,i} >= 0 (lower line in use) and v is the pre-activation of the relaxed forward pass
from x*_r, z_k = s z + t with the lines selected by the sign of Lambda_k.

Sigmoid and tanh (:func:`optimise_tangents`, design.md §4.1.2): the tangent points of their
lower and upper lines are optimised the same way, per row, within the ranges where the
tangents are valid; the chosen slopes get rigorous intercepts and one rigorous pass.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

import numpy as np
from scipy import special

from sdp.ir import Activation, Array
from sdp.local import clock
from sdp.local.graph import Node
from sdp.local.propagate import (
    ActRule,
    ActStep,
    BallBounds,
    RowLines,
    backward,
    crown_act_step,
    node_objective,
    single,
)
from sdp.local.relax import (
    OPTIMISABLE,
    Relaxation,
    _deriv,
    deriv2,
    line_extremes,
    line_intercepts,
    tangent_ranges,
)


def _relaxed_forward(
    st: BallBounds,
    lam_x: Array,
    lam_act: dict[int, Array],
    alphas: dict[int, Array],
    top: int,
    lines: dict[int, RowLines] | None = None,
) -> dict[int, Array]:
    """Pre-activation values v (B, m, n) of every act node below ``top`` from x*_r, per row."""
    g = st.graph
    nrm = np.linalg.norm(lam_x, axis=-1, keepdims=True)
    xs = st.x0[:, None, :] - st.eps[:, None, None] * lam_x / np.where(nrm > 0, nrm, 1.0)
    vals: dict[int, Array] = {0: xs}
    pre: dict[int, Array] = {}
    for node in g.nodes[1 : top + 1]:
        if node.kind == "affine":
            vals[node.index] = node.linear(vals[node.parents[0]]) + node.full_bias
        elif node.kind == "act":
            v = vals[node.parents[0]]
            pre[node.index] = v
            rel = st.relax[node.index]
            lam = lam_act.get(node.index)
            sl = rel.lower_slope[:, None, :]
            a = alphas.get(node.index)
            if a is not None:
                sl = np.where(rel.alpha_mask[:, None, :], a, sl)
            if lam is None:
                lam = np.ones_like(v)
            pos = lam >= 0
            ln = None if lines is None else lines.get(node.index)
            if ln is not None:
                s = np.where(pos, ln.lower_slope, ln.upper_slope)
                t = np.where(pos, ln.lower_icpt, ln.upper_icpt)
            else:
                s = np.where(pos, sl, rel.upper_slope[:, None, :])
                t = np.where(pos, rel.lower_icpt[:, None, :], rel.upper_icpt[:, None, :])
            vals[node.index] = s * v + t
        elif node.kind == "add":
            a_, b_ = node.parents
            vals[node.index] = vals[a_] + vals[b_]
    return pre


def optimise_alphas(
    st: BallBounds,
    init: dict[int, Array],
    c0: Array,
    *,
    iterations: int = 20,
    lr: float = 0.5,
    start: dict[int, Array] | None = None,
    deadline: float | None = None,
) -> tuple[Array, dict[int, Array]]:
    """Best rigorous lower bounds (B, m) over projected-Adam iterates, and their alphas.

    ``start`` (act node -> (B, m, n)) seeds the alphas; CROWN's adaptive choice otherwise, so the
    result is never below the CROWN bound with the same intermediate bounds. ``deadline`` (a
    :func:`sdp.local.clock.now` time): no step is begun that the last one's measured time says
    would end past it (:func:`sdp.local.clock.fits`); the start is always evaluated, and every
    evaluated iterate is rigorous, so a stopped search returns a sound bound (>= CROWN's).
    """
    g = st.graph
    b, m = c0.shape
    top = max(init)
    acts = [
        nd.index
        for nd in g.act_nodes()
        if nd.index <= top and nd.index in st.relax and st.relax[nd.index].alpha_mask.any()
    ]
    alphas: dict[int, Array] = {}
    for k in acts:
        rel = st.relax[k]
        base = np.broadcast_to(rel.lower_slope[:, None, :], (b, m, rel.lower_slope.shape[1]))
        a0 = start.get(k) if start is not None else None
        alphas[k] = np.array(base if a0 is None else a0, dtype=np.float64)
    best = np.full((b, m), -np.inf)
    best_alpha = {k: v.copy() for k, v in alphas.items()}
    if not acts:
        res = backward(st, init, c0)
        return res.lower, best_alpha
    mom = {k: np.zeros_like(v) for k, v in alphas.items()}
    vel = {k: np.zeros_like(v) for k, v in alphas.items()}
    b1, b2, tiny = 0.9, 0.999, 1e-12
    last = 0.0  # seconds of the last whole step (evaluation and update)
    for it in range(iterations + 1):
        t_it = clock.now()
        res = backward(st, init, c0, alphas=alphas, record=True)
        better = res.lower > best
        if better.any():
            best = np.where(better, res.lower, best)
            for k in acts:
                best_alpha[k] = np.where(better[:, :, None], alphas[k], best_alpha[k])
        if it == iterations or not clock.fits(deadline, last or 2.0 * (clock.now() - t_it)):
            break
        assert res.lam_x is not None and res.lam_act is not None
        pre = _relaxed_forward(st, res.lam_x, res.lam_act, alphas, top)
        for k in acts:
            rel = st.relax[k]
            lam = res.lam_act[k]
            grad = np.where((lam >= 0) & rel.alpha_mask[:, None, :], lam * pre[k], 0.0)
            mom[k] = b1 * mom[k] + (1 - b1) * grad
            vel[k] = b2 * vel[k] + (1 - b2) * grad * grad
            mh = mom[k] / (1 - b1 ** (it + 1))
            vh = vel[k] / (1 - b2 ** (it + 1))
            step = lr * mh / (np.sqrt(vh) + tiny)
            alphas[k] = np.clip(alphas[k] + step, rel.alpha_min, rel.alpha_max)
        last = clock.now() - t_it
    return best, best_alpha


def _derivs012(phi: Activation, d: Array) -> tuple[Array, Array, Array]:
    """(phi, phi', phi'') at d for sigmoid / tanh from one transcendental evaluation (float:
    the optimiser's lines and gradients only; sigma' = s (1 - s), sigma'' = sigma' (1 - 2 s);
    tanh' = 1 - t^2, tanh'' = -2 t tanh')."""
    if phi.name == "sigmoid":
        f = np.asarray(special.expit(d))
        d1 = f * (1.0 - f)
        return f, d1, d1 * (1.0 - 2.0 * f)
    if phi.name == "tanh":
        f = np.tanh(d)
        d1 = 1.0 - f * f
        return f, d1, -2.0 * f * d1
    return np.asarray(phi(d)), _deriv(phi, d), deriv2(phi, d)


SLOPE_DTYPE = np.float16
"""Precision of the intermediate tangent slopes a certificate stores (design.md §4.1.3). Any
slope is sound (its intercept is bounded rigorously), and a sigmoid / tanh slope rounded to 11
bits is the tangent at a point moved by about 2^-11 of its curvature scale: on ffnnSIGMOID
6x200 the margins' bounds moved by under 1e-6 relative against float32 slopes."""


MARGIN_SLOPE_DTYPE = np.float32
"""Precision of the final-margin tangent slopes (``slo`` / ``sup``) a certificate stores: half
of float64's bytes (ERAN's ffnnSIGMOID 6x200, 10 rows x 1200 neurons x 2: 96 instead of 192
kB per input; its alpha-CROWN margins moved by under 1e-9 relative, docs/benchmarks.md).
Sound for the same reason as :data:`SLOPE_DTYPE` (the re-check bounds each stored slope's
intercept itself); the certifying pass rounds first (:func:`round_margin_slopes`), so the
stored slopes are exactly those its bound holds for."""


def _rounded(a: Array, dtype: type[np.floating] = SLOPE_DTYPE) -> Array:
    """Round to ``dtype`` and back (exact in float64; overflow gives inf)."""
    with np.errstate(over="ignore"):
        return np.asarray(a, dtype=dtype).astype(np.float64)


def _snap(s: Array, s_rel: Array, dtype: type[np.floating] = SLOPE_DTYPE) -> Array:
    """Rounded slopes s (q, n) (:func:`_rounded`) with the entries equal to the rounding of
    the relaxation's slope s_rel (1, n) set to s_rel itself (its line is then the
    relaxation's own, intercept included: no intercept to bound, nothing to store)."""
    return np.where(s == _rounded(s_rel, dtype), s_rel, s)


def round_margin_slopes(s: Array, s_rel: Array) -> Array:
    """Final-margin slopes (..., n) as stored (:data:`MARGIN_SLOPE_DTYPE`) and read back: the
    rounding of s, where that equals the rounding of the relaxation's slope s_rel (..., 1 or
    B, n) s_rel itself. The certifying pass and the re-check both apply it, each with its own
    relaxation (a stored slope is read back to the very float64 value that was certified)."""
    return _snap(_rounded(s, MARGIN_SLOPE_DTYPE), s_rel, MARGIN_SLOPE_DTYPE)


def tangent_nodes(st: BallBounds, top: int) -> list[int]:
    """Act nodes below ``top`` whose lines alpha-CROWN optimises by tangent point."""
    return [
        nd.index
        for nd in st.graph.act_nodes()
        if nd.index <= top and nd.index in st.relax and getattr(nd.op, "name", "") in OPTIMISABLE
    ]


def rigorous_lines(st: BallBounds, k: int, s_lo: Array, s_up: Array) -> RowLines:
    """Sound per-row lines of act node k for any float slopes (B, m, n): where a slope equals
    the relaxation's, its (rigorous) intercept is reused; elsewhere the intercept is a rigorous
    bound of min / max of phi(z) - s z on the node's pre-activation interval
    (:func:`sdp.local.relax.line_intercepts`)."""
    node = st.graph.nodes[k]
    phi = node.op
    assert isinstance(phi, Activation)
    p = node.parents[0]
    rel = st.relax[k]
    shape = s_lo.shape
    l = np.broadcast_to(st.lo[p][:, None, :], shape)
    u = np.broadcast_to(st.hi[p][:, None, :], shape)
    out = []
    for s, s_rel, t_rel, which in (
        (s_lo, rel.lower_slope, rel.lower_icpt, 0),
        (s_up, rel.upper_slope, rel.upper_icpt, 1),
    ):
        t = np.array(np.broadcast_to(t_rel[:, None, :], shape))
        new = s != s_rel[:, None, :]
        if new.any():
            t[new] = line_intercepts(phi, l[new], u[new], s[new], s[new])[which]
        out.append(t)
    return RowLines(s_lo, out[0], s_up, out[1])


def optimise_tangents(
    st: BallBounds,
    init: dict[int, Array],
    c0: Array,
    *,
    alphas: dict[int, Array] | None = None,
    base: Array | None = None,
    iterations: int = 20,
    lr: float = 0.2,
    rigorous: bool = True,
    deadline: float | None = None,
) -> tuple[Array, dict[int, tuple[Array, Array]], dict[int, RowLines]]:
    """Optimised tangent lines of sigmoid / tanh nodes (alpha-CROWN for general activations,
    Xu et al., ICLR 2021; lines of Zhang et al., NeurIPS 2018), per objective row.

    The variables are the tangent points d of the lower and upper lines of every neuron with a
    valid tangent range (:func:`sdp.local.relax.tangent_ranges`), started at CROWN's choice and
    moved by projected Adam (steps scaled by the range width) on the float bound with the
    tangent lines phi(d) + phi'(d) (v - d). Gradient (as for ReLU slopes, Danskin): the bound
    is the relaxed network at x*_r, so d bound / d d_i = lam_i phi''(d_i) (v_i(x*_r) - d_i)
    for the line in use (lower where lam_i >= 0). Every float iterate is only a candidate: the
    best one per row (by its float bound) gets rigorous intercepts for its slopes phi'(d)
    (:func:`rigorous_lines`) and one rigorous :func:`backward`; rows whose rigorous bound is
    not above ``base`` (B, m) (e.g. the CROWN bound with the same ``alphas``) keep the
    relaxation's lines. Returns the rigorous bounds (B, m) of the chosen lines, their slopes
    (lower, upper) per node, (B, m, n) each (as a certificate stores them:
    :func:`round_margin_slopes`), and the lines; ``alphas`` (ReLU-like nodes)
    are held fixed. ``rigorous=False`` returns the best FLOAT bounds and their slopes only
    (no lines): a proposal for the caller to bound rigorously (:func:`tangent_rule`).
    ``deadline``: the float search stops as in :func:`optimise_alphas` (CROWN's tangent points
    are always evaluated); the rigorous pass of the best iterate always runs.
    """
    b, m = c0.shape
    top = max(init)
    nodes = tangent_nodes(st, top)
    slopes: dict[int, tuple[Array, Array]] = {}
    if not nodes:
        return backward(st, init, c0, alphas=alphas).lower, slopes, {}
    rng_: dict[int, tuple[Array, Array, Array, Array]] = {}
    okm: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    d_lo: dict[int, Array] = {}
    d_up: dict[int, Array] = {}
    for k in nodes:
        p = st.graph.nodes[k].parents[0]
        phi = st.graph.nodes[k].op
        assert isinstance(phi, Activation)
        l, u = st.lo[p], st.hi[p]
        a_lo, b_lo, a_up, b_up = tangent_ranges(phi, l, u)
        ok_lo, ok_up = np.isfinite(a_lo) & np.isfinite(b_lo), np.isfinite(a_up) & np.isfinite(b_up)
        a_lo, b_lo = np.where(ok_lo, a_lo, 0.0), np.where(ok_lo, b_lo, 0.0)
        a_up, b_up = np.where(ok_up, a_up, 0.0), np.where(ok_up, b_up, 0.0)
        rng_[k] = (a_lo, b_lo, a_up, b_up)
        okm[k] = (ok_lo, ok_up)
        # CROWN's choice: midpoint on the convex / concave side, the far end of a mixed range
        mid = 0.5 * l + 0.5 * u
        s0_lo = np.where(u <= 0, mid, b_lo)
        s0_up = np.where(l >= 0, mid, a_up)
        d_lo[k] = np.repeat(s0_lo[:, None, :], m, axis=1)
        d_up[k] = np.repeat(s0_up[:, None, :], m, axis=1)

    curv: dict[int, tuple[Array, Array]] = {}  # phi''(d) of the current lines (gradients)

    def float_lines(k: int) -> RowLines:
        rel = st.relax[k]
        phi = st.graph.nodes[k].op
        assert isinstance(phi, Activation)
        ok_lo, ok_up = okm[k]
        out, dd = [], []
        for d, ok, s_rel, t_rel in (
            (d_lo[k], ok_lo, rel.lower_slope, rel.lower_icpt),
            (d_up[k], ok_up, rel.upper_slope, rel.upper_icpt),
        ):
            f, sl, f2 = _derivs012(phi, d)
            t = f - sl * d
            out.append(np.where(ok[:, None, :], sl, s_rel[:, None, :]))
            out.append(np.where(ok[:, None, :], t, t_rel[:, None, :]))
            dd.append(f2)
        curv[k] = (dd[0], dd[1])
        return RowLines(out[0], out[1], out[2], out[3])

    best = np.full((b, m), -np.inf)
    best_d = {k: (d_lo[k].copy(), d_up[k].copy()) for k in nodes}
    mom = {k: (np.zeros_like(d_lo[k]), np.zeros_like(d_up[k])) for k in nodes}
    vel = {k: (np.zeros_like(d_lo[k]), np.zeros_like(d_up[k])) for k in nodes}
    b1, b2, tiny = 0.9, 0.999, 1e-12
    last = 0.0
    for it in range(iterations + 1):
        t_it = clock.now()
        lines = {k: float_lines(k) for k in nodes}
        res = backward(st, init, c0, alphas=alphas, record=True, lines=lines)
        better = res.lower > best
        if better.any():
            best = np.where(better, res.lower, best)
            for k in nodes:
                bl, bu = best_d[k]
                best_d[k] = (
                    np.where(better[:, :, None], d_lo[k], bl),
                    np.where(better[:, :, None], d_up[k], bu),
                )
        if it == iterations or not clock.fits(deadline, last or 2.0 * (clock.now() - t_it)):
            break
        assert res.lam_x is not None and res.lam_act is not None
        pre = _relaxed_forward(st, res.lam_x, res.lam_act, alphas or {}, top, lines)
        for k in nodes:
            phi = st.graph.nodes[k].op
            assert isinstance(phi, Activation)
            lam = res.lam_act[k]
            a_lo, b_lo, a_up, b_up = rng_[k]
            ok_lo, ok_up = okm[k]
            new = []
            for j, (d, ok, lo_, hi_, sel) in enumerate(
                (
                    (d_lo[k], ok_lo, a_lo, b_lo, lam >= 0),
                    (d_up[k], ok_up, a_up, b_up, lam < 0),
                )
            ):
                grad = np.where(sel & ok[:, None, :], lam * curv[k][j] * (pre[k] - d), 0.0)
                mk, vk = mom[k][j], vel[k][j]
                mk[...] = b1 * mk + (1 - b1) * grad
                vk[...] = b2 * vk + (1 - b2) * grad * grad
                mh = mk / (1 - b1 ** (it + 1))
                vh = vk / (1 - b2 ** (it + 1))
                width = (hi_ - lo_)[:, None, :]
                step = lr * width * mh / (np.sqrt(vh) + tiny)
                new.append(np.clip(d + step, lo_[:, None, :], hi_[:, None, :]))
            d_lo[k], d_up[k] = new[0], new[1]
        last = clock.now() - t_it
    rig: dict[int, RowLines] = {}
    for k in nodes:
        phi = st.graph.nodes[k].op
        assert isinstance(phi, Activation)
        rel = st.relax[k]
        ok_lo, ok_up = okm[k]
        bl, bu = best_d[k]
        s_lo = np.where(ok_lo[:, None, :], _deriv(phi, bl), rel.lower_slope[:, None, :])
        s_up = np.where(ok_up[:, None, :], _deriv(phi, bu), rel.upper_slope[:, None, :])
        slopes[k] = (np.asarray(s_lo), np.asarray(s_up))
        if rigorous:  # the slopes a certificate stores, exactly
            slopes[k] = (
                round_margin_slopes(s_lo, rel.lower_slope[:, None, :]),
                round_margin_slopes(s_up, rel.upper_slope[:, None, :]),
            )
            rig[k] = rigorous_lines(st, k, *slopes[k])
    if not rigorous:
        return best, slopes, rig
    lower = backward(st, init, c0, alphas=alphas, lines=rig).lower
    if base is None:
        return lower, slopes, rig
    keep = (lower <= base)[:, :, None]
    if not keep.any():
        return lower, slopes, rig
    for k in nodes:  # rows not improved: the relaxation's own lines (its slopes and intercepts)
        rel = st.relax[k]
        ln = rig[k]
        s_lo = np.where(keep, rel.lower_slope[:, None, :], ln.lower_slope)
        s_up = np.where(keep, rel.upper_slope[:, None, :], ln.upper_slope)
        slopes[k] = (s_lo, s_up)
        rig[k] = RowLines(
            s_lo,
            np.where(keep, rel.lower_icpt[:, None, :], ln.lower_icpt),
            s_up,
            np.where(keep, rel.upper_icpt[:, None, :], ln.upper_icpt),
        )
    return backward(st, init, c0, alphas=alphas, lines=rig).lower, slopes, rig


TANGENT_PIECES = 2
"""Uniform grid pieces of the intercepts in :func:`tangent_rule` (the stationary points of
sigmoid / tanh are bracketed anyway; fewer pieces only cost tightness where their float
estimate fails, never soundness)."""


def tangent_rule(
    slopes: dict[int, tuple[Array, Array]],
    uniform: int = TANGENT_PIECES,
    used: dict[int, Array] | None = None,
) -> ActRule:
    """An ``act_rule`` for :func:`sdp.local.propagate.backward` with per-row slopes (lower,
    upper), (B, m, n) each, of the act nodes in ``slopes``: each multiplier uses the slope of
    the line it needs (lower where lam >= 0, upper where lam < 0; the relaxation's where
    lam = 0), and only that line's intercept is bounded rigorously
    (:func:`sdp.local.relax.line_extremes`; the relaxation's own intercept where the slope is
    the relaxation's). Half the work of :func:`rigorous_lines`, which bounds both lines of
    every entry; sound for any finite slopes (the intercept makes any slope a valid line).
    A NaN slope means the relaxation's own line (slope and intercept) of the entry.
    ``used`` (if given) receives the slopes actually used per node, NaN where the entry used
    the relaxation's own line (lam = 0, or a slope equal to the relaxation's): passed back as
    both (lower, upper), they reproduce the same pass exactly (the certificate stores only
    the other entries)."""

    def rule(
        node: Node, rel: Relaxation, lam: Array, alpha: Array | None, st: BallBounds
    ) -> ActStep | None:
        sl = slopes.get(node.index)
        if sl is None:
            return None
        phi = node.op
        assert isinstance(phi, Activation)
        p = node.parents[0]
        pos = lam >= 0
        s_rel = np.where(pos, rel.lower_slope[:, None, :], rel.upper_slope[:, None, :])
        s = np.where(lam == 0, s_rel, np.where(pos, sl[0], sl[1]))
        s = np.where(np.isnan(s), s_rel, s)
        t = np.where(pos, rel.lower_icpt[:, None, :], rel.upper_icpt[:, None, :])
        new = s != s_rel
        if new.any():
            l = np.broadcast_to(st.lo[p][:, None, :], s.shape)[new]
            u = np.broadcast_to(st.hi[p][:, None, :], s.shape)[new]
            t_lo, t_up = line_extremes(phi, l, u, s[new], uniform=uniform)
            t[new] = np.where(pos[new], t_lo, t_up)
        if used is not None:
            used[node.index] = np.where(new, s, np.nan)
        return crown_act_step(rel, lam, None, st.zmax(p), RowLines(s, t, s, t))

    return rule


# Per input b: target node -> (rows, {act node: (2 r, n) alphas}); rows r of the target node
# get +-e_i objectives (first r rows: lower bounds of z_i, last r: of -z_i).
InterAlphas = dict[int, tuple[np.ndarray, dict[int, Array]]]

# Per input b: target node -> (objective rows o (q,), {act node: slopes (q, n), SLOPE_DTYPE});
# o in [0, 2 n_t): o < n_t is +e_o (a lower bound of z_o), o >= n_t is -e_(o - n_t) (an upper
# bound of z_(o - n_t)); each slope is that of the line the row uses (:func:`tangent_rule`),
# NaN where the row uses the relaxation's own line.
InterLines = dict[int, tuple[np.ndarray, dict[int, Array]]]


def signed_objective(st: BallBounds, idx: int, obj: np.ndarray) -> tuple[dict[int, Array], Array]:
    """Objective rows of node idx for signed row codes ``obj`` (see :data:`InterLines`):
    o < n is +e_o, o >= n is -e_(o - n); the rows of :func:`node_objective`, reordered."""
    n = st.graph.nodes[idx].size
    neur = np.unique(obj % n)
    init, c0 = node_objective(st, idx, neur)
    pos = np.searchsorted(neur, obj % n) + np.where(obj >= n, neur.size, 0)
    return {k: v[:, pos] for k, v in init.items()}, c0[:, pos]


@dataclass(eq=False)
class IntermediateAlpha:
    """A ``node_hook`` for :func:`sdp.local.propagate.compute_bounds`: tightens the bounds of
    every node that feeds an activation with optimised rows, input by input.

    - ReLU-like consumers: alpha-CROWN rows (Xu et al., ICLR 2021) for the neurons unstable
      there, ``iterations`` steps; the best alphas are kept in ``found``.
    - Sigmoid / tanh consumers (``tangent_iterations`` > 0): the tangent points of every
      sigmoid / tanh node below are optimised per objective row +-e_i of every neuron of
      nonzero width (:func:`optimise_tangents`; design.md §4.1.3); the rows whose rigorous
      bound beats the current one are kept in ``found_lines`` with their slopes.

    ``given`` / ``given_lines`` (per input) replay stored alphas / slopes (one rigorous
    backward pass each, for verification) instead of optimising. Each row's bound only
    replaces the current one where it is tighter, so the result is never looser than CROWN.

    ``deadline`` (a :func:`sdp.local.clock.now` time; optimising only): each optimisation
    stops there (:func:`optimise_alphas`), and past it the remaining (node, input) pairs keep
    their CROWN bounds and record nothing, which the replay reproduces (no record, no change).
    """

    iterations: int = 10
    given: list[InterAlphas] | None = None
    found: list[InterAlphas] = field(default_factory=list)
    tangent_iterations: int = 0
    given_lines: list[InterLines] | None = None
    found_lines: list[InterLines] = field(default_factory=list)
    deadline: float | None = None

    def __call__(self, st: BallBounds, idx: int) -> None:
        if not self.found:
            self.found = [{} for _ in range(st.batch)]
        if not self.found_lines:
            self.found_lines = [{} for _ in range(st.batch)]
        for b in range(st.batch):
            sub = single(st, b)
            self._alphas(st, sub, idx, b)
            self._tangents(st, sub, idx, b)

    def _alphas(self, st: BallBounds, sub: BallBounds, idx: int, b: int) -> None:
        if self.given is not None:
            if idx not in self.given[b]:
                return
            rows, alph = self.given[b][idx]
            init, c0 = node_objective(sub, idx, rows)
            lower = backward(sub, init, c0, alphas={k: a[None] for k, a in alph.items()}).lower
        else:
            rows = self._rows(st, idx, b)
            if rows.size == 0 or not clock.fits(self.deadline):
                return
            init, c0 = node_objective(sub, idx, rows)
            lower, best = optimise_alphas(
                sub, init, c0, iterations=self.iterations, deadline=self.deadline
            )
            if not best:
                return
            self.found[b][idx] = (rows, {k: a[0] for k, a in best.items()})
        r = rows.size
        st.lo[idx][b, rows] = np.maximum(st.lo[idx][b, rows], lower[0, :r])
        st.hi[idx][b, rows] = np.minimum(st.hi[idx][b, rows], -lower[0, r:])

    def _tangents(self, st: BallBounds, sub: BallBounds, idx: int, b: int) -> None:
        n = st.graph.nodes[idx].size
        if self.given_lines is not None and idx not in self.given_lines[b]:
            return
        if self.given_lines is None:
            if self.tangent_iterations <= 0 or not clock.fits(self.deadline):
                return
            rows = self._tangent_rows(st, idx, b)
            if rows.size == 0:
                return
            init, c0 = node_objective(sub, idx, rows)
            if not tangent_nodes(sub, max(init)):
                return
            cur = np.concatenate([st.lo[idx][b, rows], -st.hi[idx][b, rows]])
            got, slopes, _ = optimise_tangents(
                sub,
                init,
                c0,
                iterations=self.tangent_iterations,
                rigorous=False,
                deadline=self.deadline,
            )
            # float proposals that beat the current (rigorous) bound; only they are bounded
            keep = np.flatnonzero(got[0] > cur + 1e-9 * (1.0 + np.abs(cur)))
            if keep.size == 0:
                return
            r = rows.size
            obj = np.where(keep < r, rows[keep % r], rows[keep % r] + n)
            # slopes rounded to SLOPE_DTYPE (any slope is sound), the relaxation's own where
            # they round to its slope (CROWN's choice kept, or no valid tangent range): the
            # pass below uses exactly these and records the one line each entry uses (NaN:
            # the relaxation's own line, lam = 0 included)
            sl2 = {
                k: (
                    _snap(_rounded(lo[0, keep]), sub.relax[k].lower_slope),
                    _snap(_rounded(up[0, keep]), sub.relax[k].upper_slope),
                )
                for k, (lo, up) in slopes.items()
            }
            init, c0 = signed_objective(sub, idx, obj)
            used: dict[int, Array] = {}
            rule = tangent_rule({k: (a[None], c[None]) for k, (a, c) in sl2.items()}, used=used)
            lower = backward(sub, init, c0, act_rule=rule).lower[0]
            self.found_lines[b][idx] = (
                obj,
                {k: used[k][0].astype(SLOPE_DTYPE) for k in sl2 if k in used},
            )
        else:
            obj, sl = self.given_lines[b][idx]
            # exactly the pass above: the stored slopes are those each entry used
            init, c0 = signed_objective(sub, idx, obj)
            rule = tangent_rule({k: (a[None], a[None]) for k, a in sl.items()})
            lower = backward(sub, init, c0, act_rule=rule).lower[0]
        low = obj < n
        i_lo, i_up = obj[low], obj[~low] - n
        st.lo[idx][b, i_lo] = np.maximum(st.lo[idx][b, i_lo], lower[low])
        st.hi[idx][b, i_up] = np.minimum(st.hi[idx][b, i_up], -lower[~low])

    @staticmethod
    def _rows(st: BallBounds, idx: int, b: int) -> np.ndarray:
        if not _feeds(st, idx, _RELU_LIKE):
            return np.zeros(0, dtype=np.intp)
        lo, hi = st.lo[idx][b], st.hi[idx][b]
        return np.flatnonzero((lo < 0) & (hi > 0))

    @staticmethod
    def _tangent_rows(st: BallBounds, idx: int, b: int) -> np.ndarray:
        if not _feeds(st, idx, OPTIMISABLE):
            return np.zeros(0, dtype=np.intp)
        return np.flatnonzero(st.hi[idx][b] > st.lo[idx][b])


def _feeds(st: BallBounds, idx: int, names: Collection[str]) -> bool:
    """Whether node ``idx`` feeds an activation node named in ``names``."""
    g = st.graph
    return any(
        g.nodes[c].kind == "act" and getattr(g.nodes[c].op, "name", "") in names
        for c in g.consumers[idx]
    )


_RELU_LIKE = ("relu", "leaky_relu")
