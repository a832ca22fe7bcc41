"""Sound linear relaxations of every IR activation on a pre-activation interval [l, u].

For each neuron we return floats (s_lo, t_lo, s_up, t_up) with, in EXACT arithmetic,

    s_lo z + t_lo <= phi(z) <= s_up z + t_up      for every z in [l, u],

and a rigorous interval [p_lo, p_hi] containing phi([l, u]).

ReLU (Zhang et al., "Efficient Neural Network Robustness Certification with General Activation
Functions" (CROWN), NeurIPS 2018; Xu et al., "Fast and Complete" (alpha-CROWN), ICLR 2021):
stably active (l >= 0) phi = z, stably inactive (u <= 0) phi = 0; unstable: the chord
s_up = u / (u - l), t_up = -s_up l (the intercept is recomputed so that the line is >= relu at
both ends in exact arithmetic, relu being convex), and the lower line alpha z, alpha in [0, 1]
(CROWN's adaptive choice alpha = 1 if u >= -l else 0, or an optimised alpha). Leaky ReLU with
slope p <= 1 is the same with alpha in [p, 1] and the chord through (l, p l), (u, u).

Every other activation (tanh, sigmoid, elu, softplus, gelu, silu, leaky_relu with p > 1): the
slopes follow CROWN's choices, computed in float (they need not be exact): S-shaped tanh and
sigmoid take the tangent at the midpoint on the convex (u <= 0) / concave (l >= 0) side and the
chord on the other, and for l < 0 < u the tangent through the far endpoint when it touches
inside [l, u] (else the chord); convex softplus / elu(alpha <= 1) take the midpoint tangent
below and the chord above; gelu, silu, leaky_relu(p > 1), elu(alpha > 1) the chord for both.
For a slope a the intercepts are a rigorous lower bound of min (phi(z) - a z) and upper bound
of max (phi(z) - a z) over [l, u]: [l, u] is cut into 24 pieces and on each, with centre c,
radius r and a rigorous enclosure [d_lo, d_hi] of phi' on the piece (mean-value form),

    |g(z) - g(c)| <= r max(0, a - d_lo, d_hi - a)      for g(z) = phi(z) - a z.

The slack is second order in the piece width where g' ~ 0 (at a tangent point).
phi' enclosures use the monotonicity pieces of each phi' (tanh', sigmoid' peak at 0; softplus' =
sigmoid increasing; elu' = alpha e^z then 1; gelu', silu' extrema at +-sqrt 2 and +-2.3994),
padded by 64 ulps relative and 1e-12 absolute. Library function values phi(v) are trusted to
16 ulps relative to |phi(v)| + Lip |v| (the model of :mod:`sdp.rounding`), doubled here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import numpy as np
from scipy import optimize, special

from sdp.ir import Activation, Array, _smooth_slope_bounds
from sdp.local.fp import ETA, U, down, up

_LIB_ULPS = 32.0  # 2 x the 16 ulps of sdp.rounding.ACTIVATION_ULPS
_DPAD_REL = 64 * U
_DPAD_ABS = 1e-12


@dataclass(frozen=True, eq=False)
class Relaxation:
    """Per-neuron lines of one activation node, arrays of shape (B, n).

    ``alpha_mask`` marks neurons whose lower line may be replaced by s z (intercept 0) for any
    s in [alpha_min, alpha_max]: unstable ReLU / leaky ReLU neurons (what alpha-CROWN optimises).
    """

    lower_slope: Array
    lower_icpt: Array
    upper_slope: Array
    upper_icpt: Array
    post_lo: Array
    post_hi: Array
    alpha_mask: np.ndarray
    alpha_min: float = 0.0
    alpha_max: float = 1.0


def _value_bounds(phi: Activation, z: Array) -> tuple[Array, Array]:
    """Rigorous [lo, hi] of phi(z) at the float points z (library error padded)."""
    v = phi(z)
    if phi.name in ("relu", "identity"):
        return v, v
    lip = max(abs(s) for s in phi.slope_bounds)
    err = _LIB_ULPS * U * (np.abs(v) + lip * np.abs(z)) + 2 * ETA
    return v - err, v + err  # (the +- itself rounds; err has slack far beyond one ulp)


@cache
def _critical(name: str) -> float:
    """Location x* > 0 of the extrema +-x* of phi' for gelu (sqrt 2) and silu (~2.3994)."""
    if name == "gelu":
        return math.sqrt(2.0)

    def second(x: float) -> float:  # silu'' = s(1-s)(2 + x(1 - 2s))
        s = float(special.expit(x))
        return 2.0 + x * (1.0 - 2.0 * s)

    return float(optimize.brentq(second, 1.0, 4.0, xtol=1e-14))


