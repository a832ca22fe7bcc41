"""beta-CROWN branch and bound (sdp.local.beta_crown): exact recomputation of every leaf's
bound, exact margins at points of each leaf, coverage, tampered certificates, PGD inside every
certified radius (random nets and mnistfc-256x2)."""

from __future__ import annotations

import gzip

import mpmath
import numpy as np
import pytest

from sdp.errors import NotApplicable
from sdp.importers import load_model_file
from sdp.ir import Dense, Network
from sdp.local import LocalCertificate, certify_local, verify_local
from sdp.local import beta_crown as BC
from sdp.local.alpha import IntermediateAlpha
from sdp.local.graph import build_graph
from sdp.local.margins import _decode_inter, objective_rows
from sdp.local.propagate import compute_bounds
from tests.sdp._local_nets import conv_net, dense_net, mp_phi
from tests.sdp.test_local_attack import check_no_attack, pgd_min_margin

mpmath.mp.dps = 60


def _mp(v: float) -> mpmath.mpf:
    return mpmath.mpf(float(v))


def mp_leaf_value(lp: BC.LeafProblem, i: int) -> mpmath.mpf:
    """The exact (60-digit) value of leaf i's relaxed bound: the same lines, alphas and
    multipliers as the rigorous pass, every product and sum exact."""
    st = lp.bounds
    g = st.graph
    pending: dict[int, list] = {}
    for k, lam in lp.init.items():
        pending[k] = [_mp(v) for v in lam[i, 0]]
    c = mpmath.mpf(0)
    for idx in range(g.output, -1, -1):
        if idx not in pending:
            continue
        lam = pending.pop(idx)
        nd = g.nodes[idx]

        def push(p, v):
            if p in pending:
                pending[p] = [a + b for a, b in zip(pending[p], v, strict=True)]
            else:
                pending[p] = v

        if nd.kind == "input":
            x0 = [_mp(v) for v in st.x0[i]]
            lin = mpmath.fsum([a * b for a, b in zip(lam, x0, strict=True)])
            nrm = mpmath.sqrt(mpmath.fsum([a * a for a in lam]))
            return lin - _mp(st.eps[i]) * nrm + c
        if nd.kind == "act":
            rel = st.relax[idx]
            al = lp.alphas[idx][i, 0]
            mu = []
            for j, a in enumerate(lam):
                if a >= 0:
                    s = rel.lower_slope[i, j]
                    if rel.alpha_mask[i, j]:
                        s = min(max(al[j], rel.alpha_min), rel.alpha_max)
                    t = rel.lower_icpt[i, j]
                else:
                    s, t = rel.upper_slope[i, j], rel.upper_icpt[i, j]
                mu.append(a * _mp(s))
                c += a * _mp(t)
            push(nd.parents[0], mu)
        else:
            w, b = nd.op.weight, nd.full_bias
            c += mpmath.fsum([a * _mp(b[r]) for r, a in enumerate(lam)])
            push(
                nd.parents[0],
                [
                    mpmath.fsum([lam[r] * _mp(w[r, q]) for r in range(w.shape[0])])
                    for q in range(w.shape[1])
                ],
            )
    raise AssertionError("no input node reached")


def mp_pre_and_margin(net, x, y):
    """Exact pre-activations of every act node's parent and the margins f_y - f_j at x."""
    graph = build_graph(net)
    vals: list = [[_mp(v) for v in x]]
    pre = {}
    for nd in graph.nodes[1:]:
        z = vals[nd.parents[0]]
        if nd.kind == "affine":
            w, b = nd.op.weight, nd.full_bias
            vals.append(
                [
                    mpmath.fsum([_mp(w[r, q]) * z[q] for q in range(len(z))]) + _mp(b[r])
                    for r in range(w.shape[0])
                ]
            )
        else:
            pre[nd.index] = z
            vals.append([mp_phi(nd.op, v) for v in z])
    f = vals[-1]
    return pre, [f[y] - f[j] for j in range(len(f))]


def _branched(net, x, eps_grid):
    """(x0, eps, certificate) of beta-crown certificates that branched, over a grid of eps."""
    out = []
    for e in eps_grid:
        res = certify_local(net, x, epsilon=e, method="beta-crown")
        for i, cert in enumerate(res.certificates):
            if res.certified[i] and any(k.startswith("bc:") for k, _ in cert.payload):
                out.append((x[i], e, cert))
    return out


def _leaves(net, x0, eps, cert):
    graph = build_graph(net)
    ch = BC.chain_of(graph)
    plain = tuple((k, v) for k, v in cert.payload if not k.startswith("bc:"))
    bcp = tuple((k, v) for k, v in cert.payload if k.startswith("bc:"))
    trees = BC._decode_leaves(ch, bcp, graph.output_size)
    inter = _decode_inter(graph, plain)
    hook = IntermediateAlpha(given=[inter])
    st = compute_bounds(graph, x0[None], np.array([eps]), node_hook=hook)
    c = objective_rows(np.array([cert.prediction]), graph.output_size)[0]
    return ch, st, c, trees, inter


