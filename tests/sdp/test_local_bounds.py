"""sdp.local bounds: exact (60-digit) recomputation, points of the ball, monotonicity, bad input."""

from __future__ import annotations

import mpmath
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sdp.errors import UnsupportedMethod
from sdp.ir import Conv2d, Network
from sdp.local import certify_local, verify_local
from sdp.local.graph import build_graph
from sdp.local.margins import alpha_crown, get_method, objective_rows
from sdp.local.propagate import compute_bounds, crown_node_bounds
from tests.sdp._local_nets import ACT_NAMES, conv_net, dense_net, mp_phi, residual_net

mpmath.mp.dps = 60

# ---------------------------------------------------------------- exact reference evaluation


def mp_forward(net: Network, x: np.ndarray) -> list:
    """Exact (60-digit) logits of the network at a float64 point."""
    graph = build_graph(net)
    vals: list = []
    for nd in graph.nodes:
        if nd.kind == "input":
            vals.append([mpmath.mpf(float(v)) for v in x])
        elif nd.kind == "affine":
            m = nd.op.matrix() if isinstance(nd.op, Conv2d) else nd.op.weight
            b = nd.full_bias
            z = vals[nd.parents[0]]
            vals.append(
                [
                    mpmath.fsum([mpmath.mpf(float(m[i, j])) * z[j] for j in range(len(z))])
                    + mpmath.mpf(float(b[i]))
                    for i in range(m.shape[0])
                ]
            )
        elif nd.kind == "act":
            vals.append([mp_phi(nd.op, v) for v in vals[nd.parents[0]]])
        else:
            a, c = (vals[p] for p in nd.parents)
            vals.append([u + v for u, v in zip(a, c, strict=True)])
    return vals[-1]


def mp_backward(st, init_node: int, lam_rows: np.ndarray, c0: np.ndarray) -> list:
    """The same CROWN propagation (same relaxations) in 60-digit arithmetic, for input 0."""
    graph = st.graph
    out = []
    for r in range(lam_rows.shape[0]):
        pending = {init_node: [mpmath.mpf(float(v)) for v in lam_rows[r]]}
        c = mpmath.mpf(float(c0[r]))
        for idx in range(init_node, -1, -1):
            if idx not in pending:
                continue
            lam = pending.pop(idx)
            nd = graph.nodes[idx]

            def push(p, v, pending=pending):
                if p in pending:
                    pending[p] = [a + b for a, b in zip(pending[p], v, strict=True)]
                else:
                    pending[p] = v

            if nd.kind == "input":
                x0 = [mpmath.mpf(float(v)) for v in st.x0[0]]
                lin = mpmath.fsum([a * b for a, b in zip(lam, x0, strict=True)])
                nrm = mpmath.sqrt(mpmath.fsum([a * a for a in lam]))
                out.append(lin - mpmath.mpf(float(st.eps[0])) * nrm + c)
            elif nd.kind == "act":
                rel = st.relax[idx]
                mu = []
                for i, a in enumerate(lam):
                    if a >= 0:
                        s, t = rel.lower_slope[0, i], rel.lower_icpt[0, i]
                    else:
                        s, t = rel.upper_slope[0, i], rel.upper_icpt[0, i]
                    mu.append(a * mpmath.mpf(float(s)))
                    c += a * mpmath.mpf(float(t))
                push(nd.parents[0], mu)
            elif nd.kind == "affine":
                m = nd.op.matrix() if isinstance(nd.op, Conv2d) else nd.op.weight
                b = nd.full_bias
                c += mpmath.fsum([a * mpmath.mpf(float(b[i])) for i, a in enumerate(lam)])
                push(
                    nd.parents[0],
                    [
                        mpmath.fsum(
                            [lam[i] * mpmath.mpf(float(m[i, j])) for i in range(m.shape[0])]
                        )
                        for j in range(m.shape[1])
                    ],
                )
            else:
                for p in nd.parents:
                    push(p, list(lam))
    return out


NETS = {
    **{f"dense-{n}": (lambda rng, n=n: dense_net(rng, [3, 5, 4, 3], n)) for n in ACT_NAMES},
    "dense-out-act": lambda rng: dense_net(rng, [3, 4, 4, 3], "relu", out_act=True),
    "conv": conv_net,
    "residual": residual_net,
    "residual-tanh": lambda rng: residual_net(rng, "tanh"),
}