def _deriv(phi: Activation, z: Array) -> Array:
    n, p = phi.name, phi.param
    if n == "tanh":
        return np.asarray(1.0 - np.tanh(z) ** 2)
    if n == "sigmoid":
        s = special.expit(z)
        return np.asarray(s * (1.0 - s))
    if n == "softplus":
        return np.asarray(special.expit(z))
    if n == "elu":
        return np.where(z > 0, 1.0, p * np.exp(np.minimum(z, 0.0)))
    if n == "leaky_relu":
        return np.where(z >= 0, 1.0, p)
    if n == "gelu":
        return np.asarray(special.ndtr(z) + z * np.exp(-0.5 * z * z) / math.sqrt(2 * math.pi))
    if n == "silu":
        s = special.expit(z)
        return np.asarray(s * (1.0 + z * (1.0 - s)))
    raise ValueError(f"no derivative for {n}")


def derivative_range(phi: Activation, l: Array, u: Array) -> tuple[Array, Array]:
    """Rigorous [d_lo, d_hi] containing phi'(z) (every sub/derivative) for z in [l, u]."""
    n = phi.name
    g_lo, g_hi = phi.slope_bounds
    if n == "leaky_relu":
        p = phi.param
        dl, du = _deriv(phi, l), _deriv(phi, u)
        # piecewise constant: p on z < 0, 1 on z > 0, [min, max] at 0
        lo = np.where(l < 0, np.minimum(p, np.where(u > 0, 1.0, p)), 1.0)
        hi = np.where(l < 0, np.maximum(p, np.where(u > 0, 1.0, p)), 1.0)
        lo = np.where(u <= 0, p, np.where(l >= 0, 1.0, np.minimum(lo, dl)))
        hi = np.where(u <= 0, p, np.where(l >= 0, 1.0, np.maximum(hi, du)))
        # at exactly 0 both pieces' slopes are subgradients: hull covers them
        touch0 = (l <= 0) & (u >= 0)
        return np.where(touch0, min(p, 1.0), lo), np.where(touch0, max(p, 1.0), hi)
    dl, du = _deriv(phi, l), _deriv(phi, u)
    lo, hi = np.minimum(dl, du), np.maximum(dl, du)
    if n in ("tanh", "sigmoid"):
        hi = np.where((l <= 0) & (u >= 0), g_hi, hi)  # unimodal, peak at 0
    elif n == "elu":
        # alpha e^z on z <= 0 (increasing), 1 on z > 0: hull of the endpoint values, alpha (at
        # 0-) and 1 (at 0+) when the interval reaches 0.
        p = phi.param
        touch = (l <= 0) & (u >= 0)
        lo = np.where(touch, np.minimum(lo, min(p, 1.0)), lo)
        hi = np.where(touch, np.maximum(hi, max(p, 1.0)), hi)
    elif n in ("gelu", "silu"):
        xc = _critical(n)
        b_lo, b_hi = _smooth_slope_bounds(n)
        tol = 1e-6
        has_min = (l <= -xc + tol) & (u >= -xc - tol)
        has_max = (l <= xc + tol) & (u >= xc - tol)
        lo = np.where(has_min, b_lo, lo)
        hi = np.where(has_max, b_hi, hi)
    pad_lo = _DPAD_REL * np.abs(lo) + _DPAD_ABS
    pad_hi = _DPAD_REL * np.abs(hi) + _DPAD_ABS
    lo = np.maximum(lo - pad_lo, g_lo)
    hi = np.minimum(hi + pad_hi, g_hi)
    return np.asarray(lo), np.asarray(hi)


