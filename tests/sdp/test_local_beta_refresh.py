"""beta-crown's intermediate bounds recomputed on each sub-domain (sdp.local.beta_crown
``leaf_intervals``): against exact ranges and minima over B ∩ D, found by enumerating the
activation patterns along a one-dimensional ball (a segment: the network is affine between
consecutive zero crossings of its pre-activations, so extremes sit at piece endpoints)."""

from __future__ import annotations

import numpy as np
import pytest

from sdp.local import beta_crown as BC
from sdp.local import certify_local, verify_local
from sdp.local.graph import Graph, build_graph
from sdp.local.propagate import compute_bounds
from tests.sdp._local_nets import dense_net


def _forward(graph: Graph, x: np.ndarray) -> list[np.ndarray]:
    """Every node's value at the points x (P, n0), float64."""
    vals = [x]
    for nd in graph.nodes[1:]:
        v = vals[nd.parents[0]]
        if nd.kind == "affine":
            vals.append(nd.linear(v) + nd.full_bias)
        else:
            p = float(nd.op.param) if nd.op.name == "leaky_relu" else 0.0
            vals.append(np.where(v >= 0, v, p * v))
    return vals


def _pieces(graph: Graph, ch: BC.Chain, a: float, b: float) -> np.ndarray:
    """Sorted points of [a, b] between which every pre-activation is affine: the endpoints
    and every zero crossing, layer by layer (a crossing of layer k is found on a piece where
    layers < k are already affine, so linear interpolation is exact up to rounding)."""
    t = np.array([a, b])
    for p in ch.pre:
        z = _forward(graph, t[:, None])[p]  # (P, n)
        za, zb = z[:-1], z[1:]
        cross = (za * zb) < 0
        i, j = np.nonzero(cross)
        r = t[i] + (t[i + 1] - t[i]) * za[i, j] / (za[i, j] - zb[i, j])
        t = np.unique(np.concatenate([t, r]))
    return t


def _leaf_case(name: str, seed: int):
    rng = np.random.default_rng(seed)
    net = dense_net(rng, [1, 8, 8, 8, 3], name, scale=1.8)
    graph = build_graph(net)
    ch = BC.chain_of(graph)
    x0 = rng.normal(size=(1, 1))
    eps = 1.5
    root = compute_bounds(graph, x0, np.array([eps]))
    t = _pieces(graph, ch, float(x0[0, 0]) - eps, float(x0[0, 0]) + eps)
    mid = 0.5 * (t[:-1] + t[1:])
    vals_t = _forward(graph, t[:, None])
    vals_m = _forward(graph, mid[:, None])
    return rng, graph, ch, root, t, vals_t, vals_m


def _random_leaves(rng, ch, root, n_leaf):
    """Sign rows with 1-3 splits on root-unstable neurons of the first two hidden layers."""
    sgn = [np.zeros((n_leaf, root.lo[p].shape[1]), dtype=np.int8) for p in ch.pre]
    for i in range(n_leaf):
        for _ in range(int(rng.integers(1, 4))):
            k = int(rng.integers(0, 2))
            p = ch.pre[k]
            unst = np.flatnonzero((root.lo[p][0] < 0) & (root.hi[p][0] > 0))
            if unst.size:
                sgn[k][i, rng.choice(unst)] = rng.choice([-1, 1])
    return sgn


def _in_leaf(ch, vals_m, sgn, i):
    """Pieces (by midpoint) inside leaf i (signs are constant on a piece)."""
    ok = np.ones(vals_m[0].shape[0], dtype=bool)
    for k, p in enumerate(ch.pre):
        s = sgn[k][i]
        ok &= np.all((s == 0) | (s * vals_m[p] >= 0), axis=1)
    return ok


@pytest.mark.parametrize("name", ["relu", "leaky_relu"])
def test_leaf_intervals_contain_the_exact_ranges_and_tighten(name):
    rng, _graph, ch, root, t, vals_t, vals_m = _leaf_case(name, 3 if name == "relu" else 4)
    sgn = _random_leaves(rng, ch, root, 40)
    st, empty = BC.leaf_intervals(ch, root, sgn)
    tighter = seen = 0
    for i in range(40):
        inside = _in_leaf(ch, vals_m, sgn, i)
        if empty[i]:
            assert not inside.any()  # only a leaf without a point of the ball is empty
            continue
        ends = np.zeros(t.size, dtype=bool)  # the endpoints of the pieces inside the leaf
        ends[:-1] |= inside
        ends[1:] |= inside
        if not ends.any():
            continue
        seen += 1
        for k, p in enumerate(ch.pre):
            z = vals_t[p][ends]
            lo, hi = st.lo[p][i], st.hi[p][i]
            tol = 1e-9 * (1 + np.abs(z).max())
            assert np.all(lo <= z.min(axis=0) + tol) and np.all(hi >= z.max(axis=0) - tol)
            if k >= 1:  # a later layer: tighter than the root's interval somewhere?
                clip_lo = np.where(sgn[k][i] > 0, np.maximum(root.lo[p][0], 0), root.lo[p][0])
                clip_hi = np.where(sgn[k][i] < 0, np.minimum(root.hi[p][0], 0), root.hi[p][0])
                tighter += int(np.sum((lo > clip_lo + 1e-9) | (hi < clip_hi - 1e-9)))
    assert seen >= 10 and tighter > 0, "too few leaves with points or nothing tighter"