def test_covers_checks_the_split_tree():
    t = np.array([[1, 1, 0], [1, -1, 0], [-1, 0, 1], [-1, 0, -1]], dtype=np.int8)
    assert BC.covers(t)
    assert BC.covers(np.zeros((1, 3), dtype=np.int8))
    assert not BC.covers(t[:3])  # z_0 <= 0, z_2 <= 0 is missing
    assert not BC.covers(t[[0, 0, 2, 3]])  # z_0 >= 0, z_1 <= 0 missing
    assert not BC.covers(np.zeros((0, 3), dtype=np.int8))
    # leaves split on different neurons first still cover when every pattern is in one
    assert BC.covers(np.array([[1, 0], [-1, 1], [-1, -1]], dtype=np.int8))


@pytest.mark.parametrize("name", ["relu", "leaky_relu"])
def test_leaf_bounds_equal_exact_recomputation_and_hold_at_points(name):
    rng = np.random.default_rng(5 if name == "relu" else 8)
    net = dense_net(rng, [5, 10, 10, 3], name, scale=1.6)
    x = rng.normal(size=(6, 5))
    cases = _branched(net, x, [0.3, 0.45, 0.6, 0.8])
    assert cases, "no certificate branched: the test would be vacuous"
    for x0, eps, cert in cases[:3]:
        ch, st, c, trees, inter = _leaves(net, x0, eps, cert)
        y = cert.prediction
        pts = []
        for _ in range(25):  # points of the ball, some on its sphere
            d = rng.normal(size=x0.size)
            pts.append(x0 + d / np.linalg.norm(d) * eps * (1 - 1e-9) * rng.uniform() ** 0.3)
        exact_pts = [mp_pre_and_margin(net, p, y) for p in pts]
        for j, (sgn, alpha, beta) in trees.items():
            s8 = [s.astype(np.int8) for s in sgn]
            lp = BC.leaf_problem(ch, st, c[j], s8, alpha, beta, inter)
            got = BC.leaf_bounds(ch, st, c[j], s8, alpha, beta, inter)
            assert np.all(got > 0) and cert.lower_bounds[j] > 0
            for i in range(min(len(got), 4)):
                ex = mp_leaf_value(lp, i)
                assert got[i] <= ex  # sound ...
                assert float(ex) - got[i] <= 1e-9 * (1 + abs(float(ex)))  # ... and tight
            for pre, margins in exact_pts:
                inside = np.ones(len(got), dtype=bool)
                for k in range(len(ch.pre)):
                    z = np.array([float(v) for v in pre[ch.act[k]]])
                    inside &= np.all((s8[k] == 0) | (s8[k] * z >= 0), axis=1)
                assert inside.any()  # the leaves cover the ball
                assert margins[j] >= np.min(got[inside])


def test_beta_crown_above_alpha_crown_and_certificates_verify():
    rng = np.random.default_rng(5)
    net = dense_net(rng, [5, 10, 10, 3], "relu", scale=1.6)
    x = rng.normal(size=(6, 5))
    for e in (0.3, 0.6):
        a = certify_local(net, x, epsilon=e, method="alpha-crown")
        b = certify_local(net, x, epsilon=e, method="beta-crown")
        assert np.all(b.certified >= a.certified)
        for i in np.flatnonzero(b.certified):
            assert verify_local(net, x[i], b.certificates[i])


def test_tampered_certificates_are_refused():
    rng = np.random.default_rng(5)
    net = dense_net(rng, [5, 10, 10, 3], "relu", scale=1.6)
    x = rng.normal(size=(6, 5))
    x0, _, cert = _branched(net, x, [0.45, 0.6, 0.8])[0]
    assert verify_local(net, x0, cert)
    fields = dict(cert.__dict__)
    key = next(k for k, _ in cert.payload if k.startswith("bc:") and ":sgn:" in k)
    j = key.split(":")[1]

    def edit(fn):
        return LocalCertificate(**{**fields, "payload": tuple(fn(k, v) for k, v in cert.payload)})

    def drop_leaf(k, v):
        return (k, v[1:]) if k.startswith(f"bc:{j}:") else (k, v)

    n_leaves = dict(cert.payload)[key].shape[0]
    if n_leaves > 1:  # without one leaf the rest no longer cover the ball
        assert not verify_local(net, x0, edit(drop_leaf))

    def neg_beta(k, v):
        return (k, -np.abs(v) - 1.0) if ":beta:" in k else (k, v)

    assert not verify_local(net, x0, edit(neg_beta))

    def flip(k, v):  # every leaf on the same side: no longer a cover
        return (k, np.abs(v)) if ":sgn:" in k else (k, v)

    assert not verify_local(net, x0, edit(flip))

    bad = LocalCertificate(**{**fields, "epsilon": cert.epsilon * 4})
    assert not verify_local(net, x0, bad)