def _relu_like(l: Array, u: Array, p: float) -> Relaxation:
    """ReLU (p = 0) or leaky ReLU with slope p <= 1 on z < 0 (convex)."""
    active = l >= 0
    inactive = u <= 0
    unstable = ~(active | inactive)
    # chord through (l, p l) and (u, u) on unstable neurons
    width = np.where(unstable, u - l, 1.0)
    s_up = np.where(unstable, (u - p * l) / width, np.where(active, 1.0, p))
    s_up = np.clip(s_up, min(p, 1.0), 1.0)
    # intercept >= phi(z) - s_up z at both ends (phi convex, so the line is then >= phi)
    e_l = p * l - s_up * l
    e_u = u - s_up * u
    t_l = up(e_l, np.abs(p * l) + np.abs(s_up * l))
    t_u = up(e_u, np.abs(u) + np.abs(s_up * u))
    t_up = np.where(unstable, np.maximum(t_l, t_u), 0.0)
    default_alpha = np.where(u >= -l, 1.0, p)
    s_lo = np.where(active, 1.0, np.where(inactive, p, default_alpha))
    zero = np.zeros_like(l)
    # post-activation interval: phi is nondecreasing for p >= 0; for p < 0 use the hull
    pl, pu = np.where(l >= 0, l, p * l), np.where(u >= 0, u, p * u)
    if p >= 0:
        post_lo, post_hi = pl, pu
    else:
        post_lo = np.minimum(0.0, np.minimum(pl, pu))
        post_hi = np.maximum(pl, pu)
    mag = np.abs(post_lo) + np.abs(post_hi)
    return Relaxation(
        s_lo,
        zero,
        s_up,
        t_up,
        down(post_lo, mag),
        up(post_hi, mag),
        unstable,
        min(p, 1.0),
        1.0,
    )


PIECES = 24
"""Uniform sub-intervals of [l, u] on which the intercepts of smooth activations are bounded
(plus tiny pieces around the points where phi' = a, where they are known in closed form)."""
PIECES_STATIONARY = 8
"""Uniform pieces where the stationary points are known (monotone pieces are then exact)."""
_STAT_REL = 1e-7
_CLOSED_FORM = ("sigmoid", "tanh", "softplus", "elu")


def stationary_points(phi: Activation, a: Array) -> tuple[Array, Array]:
    """Float estimates (z1, z2) of the points with phi'(z) = a (NaN where there is none or no
    closed form): sigmoid, tanh (+-z), softplus, elu. Only used to place grid points; the
    bounds never rely on their accuracy."""
    n = phi.name
    nan = np.full(a.shape, np.nan)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        if n == "sigmoid":
            z = 2.0 * np.arctanh(np.sqrt(1.0 - 4.0 * a))
        elif n == "tanh":
            z = np.arctanh(np.sqrt(1.0 - a))
        elif n == "softplus":
            return np.log(a / (1.0 - a)), nan
        elif n == "elu" and phi.param > 0:
            return np.log(a / phi.param), nan
        else:
            return nan, nan
    z = np.where((a > 0) & np.isfinite(z), z, np.nan)
    return z, -z


