"""Batched CROWN (issue 12): the per-input intermediate passes, the Gram concretisation of the
first dense layer and the column skipping are exact-arithmetic sound and batch independent."""

from __future__ import annotations

import mpmath
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sdp.local import certify_local
from sdp.local.graph import build_graph
from sdp.local.margins import get_method, objective_rows
from sdp.local.propagate import backward, compute_bounds, crown_node_bounds
from tests.sdp._local_nets import ACT_NAMES, dense_net
from tests.sdp.test_local_bounds import mp_backward, mp_forward

mpmath.mp.dps = 60


@pytest.mark.parametrize("name", ACT_NAMES)
def test_gram_path_equals_exact_recomputation(name):
    """A first dense layer with fewer outputs than inputs is concretised through W W^T: the
    bound is below the 60-digit value of the same propagation and within rounding of it,
    and agrees with the direct path (which forms W^T lam)."""
    rng = np.random.default_rng(len(name))
    net = dense_net(rng, [9, 4, 6, 3], name, scale=1.5)
    graph = build_graph(net)
    x0 = rng.normal(size=(1, 9)) * 0.5
    eps = np.array([0.4])
    stb = compute_bounds(graph, x0, eps)
    pred = np.array([int(np.argmax(net.forward(x0)[0]))])
    c = objective_rows(pred, net.output_size)
    gram = backward(stb, {graph.output: c}, np.zeros(c.shape[:2])).lower[0]
    direct = backward(stb, {graph.output: c}, np.zeros(c.shape[:2]), record=True).lower[0]
    exact = mp_backward(stb, graph.output, c[0], np.zeros(c.shape[1]))
    for j in range(net.output_size):
        if j == pred[0]:
            continue
        assert gram[j] <= exact[j] and direct[j] <= exact[j]
        assert float(exact[j]) - gram[j] <= 1e-9 * (1 + abs(float(exact[j])))
    # intermediate rows of the second affine layer (objective +-W_i, through the Gram path)
    nd = graph.nodes[3]
    lo, hi = crown_node_bounds(stb, 3, np.arange(nd.size))
    w = nd.op.weight
    ex = mp_backward(
        stb, nd.parents[0], np.concatenate([w, -w]), np.concatenate([nd.full_bias, -nd.full_bias])
    )
    for i in range(nd.size):
        assert lo[0, i] <= ex[i] and hi[0, i] >= -ex[nd.size + i]
        assert float(ex[i]) - lo[0, i] <= 1e-9 * (1 + abs(float(ex[i])))


@pytest.mark.parametrize("name", ["relu", "sigmoid", "tanh"])
def test_exact_margins_at_points_of_the_ball_wide_input(name):
    rng = np.random.default_rng(7)
    net = dense_net(rng, [10, 5, 5, 3], name, scale=2.0)
    graph = build_graph(net)
    x0 = rng.normal(size=(1, 10))
    eps = np.array([0.5])
    pred = np.array([int(np.argmax(net.forward(x0)[0]))])
    for method in ("crown", "alpha-crown"):
        lower = get_method(method).compute(graph, x0, eps, pred).lower[0]
        for _ in range(5):
            d = rng.normal(size=10)
            x = x0[0] + d / np.linalg.norm(d) * eps[0] * (1 - 1e-12)
            f = mp_forward(net, x)
            for j in range(3):
                if j != pred[0]:
                    assert f[pred[0]] - f[j] >= lower[j], (method, j)


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    fin = np.isfinite(a) & np.isfinite(b)
    same_inf = np.array_equal(np.isinf(a), np.isinf(b))
    return same_inf and bool(np.all(np.abs(a[fin] - b[fin]) <= 1e-9 * (1 + np.abs(a[fin]))))


@settings(max_examples=20, deadline=None)
@given(
    st.integers(0, 10_000),
    st.sampled_from(["relu", "leaky_relu", "sigmoid", "tanh", "gelu"]),
    st.integers(1, 3),
    st.floats(0.05, 1.5),
    st.sampled_from([1, 2, 5]),
)
def test_batch_size_does_not_change_bounds_and_bounds_hold(seed, name, depth, eps, bs):
    """An input's CROWN bounds do not depend on the batch it is propagated in beyond float
    rounding (which the rigorous error terms cover), and hold at points of every ball."""
    rng = np.random.default_rng(seed)
    net = dense_net(rng, [12] + [6] * depth + [3], name, scale=1.5)
    x = rng.normal(size=(6, 12))
    ref = certify_local(net, x, epsilon=eps, method="crown", batch_size=6)
    got = certify_local(net, x, epsilon=eps, method="crown", batch_size=bs)
    assert ref.certified is not None and got.certified is not None
    graph = build_graph(net)
    pred = ref.prediction
    lo_ref = get_method("crown").compute(graph, x, np.full(6, eps), pred).lower
    for i in range(6):
        alone = get_method("crown").compute(graph, x[i : i + 1], np.array([eps]), pred[i : i + 1])
        assert _close(alone.lower[0], lo_ref[i])
        if abs(np.min(lo_ref[i])) > 1e-6:
            assert got.certified[i] == ref.certified[i]
    d = rng.normal(size=(6, 100, 12))
    d *= eps / np.linalg.norm(d, axis=-1, keepdims=True)
    d[:, 50:] *= rng.uniform(size=(6, 50, 1)) ** (1 / 12)
    for b in range(6):
        f = net.forward(x[b] + d[b])
        m = np.delete(f[:, pred[b]][:, None] - f, pred[b], axis=1)
        lo = np.delete(lo_ref[b], pred[b])[None, :]
        assert np.all(m >= lo - 1e-9 * (1 + np.abs(m)))