@pytest.mark.parametrize("key", sorted(NETS))
def test_crown_equals_exact_recomputation_and_bounds_points(key):
    rng = np.random.default_rng(abs(hash(key)) % 2**32)
    net = NETS[key](rng)
    graph = build_graph(net)
    x0 = rng.normal(size=(1, net.input_size)) * 0.5
    eps = np.array([0.3])
    st_ = compute_bounds(graph, x0, eps)
    pred = np.array([int(np.argmax(net.forward(x0)[0]))])
    c = objective_rows(pred, net.output_size)
    from sdp.local.propagate import backward

    res = backward(st_, {graph.output: c}, np.zeros(c.shape[:2]))
    exact = mp_backward(st_, graph.output, c[0], np.zeros(c.shape[1]))
    for j in range(net.output_size):
        if j == pred[0]:
            continue
        got = res.lower[0, j]
        # sound (below the exact value of the same propagation) and tight (rounding only)
        assert got <= exact[j]
        assert float(exact[j]) - got <= 1e-9 * (1 + abs(float(exact[j])))
    # intermediate CROWN bounds too, on one node that feeds an activation
    for nd in graph.nodes:
        feeds_act = any(graph.nodes[q].kind == "act" for q in graph.consumers[nd.index])
        if nd.kind != "input" and feeds_act:
            rows = np.arange(nd.size)
            lo, hi = crown_node_bounds(st_, nd.index, rows)
            if nd.kind == "affine":
                w = nd.op.matrix() if isinstance(nd.op, Conv2d) else nd.op.weight
                lam = np.concatenate([w, -w])
                ex = mp_backward(
                    st_, nd.parents[0], lam, np.concatenate([nd.full_bias, -nd.full_bias])
                )
            else:
                eye = np.eye(nd.size)
                ex = mp_backward(st_, nd.index, np.concatenate([eye, -eye]), np.zeros(2 * nd.size))
            for i in range(nd.size):
                assert lo[0, i] <= ex[i] and hi[0, i] >= -ex[nd.size + i]
                assert float(ex[i]) - lo[0, i] <= 1e-9 * (1 + abs(float(ex[i])))
    # every point of the ball: exact margins above the certified lower bounds
    for m in ("ibp", "crown", "alpha-crown"):
        lower = get_method(m).compute(graph, x0, eps, pred).lower[0]
        for _ in range(6):
            d = rng.normal(size=net.input_size)
            x = x0[0] + d / np.linalg.norm(d) * eps[0] * (1 - 1e-9) * rng.uniform() ** 0.2
            f = mp_forward(net, x)
            for j in range(net.output_size):
                if j != pred[0]:
                    assert f[pred[0]] - f[j] >= lower[j], (m, j)
    # interval bounds contain every node at a point of the ball
    x = x0[0] + rng.normal(size=net.input_size) * 0.01
    vals = [x[None]]
    for nd in graph.nodes[1:]:
        if nd.kind == "affine":
            vals.append(nd.linear(vals[nd.parents[0]]) + nd.full_bias)
        elif nd.kind == "act":
            vals.append(nd.op(vals[nd.parents[0]]))
        else:
            vals.append(vals[nd.parents[0]] + vals[nd.parents[1]])
    for k, v in enumerate(vals):
        assert np.all(st_.lo[k] <= v + 1e-9) and np.all(v <= st_.hi[k] + 1e-9)


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from(ACT_NAMES), st.integers(1, 3), st.floats(0.0, 2.0))
def test_monotone_alpha_above_crown_above_ibp(seed, name, depth, eps):
    rng = np.random.default_rng(seed)
    net = dense_net(rng, [4] + [6] * depth + [3], name)
    graph = build_graph(net)
    x0 = rng.normal(size=(2, 4))
    e = np.full(2, eps)
    pred = np.argmax(net.forward(x0), axis=1)
    ibp = get_method("ibp").compute(graph, x0, e, pred).lower
    crown = get_method("crown").compute(graph, x0, e, pred).lower
    alpha = alpha_crown(graph, x0, e, pred, iterations=5).lower
    off = np.isfinite(crown)  # j != y (the entry j = y is +inf)
    assert np.all(alpha[off] >= crown[off])
    if name in ("relu", "leaky_relu", "identity"):
        assert np.all(crown[off] >= ibp[off] - 1e-9 * (1 + np.abs(ibp[off])))
    # (no monotonicity in eps is asserted: adaptive relaxations can make a bound at a larger eps
    # tighter; a certified radius r covers every smaller eps because the balls nest)