def _piece_extremes(
    phi: Activation, l: Array, u: Array, a: Array, uniform: int | None = None
) -> tuple[Array, Array]:
    """Rigorous (lower bound of min, upper bound of max) of g(z) = phi(z) - a z on [l, u].

    [l, u] is cut at a monotone float grid (p_0 = l, p_N = u, so the pieces cover [l, u]
    exactly): ``PIECES`` uniform pieces (``PIECES_STATIONARY`` where z* is known, or
    ``uniform`` if given: any number >= 1 is sound, fewer are cheaper) plus points
    +-1e-7 (1 + |z*|) around the float estimates z* of the points where g' = 0
    (:func:`stationary_points`). On a piece [p, q] with w >= q - p, centre c, radius r and
    g' in [al, be] (from a rigorous enclosure of phi' there), each of these bounds min g
    (mean value theorem):

        g(p) + min(al, 0) w,   g(q) - max(be, 0) w,   g(c) - r max(-al, be, 0);

    the best one is taken (the maximum; mirrored for max g). On pieces where g is monotone the
    first two are the exact endpoint values; the only mean-value slack left is on the tiny
    pieces at the stationary points, second order in their width.
    """
    l, u, a = np.broadcast_arrays(l, u, a)
    # the grid of an element depends only on that element (never on the rest of the array),
    # so a neuron's intercept is the same in any batch (certificates re-check bit for bit)
    closed = phi.name in _CLOSED_FORM
    stat = list(stationary_points(phi, a)) if closed else []
    n = PIECES_STATIONARY if closed else PIECES
    if uniform is not None:
        n = max(1, int(uniform))
    f = np.linspace(0.0, 1.0, n + 1).reshape((-1,) + (1,) * l.ndim)
    pts = [l[None] + f * (u - l)[None]]
    for z in stat:
        z = np.where(np.isfinite(z), z, np.nan)
        d = _STAT_REL * (1.0 + np.abs(z))
        for q in (z - d, z + d):
            pts.append(np.where(np.isnan(q), l, np.clip(q, l, u))[None])
    grid = np.sort(np.concatenate(pts), axis=0) if closed else pts[0]
    grid[0], grid[-1] = l, u
    grid = np.minimum(np.maximum.accumulate(grid, axis=0), u[None])
    pl, pu = grid[:-1], grid[1:]
    c = 0.5 * pl + 0.5 * pu
    r = np.maximum(up(pu - c, np.abs(pu) + np.abs(c)), up(c - pl, np.abs(c) + np.abs(pl)))
    r = np.maximum(r, 0.0)
    w = np.maximum(up(pu - pl, np.abs(pu) + np.abs(pl)), 0.0)
    d_lo, d_hi = derivative_range(phi, pl, pu)
    a_ = a[None]
    al = down(d_lo - a_, np.abs(d_lo) + np.abs(a_))  # <= inf g' on the piece
    be = up(d_hi - a_, np.abs(d_hi) + np.abs(a_))  # >= sup g'
    g_lo, g_hi = _value_bounds(phi, grid)
    gv_lo, gv_hi = g_lo[:-1], g_hi[:-1]  # at p
    gw_lo, gw_hi = g_lo[1:], g_hi[1:]  # at q
    v_lo, v_hi = _value_bounds(phi, c)
    ap, aq, ac = a_ * pl, a_ * pu, a_ * c
    neg = np.minimum(al, 0.0) * w  # <= 0
    pos = np.maximum(be, 0.0) * w  # >= 0
    spread = np.maximum(np.maximum(-al, be), 0.0) * r
    spread = up(spread, spread)
    lo1 = down(gv_lo - ap + neg, np.abs(gv_lo) + np.abs(ap) + np.abs(neg))
    lo2 = down(gw_lo - aq - pos, np.abs(gw_lo) + np.abs(aq) + pos)
    lo3 = down(v_lo - ac - spread, np.abs(v_lo) + np.abs(ac) + spread)
    hi1 = up(gv_hi - ap + pos, np.abs(gv_hi) + np.abs(ap) + pos)
    hi2 = up(gw_hi - aq - neg, np.abs(gw_hi) + np.abs(aq) + np.abs(neg))
    hi3 = up(v_hi - ac + spread, np.abs(v_hi) + np.abs(ac) + spread)
    lo = np.maximum(np.maximum(lo1, lo2), lo3).min(axis=0)
    hi = np.minimum(np.minimum(hi1, hi2), hi3).max(axis=0)
    return lo, hi


def _bisect(f: Callable[[Array], Array], lo: Array, hi: Array, iters: int = 30) -> Array:
    """A sign change of f on [lo, hi], vectorised (float; only a heuristic slope)."""
    s_lo = np.sign(f(lo))
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        same = np.sign(f(mid)) == s_lo
        lo = np.where(same, mid, lo)
        hi = np.where(same, hi, mid)
    return 0.5 * (lo + hi)