@pytest.mark.parametrize("name", ["relu", "leaky_relu"])
def test_leaf_bounds_below_the_exact_minimum_on_the_leaf(name):
    rng, graph, ch, root, t, vals_t, vals_m = _leaf_case(name, 13 if name == "relu" else 14)
    n_leaf = 24
    sgn = _random_leaves(rng, ch, root, n_leaf)
    f_t = vals_t[graph.output]
    y = int(np.argmax(_forward(graph, root.x0)[graph.output][0]))
    for j in range(3):
        if j == y:
            continue
        c = np.zeros(3)
        c[y], c[j] = 1.0, -1.0
        alpha = [rng.uniform(0, 1, size=s.shape) for s in sgn]
        beta = [rng.uniform(0, 2, size=s.shape) * (s != 0) for s in sgn]
        got = BC.leaf_bounds(ch, root, c, sgn, alpha, beta)
        assert np.isinf(got).sum() < n_leaf // 2
        for i in range(n_leaf):
            inside = _in_leaf(ch, vals_m, sgn, i)
            if not inside.any():
                continue
            assert np.isfinite(got[i])  # a leaf with points is never dropped as empty
            ends = np.zeros(t.size, dtype=bool)
            ends[:-1] |= inside
            ends[1:] |= inside
            exact = float(np.min(f_t[ends] @ c))
            assert got[i] <= exact + 1e-9 * (1 + abs(exact))


def test_deeper_net_certificates_verify_and_beat_alpha_crown():
    """A 3-hidden-layer net: beta-crown (intermediate bounds recomputed per leaf) certifies
    at least what alpha-crown does, branched certificates re-verify, and a leaf flipped to the
    other side of its split (no longer a cover) is refused."""
    rng = np.random.default_rng(5)
    net = dense_net(rng, [5, 12, 12, 12, 3], "relu", scale=1.6)
    x = rng.normal(size=(6, 5))
    branched = 0
    for e in (0.8,):
        a = certify_local(net, x, epsilon=e, method="alpha-crown")
        b = certify_local(net, x, epsilon=e, method="beta-crown")
        assert np.all(b.certified >= a.certified) and b.certified.sum() > a.certified.sum()
        for i in np.flatnonzero(b.certified):
            cert = b.certificates[i]
            assert verify_local(net, x[i], cert)
            if any(k.startswith("bc:") for k, _ in cert.payload):
                branched += 1
                flipped = tuple((k, np.abs(v) if ":sgn:" in k else v) for k, v in cert.payload)
                bad = type(cert)(**{**cert.__dict__, "payload": flipped})
                assert not verify_local(net, x[i], bad)
    assert branched, "nothing branched: the test would be vacuous"


def test_certificates_that_relied_on_per_leaf_bounds_still_verify(monkeypatch):
    """Certificates made while every net recomputed intermediate bounds per leaf (before
    REFRESH_MIN_LAYERS = 3) are still accepted: the verifier falls back to the recomputation
    on a shallow net whose leaves do not check without it (both bounds are rigorous)."""
    rng = np.random.default_rng(501)
    sizes = [2, int(rng.integers(8, 16)), int(rng.integers(8, 16)), 3]
    net = dense_net(rng, sizes, "relu", scale=float(10 ** rng.uniform(0.2, 0.8)))
    x = rng.normal(size=(2, 2))
    with monkeypatch.context() as m:
        m.setattr(BC, "REFRESH_MIN_LAYERS", 2)  # the older search and leaf check
        res = certify_local(net, x, method="beta-crown", time_budget_s=1.5)
    cert = res.certificates[0]
    assert cert.method == "beta-crown" and any(k.startswith("bc:") for k, _ in cert.payload)
    orig = BC.leaf_bounds
    with monkeypatch.context() as m:  # without the fallback this certificate is refused
        m.setattr(BC, "leaf_bounds", lambda *a: orig(*a[:7]))  # recompute dropped
        assert not verify_local(net, x[0], cert)
    assert verify_local(net, x[0], cert)