def test_radius_search_and_certificates_verify():
    rng = np.random.default_rng(3)
    net = dense_net(rng, [6, 12, 12, 4], "relu")
    x = rng.normal(size=(6, 6))
    # 0.5 s per input: the same radii and methods (beta-crown) as 5 s, in a tenth of the time
    res = certify_local(
        net, x, labels=np.zeros(6, dtype=int), global_bound=100.0, time_budget_s=0.5
    )
    assert np.all(res.radius >= res.global_radius)
    assert res.radius.max() > 0
    assert res.certified is None and res.epsilon is None and res.correct is not None
    for i in range(6):
        cert = res.certificates[i]
        assert cert.epsilon == res.radius[i] and cert.method == res.radius_method[i]
        assert verify_local(net, x[i], cert, lipschitz_bound=100.0)
    # a tampered certificate fails: larger eps than the true robust radius, or another input
    i = int(np.argmax(res.radius))
    cert = res.certificates[i]
    from dataclasses import replace

    assert not verify_local(net, x[i], replace(cert, epsilon=50.0))
    assert not verify_local(net, x[(i + 1) % 6], cert)


def test_global_certificates_of_a_batch_verify_alone():
    """The global floor of a batch re-verifies from each row alone: verify_local's single-row
    forward pass may round the last ulp differently from the batch's (before: 30% refused)."""
    rng = np.random.default_rng(5)
    net = dense_net(rng, [4, 10, 10, 3], "relu")
    x = rng.normal(size=(40, 4))
    res = certify_local(net, x, epsilon=0.0, method="crown", global_bound=10.0)
    assert all(c.method == "global" for c in res.certificates if c.epsilon > 0)
    assert sum(c.epsilon > 0 for c in res.certificates) > 30
    for i, cert in enumerate(res.certificates):
        assert verify_local(net, x[i], cert, lipschitz_bound=10.0), i


def test_at_eps_mode_and_methods():
    rng = np.random.default_rng(4)
    net = dense_net(rng, [5, 10, 3], "tanh")
    x = rng.normal(size=(4, 5))
    res = certify_local(net, x, epsilon=[0.0, 0.01, 0.1, 10.0], method="crown")
    assert res.certified is not None and res.epsilon is not None
    assert res.certified[0] and not res.certified[3]
    for i in range(4):
        assert verify_local(net, x[i], res.certificates[i])
        if res.certified[i]:
            assert res.radius[i] == res.epsilon[i]


@pytest.mark.parametrize(
    "kwargs, exc",
    [
        ({"inputs": np.full((1, 3), np.nan)}, ValueError),
        ({"inputs": np.array([[0.0, np.inf, 0.0]])}, ValueError),
        ({"inputs": np.zeros((1, 4))}, ValueError),
        ({"inputs": np.zeros(3)}, ValueError),
        ({"epsilon": -0.1}, ValueError),
        ({"epsilon": np.nan}, ValueError),
        ({"epsilon": [0.1, 0.2, 0.3]}, ValueError),
        ({"labels": np.zeros(5, dtype=int)}, ValueError),
        ({"global_bound": -1.0}, ValueError),
        ({"method": "nope"}, UnsupportedMethod),
        ({"batch_size": 0}, ValueError),  # crashed in range() before
        ({"batch_size": -1}, ValueError),  # certified nothing, silently, before
        ({"batch_size": 2.5}, ValueError),
    ],
)
def test_bad_input_is_refused(kwargs, exc):
    net = dense_net(np.random.default_rng(0), [3, 4, 2])
    args = {"inputs": np.zeros((2, 3))} | kwargs
    inputs = args.pop("inputs")
    with pytest.raises(exc):
        certify_local(net, inputs, **args)


def test_verify_rejects_wrong_network_and_garbage():
    rng = np.random.default_rng(5)
    net = dense_net(rng, [3, 6, 3])
    other = dense_net(rng, [3, 6, 3])
    x = rng.normal(size=(1, 3))
    res = certify_local(net, x, epsilon=1e-3, method="crown")
    cert = res.certificates[0]
    assert res.certified[0] and verify_local(net, x[0], cert)
    assert not verify_local(other, x[0], cert)
    assert not verify_local(net, np.full(3, np.nan), cert)