def _tangent_points(
    phi: Activation, l: Array, u: Array
) -> tuple[Array, Array, np.ndarray, np.ndarray]:
    """Tangent points (d_l, d_u, ok_l, ok_u) of the S-shaped phi (sigmoid, tanh) on [l, u]
    straddling 0, in float (heuristic slopes only; intercepts are bounded rigorously).

    d_l in [l, 0] is where the tangent passes through (u, phi(u)): a zero of
    h_lo(d) = phi(u) - phi(d) - phi'(d) (u - d); d_u in [0, u] mirrored, through (l, phi(l)):
    h_up(d) = phi(d) - phi(l) - phi'(d) (d - l); both found by bisection (Zhang et al., CROWN,
    NeurIPS 2018, Sec. 3.3). ``ok_l`` (``ok_u``) is true where l < 0 < u and h_lo(l) >= 0
    (h_up(u) >= 0): the tangent at l (at u) passes below (above) the far endpoint, so the
    tangent at d_l (d_u) touches inside the interval. d_l, d_u are meaningless where not ok.
    """
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):

        def h_lo(d: Array) -> Array:
            return np.asarray(phi(u) - phi(d) - _deriv(phi, d) * (u - d))

        def h_up(d: Array) -> Array:
            return np.asarray(phi(d) - phi(l) - _deriv(phi, d) * (d - l))

        mixed = (l < 0) & (u > 0)
        lm, um = np.where(mixed, l, -1.0), np.where(mixed, u, 1.0)
        d_l = _bisect(h_lo, lm, np.zeros_like(lm))
        d_u = _bisect(h_up, np.zeros_like(um), um)
        ok_l = mixed & (h_lo(lm) >= 0)
        ok_u = mixed & (h_up(um) >= 0)
    return d_l, d_u, ok_l, ok_u


def _slopes(phi: Activation, l: Array, u: Array) -> tuple[Array, Array]:
    """Heuristic slopes (lower, upper) in float: CROWN's tangent / chord choices.

    Soundness never depends on them: the intercepts are bounded rigorously for any slope.
    """
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        wide = u > l
        chord = np.where(wide, (phi(u) - phi(l)) / np.where(wide, u - l, 1.0), _deriv(phi, l))
        chord = np.nan_to_num(chord)
        mid = 0.5 * l + 0.5 * u
        name = phi.name
        if name in ("sigmoid", "tanh"):  # convex on z <= 0, concave on z >= 0
            tan_mid = _deriv(phi, mid)
            # lower: tangent at mid (convex part), chord (concave part), or in between the
            # tangent at d_l <= 0 through (u, phi(u)) when it touches inside [l, 0]
            d_l, d_u, ok_l, ok_u = _tangent_points(phi, l, u)
            lo_mixed = np.where(ok_l, _deriv(phi, d_l), chord)
            up_mixed = np.where(ok_u, _deriv(phi, d_u), chord)
            s_lo = np.where(u <= 0, tan_mid, np.where(l >= 0, chord, lo_mixed))
            s_up = np.where(u <= 0, chord, np.where(l >= 0, tan_mid, up_mixed))
        elif name == "softplus" or (name == "elu" and phi.param <= 1.0):  # convex
            s_lo, s_up = _deriv(phi, mid), chord
        else:
            s_lo, s_up = chord, chord
    g_lo, g_hi = phi.slope_bounds
    s_lo = np.clip(np.nan_to_num(s_lo), g_lo, g_hi)
    s_up = np.clip(np.nan_to_num(s_up), g_lo, g_hi)
    return np.asarray(s_lo), np.asarray(s_up)


OPTIMISABLE = ("sigmoid", "tanh")
"""Activations whose bounding lines alpha-CROWN optimises by their tangent points."""


def deriv2(phi: Activation, z: Array) -> Array:
    """phi''(z) in float for sigmoid and tanh (a gradient only)."""
    if phi.name == "sigmoid":
        s = special.expit(z)
        return np.asarray(s * (1.0 - s) * (1.0 - 2.0 * s))
    t = np.tanh(z)
    return np.asarray(-2.0 * t * (1.0 - t * t))