def test_not_applicable_to_smooth_activations():
    rng = np.random.default_rng(1)
    net = dense_net(rng, [4, 6, 3], "tanh")
    assert not BC.applies(build_graph(net))
    with pytest.raises(NotApplicable):
        certify_local(net, rng.normal(size=(1, 4)), epsilon=0.1, method="beta-crown")


@pytest.mark.parametrize("name", ["relu", "leaky_relu"])
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_pgd_inside_beta_crown_radius_random_dense(name, depth):
    rng = np.random.default_rng(400 + depth * 7 + (name == "relu"))
    net = dense_net(rng, [8] + [16] * depth + [4], name, scale=1.5)
    check_no_attack(net, rng.normal(size=(3, 8)), method="beta-crown", budget=1.0)


@pytest.mark.parametrize("name", ["relu", "leaky_relu"])
def test_pgd_inside_beta_crown_radius_conv(name):
    rng = np.random.default_rng(11)
    net = conv_net(rng, name)
    check_no_attack(net, rng.normal(size=(3, net.input_size)), method="beta-crown", budget=1.0)


def _mnist(fixtures_dir, idx):
    with gzip.open(fixtures_dir / "mnist" / "t10k-images-idx3-ubyte.gz") as fh:
        raw = np.frombuffer(fh.read(), dtype=np.uint8, offset=16).reshape(-1, 784)
    return raw[idx] / 255.0


def test_mnistfc_256x2_beyond_alpha_crown_and_no_attack(fixtures_dir):
    """Test images 3 and 11 at eps 0.5: alpha-CROWN fails, beta-CROWN certifies (margin rows
    branched), the certificates verify, PGD finds nothing inside."""
    path = fixtures_dir / "vnncomp2021" / "benchmarks" / "mnistfc" / "mnist-net_256x2.onnx"
    net = load_model_file(path)
    x = _mnist(fixtures_dir, [3, 11])
    a = certify_local(net, x, epsilon=0.5, method="alpha-crown")
    saved = BC.BUDGET_S
    # no wall-clock dependence: the search runs until every domain is proven (or a
    # counterexample / MAX_DOMAINS); the 1 s budget is the benchmark's business
    BC.BUDGET_S = 600.0
    try:
        b = certify_local(net, x, epsilon=0.5, method="beta-crown")
    finally:
        BC.BUDGET_S = saved
    assert not a.certified.any() and b.certified.all()
    assert np.all(pgd_min_margin(net, x, b.prediction, np.full(2, 0.5)) > 0)
    for i in range(2):
        assert verify_local(net, x[i], b.certificates[i])


@pytest.mark.slow
def test_mnistfc_256x2_radius_search_no_attack_inside(fixtures_dir):
    """The beta-crown radius search on 3 test images: radii above alpha-CROWN's, every one
    verified, and no PGD attack (full ball) inside any of them."""
    path = fixtures_dir / "vnncomp2021" / "benchmarks" / "mnistfc" / "mnist-net_256x2.onnx"
    net = load_model_file(path)
    x = _mnist(fixtures_dir, [1, 3, 4])
    # 1.5 s per input (was 4): radii 0.372 / 0.455 / 0.305, still above alpha-CROWN's 0.364 /
    # 0.405 / 0.253 (4 s: 0.465 / 0.512 / 0.305)
    res = certify_local(net, x, method="beta-crown", time_budget_s=1.5, global_bound=312.416)
    assert set(res.radius_method) == {"beta-crown"}
    assert np.all(res.radius > 20 * res.global_radius)
    m = pgd_min_margin(net, x, res.prediction, res.radius * (1 - 1e-9), steps=60, restarts=4)
    assert np.all(m > 0), (m, res.radius)
    for i in range(3):
        assert verify_local(net, x[i], res.certificates[i])


@pytest.mark.parametrize("kind", ["output-activation", "no-hidden-layer"])
def test_auto_runs_on_nets_beta_crown_must_handle_or_refuse(kind):
    """A net ending in a ReLU (ERAN's mnist_relu_9_200 does) reaches the branch and bound, a
    net without a hidden layer has nothing to split: auto certifies both without an error,
    and whatever it certifies verifies and survives PGD."""
    rng = np.random.default_rng(3)
    if kind == "output-activation":
        net = dense_net(rng, [4, 8, 8, 3], "relu", out_act=True, scale=1.6)
    else:
        net = Network((3,), (Dense(rng.normal(size=(3, 3)), np.zeros(3)),))
        with pytest.raises(NotApplicable):
            BC.chain_of(build_graph(net))
    x = rng.normal(size=(4, net.input_size))
    for eps in (0.05, 0.5):
        res = certify_local(net, x, epsilon=eps, method="auto")
        ok = np.flatnonzero(res.certified)
        for i in ok:
            assert verify_local(net, x[i], res.certificates[i])
        if ok.size:
            got = pgd_min_margin(net, x[ok], res.prediction[ok], np.full(ok.size, eps))
            assert np.all(got > 0)
    radius = certify_local(net, x, method="auto", time_budget_s=0.3).radius
    assert np.all(np.isfinite(radius)) and np.all(radius >= 0)
