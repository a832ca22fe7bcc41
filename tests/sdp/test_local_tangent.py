"""Optimised tangent lines of sigmoid / tanh (alpha-CROWN for general activations, issue 12)
and the tight rigorous intercepts: 60-digit checks, points of the ball, PGD, replay."""

from __future__ import annotations

import itertools

import mpmath
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sdp.ir import Activation
from sdp.local import certify_local, verify_local
from sdp.local.alpha import (
    MARGIN_SLOPE_DTYPE,
    optimise_tangents,
    round_margin_slopes,
    tangent_nodes,
)
from sdp.local.graph import build_graph
from sdp.local.margins import alpha_crown, get_method, objective_rows
from sdp.local.propagate import backward, compute_bounds
from sdp.local.relax import line_intercepts, tangent_ranges
from tests.sdp._local_nets import dense_net, mp_phi
from tests.sdp.test_local_attack import check_no_attack
from tests.sdp.test_local_bounds import mp_forward

mpmath.mp.dps = 60

SMOOTH = [
    Activation("sigmoid"),
    Activation("tanh"),
    Activation("softplus"),
    Activation("elu", 1.0),
    Activation("gelu"),
    Activation("silu"),
]


def _mp_extremes(phi: Activation, l: float, u: float, s: float) -> tuple:
    """Exact min and max of phi(z) - s z on [l, u]: endpoints and the roots of phi' = s."""
    g = lambda z: mp_phi(phi, z) - mpmath.mpf(s) * z  # noqa: E731
    cand = [mpmath.mpf(l), mpmath.mpf(u)]
    dg = lambda z: mpmath.diff(g, z)  # noqa: E731
    grid = np.linspace(l, u, 41)
    for a, b in itertools.pairwise(grid):
        fa, fb = dg(mpmath.mpf(a)), dg(mpmath.mpf(b))
        if fa == 0:
            cand.append(mpmath.mpf(a))
        elif fa * fb < 0:
            lo, hi = mpmath.mpf(a), mpmath.mpf(b)
            for _ in range(120):  # bisection to ~1e-36 of the piece (60-digit arithmetic)
                mid = (lo + hi) / 2
                if dg(mid) * fa > 0:
                    lo = mid
                else:
                    hi = mid
            cand.extend([lo, hi])
    vals = [g(z) for z in cand]
    return min(vals), max(vals)


@settings(max_examples=30, deadline=None)
@given(
    st.sampled_from(SMOOTH),
    st.floats(-30, 30),
    st.floats(0.0, 40),
    st.floats(-0.2, 1.2),
)
def test_intercepts_are_sound_and_tight_for_any_slope(phi, l, w, s):
    """For any slope the intercepts bound phi(z) - s z on [l, u] in 60-digit arithmetic, and
    (closed-form stationary points) within 1e-9 of the exact extremes."""
    u = l + w
    la, ua, sa = np.array([l]), np.array([u]), np.array([s])
    t_lo, t_up = line_intercepts(phi, la, ua, sa, sa)
    mn, mx = _mp_extremes(phi, l, u, s)
    assert t_lo[0] <= mn and t_up[0] >= mx
    if phi.name in ("sigmoid", "tanh", "softplus", "elu"):
        assert float(mn) - t_lo[0] <= 1e-9 * (1 + abs(float(mn)))
        assert t_up[0] - float(mx) <= 1e-9 * (1 + abs(float(mx)))


@pytest.mark.parametrize("name", ["sigmoid", "tanh"])
def test_tangent_ranges_give_valid_tangents(name):
    """Every tangent point in the returned ranges gives a line below (above) phi on [l, u]
    (up to the float accuracy of the bisected range ends: the ranges are heuristics, soundness
    comes from the rigorous intercepts)."""
    phi = Activation(name)
    rng = np.random.default_rng(1)
    l = rng.uniform(-8, 3, size=200)
    u = l + rng.uniform(0.01, 10, size=200)
    a_lo, b_lo, a_up, b_up = tangent_ranges(phi, l, u)
    for i in range(200):
        for a, b, sign in ((a_lo[i], b_lo[i], 1), (a_up[i], b_up[i], -1)):
            if np.isnan(a):
                continue
            for d in np.linspace(a, b, 5):
                dm = mpmath.mpf(d)
                f0 = mp_phi(phi, dm)
                df = mpmath.diff(lambda z: mp_phi(phi, z), dm)
                for z in np.linspace(l[i], u[i], 25):
                    gap = mp_phi(phi, mpmath.mpf(z)) - (f0 + df * (mpmath.mpf(z) - dm))
                    assert sign * gap >= -1e-6


@pytest.mark.parametrize("name", ["sigmoid", "tanh"])
def test_optimised_tangents_improve_and_hold_exactly(name):
    rng = np.random.default_rng(5)
    net = dense_net(rng, [10, 8, 8, 8, 3], name, scale=2.5)
    graph = build_graph(net)
    x0 = rng.normal(size=(4, 10))
    eps = np.full(4, 0.6)
    pred = np.argmax(net.forward(x0), axis=1)
    crown = get_method("crown").compute(graph, x0, eps, pred).lower
    alpha = alpha_crown(graph, x0, eps, pred).lower
    off = np.isfinite(crown)
    assert np.all(alpha[off] >= crown[off])
    assert np.any(alpha[off] > crown[off] + 1e-6), "the optimisation never helped: vacuous"
    for b in range(4):
        for _ in range(4):
            d = rng.normal(size=10)
            x = x0[b] + d / np.linalg.norm(d) * eps[b] * (1 - 1e-12)
            f = mp_forward(net, x)
            for j in range(3):
                if j != pred[b]:
                    assert f[pred[b]] - f[j] >= alpha[b, j]