def tangent_ranges(phi: Activation, l: Array, u: Array) -> tuple[Array, Array, Array, Array]:
    """Ranges [a_lo, b_lo] and [a_up, b_up] of tangent points d whose tangent lines bound the
    S-shaped phi (sigmoid, tanh: convex on z <= 0, concave on z >= 0) from below / above on
    [l, u] (Zhang et al., CROWN, NeurIPS 2018, Sec. 3.3; optimised as in Xu et al., ICLR 2021):

    - lower: u <= 0: any d in [l, u] (convex); l < 0 < u: d in [l, d_l], d_l <= 0 the tangent
      point of the line through (u, phi(u)), when the tangent at l passes below it; else none;
    - upper: mirrored (l >= 0: [l, u]; l < 0 < u: [d_u, u]).

    NaN where no tangent is valid (those lines stay fixed). Float estimates only: the
    intercepts of whatever slope phi'(d) is used are bounded rigorously (:func:`line_intercepts`).
    """
    d_l, d_u, ok_l, ok_u = _tangent_points(phi, l, u)
    nan = np.full(l.shape, np.nan)
    a_lo = np.where(u <= 0, l, np.where(ok_l, l, nan))
    b_lo = np.where(u <= 0, u, np.where(ok_l, np.minimum(d_l, 0.0), nan))
    a_up = np.where(l >= 0, l, np.where(ok_u, np.maximum(d_u, 0.0), nan))
    b_up = np.where(l >= 0, u, np.where(ok_u, u, nan))
    wide = u > l
    return (
        np.where(wide, a_lo, nan),
        np.where(wide, b_lo, nan),
        np.where(wide, a_up, nan),
        np.where(wide, b_up, nan),
    )


def line_intercepts(
    phi: Activation, l: Array, u: Array, s_lo: Array, s_up: Array
) -> tuple[Array, Array]:
    """Rigorous intercepts for ANY float slopes (arrays broadcast together): t_lo <= min and
    t_up >= max of phi(z) - s z over [l, u] (:func:`_piece_extremes`), so that
    s_lo z + t_lo <= phi(z) <= s_up z + t_up on [l, u] in exact arithmetic."""
    t_lo, _ = _piece_extremes(phi, l, u, s_lo)
    _, t_up = _piece_extremes(phi, l, u, s_up)
    return t_lo, t_up


def line_extremes(
    phi: Activation, l: Array, u: Array, s: Array, *, uniform: int | None = None
) -> tuple[Array, Array]:
    """Rigorous (t_lo, t_up) with t_lo <= min and t_up >= max of phi(z) - s z over [l, u]
    for one float slope per element (:func:`_piece_extremes`): s z + t_lo is a sound lower
    line and s z + t_up a sound upper line. ``uniform``: uniform pieces of the grid (default:
    ``PIECES_STATIONARY`` / ``PIECES``); sound for any count, tight where the stationary
    points are known in closed form (sigmoid, tanh, softplus, elu), as the grid then
    brackets them whatever the uniform pieces."""
    return _piece_extremes(phi, l, u, s, uniform)


def _generic(phi: Activation, l: Array, u: Array) -> Relaxation:
    """Lines with CROWN's slopes and intercepts bounded rigorously (:func:`_piece_extremes`)."""
    s_lo, s_up = _slopes(phi, l, u)
    t_lo, _ = _piece_extremes(phi, l, u, s_lo)
    _, t_up = _piece_extremes(phi, l, u, s_up)
    if phi.slope_bounds[0] >= 0:  # nondecreasing phi
        post_lo, _ = _value_bounds(phi, l)
        _, post_hi = _value_bounds(phi, u)
    else:
        post_lo, post_hi = _piece_extremes(phi, l, u, np.zeros_like(l))
    mask = np.zeros(l.shape, dtype=bool)
    return Relaxation(s_lo, t_lo, s_up, t_up, post_lo, post_hi, mask, 0.0, 0.0)


def relax(phi: Activation, l: Array, u: Array) -> Relaxation:
    """Sound lines of ``phi`` on [l, u] (arrays of the same shape, l <= u, finite)."""
    if phi.name == "relu":
        return _relu_like(l, u, 0.0)
    if phi.name == "leaky_relu" and phi.param <= 1.0:
        return _relu_like(l, u, float(phi.param))
    if phi.name == "identity":
        one = np.ones_like(l)
        zero = np.zeros_like(l)
        return Relaxation(one, zero, one, zero, l, u, np.zeros(l.shape, dtype=bool), 1.0, 1.0)
    return _generic(phi, l, u)