def test_alpha_crown_certificates_replay_and_optimizer_is_only_a_candidate():
    rng = np.random.default_rng(8)
    net = dense_net(rng, [6, 16, 16, 3], "relu", scale=1.5)
    x = rng.normal(size=(8, 6))
    crown = certify_local(net, x, epsilon=0.3, method="crown")
    alpha = certify_local(net, x, epsilon=0.3, method="alpha-crown")
    assert alpha.certified.sum() >= crown.certified.sum()
    payloads = [c for c in alpha.certificates if c.method == "alpha-crown"]
    assert payloads, "alpha-crown certified nothing: the replay test would be vacuous"
    for i, c in enumerate(alpha.certificates):
        assert verify_local(net, x[i], c)
    # a corrupted payload is refused, not trusted
    from dataclasses import replace

    c = payloads[0]
    i = alpha.certificates.index(c)
    bad = tuple((k, np.full((2, 2), np.nan)) for k, _ in c.payload)
    assert not verify_local(net, x[i], replace(c, payload=bad))

    calls = []

    def wild(problem):  # absurd slopes: clipped to [0, 1] and re-verified, never trusted
        calls.append(problem)
        return [np.full_like(a, 7.0) for a in problem.alpha_init]

    def garbage(problem):
        return [np.full((1,), np.nan)]

    for opt in (wild, garbage):
        res = certify_local(net, x, epsilon=0.3, method="alpha-crown", optimizer=opt)
        assert np.array_equal(res.certified, alpha.certified) or (
            res.certified.sum() >= alpha.certified.sum()
        )
        for i, cc in enumerate(res.certificates):
            assert verify_local(net, x[i], cc)
    assert calls and calls[0].objective.shape[1:] == (3, 3)


def test_global_floor_certificate_verifies_and_floor_holds():
    rng = np.random.default_rng(9)
    net = dense_net(rng, [4, 8, 3], "relu")
    x = rng.normal(size=(3, 4))
    # a tiny budget and a huge global bound: some inputs may keep the global radius
    res = certify_local(net, x, global_bound=1e6, method="ibp", time_budget_s=1e-6)
    for i in range(3):
        c = res.certificates[i]
        assert res.radius[i] >= res.global_radius[i]
        assert verify_local(net, x[i], c, lipschitz_bound=1e6), c.method
    glob = [c for c in res.certificates if c.method == "global"]
    assert glob, "no certificate kept the global radius: the test would be vacuous"
    from dataclasses import replace

    c = glob[0]
    i = res.certificates.index(c)
    assert not verify_local(net, x[i], replace(c, epsilon=c.epsilon * 2), lipschitz_bound=1e6)
    # the certificate's own global bound is not taken on its word (review finding): without a
    # trusted bound, or with a tampered tiny one, a global certificate does not verify
    assert not verify_local(net, x[i], c)
    lying = replace(c, global_bound=1e-9, epsilon=c.epsilon * 10)
    assert not verify_local(net, x[i], lying, lipschitz_bound=1e6)


def test_extreme_but_valid_input_never_crashes_or_overclaims():
    rng = np.random.default_rng(10)
    net = dense_net(rng, [3, 5, 3], "tanh")
    assert certify_local(net, np.zeros((0, 3))).radius.shape == (0,)
    assert certify_local(net, np.zeros((0, 3)), epsilon=0.1).certified.shape == (0,)
    x = rng.normal(size=(2, 3))
    with np.errstate(over="raise", invalid="raise", divide="raise"):  # no warnings escape
        for e in (1e300, 1e10):
            res = certify_local(net, x, epsilon=e)
            assert not res.certified.any()  # tanh logits are bounded, eps is absurd
            assert all(verify_local(net, x[i], res.certificates[i]) for i in range(2))
    huge = np.array([[1e300, -1e300, 1e300]])
    res = certify_local(net, huge)
    assert np.isfinite(res.radius).all() and res.radius[0] >= 0


@settings(max_examples=25, deadline=None)
@given(
    st.integers(0, 10_000),
    st.sampled_from(ACT_NAMES),
    st.integers(1, 3),
    st.floats(0.01, 1.5),
    st.sampled_from(["crown", "alpha-crown"]),
)
def test_bounds_hold_at_points_of_the_ball_hypothesis(seed, name, depth, eps, method):
    """float64 forward passes at points of the ball (incl. its boundary) never go below the
    certified margin bounds (float slack 1e-9, far below the gaps that matter)."""
    rng = np.random.default_rng(seed)
    net = dense_net(rng, [5] + [7] * depth + [3], name, scale=1.5)
    graph = build_graph(net)
    x0 = rng.normal(size=(2, 5))
    e = np.full(2, eps)
    pred = np.argmax(net.forward(x0), axis=1)
    lower = get_method(method).compute(graph, x0, e, pred).lower
    d = rng.normal(size=(2, 200, 5))
    d /= np.linalg.norm(d, axis=-1, keepdims=True)
    d *= eps * np.concatenate([np.ones(50), rng.uniform(size=150) ** 0.2])[None, :, None]
    for b in range(2):
        f = net.forward(x0[b] + d[b])
        m = np.delete(f[:, pred[b]][:, None] - f, pred[b], axis=1)
        lo = np.delete(lower[b], pred[b])[None, :]
        assert np.all(m >= lo - 1e-9 * (1 + np.abs(m)))