def test_any_slopes_give_sound_bounds():
    """The slopes are candidates only: random (even absurd) slopes with their rigorous
    intercepts still bound the margins from below at points of the ball."""
    rng = np.random.default_rng(9)
    net = dense_net(rng, [6, 7, 7, 3], "sigmoid", scale=2.0)
    graph = build_graph(net)
    x0 = rng.normal(size=(2, 6))
    eps = np.full(2, 0.8)
    stb = compute_bounds(graph, x0, eps)
    pred = np.argmax(net.forward(x0), axis=1)
    c = objective_rows(pred, 3)
    c0 = np.zeros(c.shape[:2])
    lower, slopes, _ = optimise_tangents(stb, {graph.output: c}, c0, iterations=3)
    from sdp.local.alpha import rigorous_lines

    bad = {
        k: (rng.uniform(-1, 2, size=s.shape), rng.uniform(-1, 2, size=u.shape))
        for k, (s, u) in slopes.items()
    }
    rig = {k: rigorous_lines(stb, k, *v) for k, v in bad.items()}
    got = backward(stb, {graph.output: c}, c0, lines=rig).lower
    d = rng.normal(size=(2, 300, 6))
    d *= eps[0] / np.linalg.norm(d, axis=-1, keepdims=True)
    for b in range(2):
        f = net.forward(x0[b] + d[b])
        m = f[:, pred[b]][:, None] - f
        for j in range(3):
            if j != pred[b]:
                assert np.all(m[:, j] >= min(got[b, j], lower[b, j]) - 1e-9)


def test_margin_slopes_round_to_storage_and_keep_the_relaxations_own():
    """round_margin_slopes: float32 values, except where that equals the rounding of the
    relaxation's slope, which stands for the relaxation's own (float64) slope."""
    s_rel = np.array([[0.1, 0.2]])
    got = round_margin_slopes(np.array([[[0.1, 0.2000001], [0.1 + 1e-12, 0.3]]]), s_rel)
    assert got[0, 0, 0] == got[0, 1, 0] == 0.1  # 0.1 is not a float32: snapped, not rounded
    assert got[0, 0, 1] == float(np.float32(0.2000001)) != 0.2000001
    assert got[0, 1, 1] == float(np.float32(0.3)) and got.dtype == np.float64


@pytest.mark.parametrize("value", [1e39, -3.5e38, np.nan, np.inf])
def test_recheck_refuses_slopes_float32_cannot_hold(value: float) -> None:
    """A finite float64 slope past float32's range rounds to inf when read back: refused as a
    malformed payload (before, it passed the finiteness check and its inf slope only made NaN
    margins inside the re-check, refused by NaN comparing false). A float32 slope replays."""
    rng = np.random.default_rng(3)
    net = dense_net(rng, [3, 5, 3], "sigmoid")
    graph = build_graph(net)
    x = rng.normal(size=3)
    y = int(np.argmax(net.forward(x[None])[0]))
    nodes = tangent_nodes(compute_bounds(graph, x[None], np.array([0.1])), graph.output)
    assert nodes
    shapes = {k: (graph.output_size, graph.nodes[k].size) for k in nodes}
    recheck = get_method("alpha-crown").recheck

    def payload(v: float) -> tuple[tuple[str, np.ndarray], ...]:
        return tuple((f"{t}:{k}", np.full(shapes[k], v)) for k in nodes for t in ("slo", "sup"))

    assert np.isfinite(np.delete(recheck(graph, x, 0.1, y, payload(0.2)), y)).all()
    with pytest.raises(ValueError, match="bad tangent payload entry"):
        recheck(graph, x, 0.1, y, payload(value))


@pytest.mark.parametrize("name", ["sigmoid", "tanh"])
def test_pgd_inside_alpha_radius_and_certificates_replay(name):
    rng = np.random.default_rng(21)
    net = dense_net(rng, [12, 16, 16, 16, 4], name, scale=2.0)
    x = rng.normal(size=(5, 12))
    res = check_no_attack(net, x, method="alpha-crown")
    tangent = [c for c in res.certificates if any(k.startswith("slo:") for k, _ in c.payload)]
    assert tangent, "no certificate used optimised tangents: vacuous"
    stored = {a.dtype for c in tangent for k, a in c.payload if k.startswith(("slo:", "sup:"))}
    assert stored == {np.dtype(MARGIN_SLOPE_DTYPE)}  # and they replay below, rounded as sent
    for i, cert in enumerate(res.certificates):
        if cert.method == "alpha-crown":
            assert verify_local(net, x[i], cert)
    # a tampered slope cannot certify more than the data allow: re-check recomputes intercepts
    cert = tangent[0]
    i = res.certificates.index(cert)
    payload = tuple((k, a + 0.3 if k.startswith("slo:") else a) for k, a in cert.payload)
    from dataclasses import replace

    forged = replace(cert, payload=payload)
    if verify_local(net, x[i], forged):  # still sound: check the ball at that radius
        d = rng.normal(size=(2000, 12))
        d *= cert.epsilon / np.linalg.norm(d, axis=1, keepdims=True)
        f = net.forward(x[i] + d)
        assert np.all(np.argmax(f, axis=1) == cert.prediction)


def test_batch_size_does_not_change_tangent_certificates():
    rng = np.random.default_rng(2)
    net = dense_net(rng, [9, 10, 10, 3], "tanh", scale=2.0)
    x = rng.normal(size=(4, 9))
    eps = 0.3
    a = certify_local(net, x, epsilon=eps, method="alpha-crown", batch_size=4)
    for i in range(4):
        one = certify_local(net, x[i : i + 1], epsilon=eps, method="alpha-crown", batch_size=1)
        assert a.certified is not None and one.certified is not None
        if a.certified[i]:
            assert verify_local(net, x[i], a.certificates[i])
