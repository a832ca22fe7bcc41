"""lipsdp-dag: LipSDP-Neuron over a residual network's DAG, certified (sdp.bounds.residual).

Independent references: the LMI is rebuilt here by hand from the weights (not from the
module's DAG), its optimum over per-neuron multipliers is solved with CVXPY (our certified
point is feasible for the same LMI, so it can only be above), the exact Lipschitz constant of
identity-activation nets (the spectral norm of the linear map), empirical lower bounds, the
compositional product, and tampered certificates (which must fail).
"""

from __future__ import annotations

import json
from dataclasses import replace

import cvxpy as cp
import numpy as np
import pytest

from sdp.bounds import compute_bound, empirical_lower_bound
from sdp.bounds.eclipse import eclipse_fast_bound
from sdp.bounds.recheck import recheck_document
from sdp.bounds.residual import (
    DagLmi,
    certify_dag,
    conv_matrix,
    dag_bound,
    dag_multipliers,
    verify_dag,
    verify_dag_on,
)
from sdp.certificate import Certificate, Lmi, certify_rho, verify_on
from sdp.errors import CertificateError, LipcertError, NotApplicable
from sdp.importers import load_model
from sdp.ir import Activation, Conv2d, Dense, Network, Residual
from tests.sdp._nets import random_network


def _block_net(rng: np.random.Generator, act: str = "relu", param: float = 0.0) -> tuple:
    """x(4) -> w1 = phi(W0 x) (6) -> u = phi(W1 w1) (5) -> w2 = phi(W2 u + S w1) (5)
    -> y = Wo w2 (3): one block with a projection shortcut S."""
    w0 = rng.standard_normal((6, 4)) / 2
    w1 = rng.standard_normal((5, 6)) / 2
    w2 = rng.standard_normal((5, 5)) / 2
    s = rng.standard_normal((5, 6)) / 2
    wo = rng.standard_normal((3, 5)) / 2
    phi = Activation(act, param)  # type: ignore[arg-type]
    z = np.zeros
    ops = (
        Dense(w0, 0.1 * rng.standard_normal(6)),
        phi,
        Residual((Dense(w1, z(5)), phi, Dense(w2, z(5))), (Dense(s, z(5)),)),
        phi,
        Dense(wo, z(3)),
    )
    return Network((4,), ops), (w0, w1, w2, s, wo), phi.slope_bounds


def _hand_lmi(weights: tuple, slopes: tuple[float, float]):
    """-M(rho, T) of the block net written out by hand: xi = (x, w1, u, w2), sizes 4, 6, 5, 5.

    Returns (f(rho, t) -> cvxpy/numpy matrix builder data): E_x, A_k, B_k selectors."""
    w0, w1, w2, s, wo = weights
    n = [4, 6, 5, 5]
    off = np.cumsum([0, *n])
    dim = int(off[-1])

    def sel(i: int) -> np.ndarray:
        e = np.zeros((n[i], dim))
        e[:, off[i] : off[i + 1]] = np.eye(n[i])
        return e

    ex, e1, eu, e2 = (sel(i) for i in range(4))
    a_maps = [w0 @ ex, w1 @ e1, w2 @ eu + s @ e1]  # pre-activations of the three layers
    b_maps = [e1, eu, e2]
    out = wo @ e2
    return ex, a_maps, b_maps, out, slopes


def _hand_matrix(rho: float, ts: list[np.ndarray], hand) -> np.ndarray:
    """M(rho, T) (must be <= 0) in numpy, from the hand-written maps."""
    ex, a_maps, b_maps, out, (a, b) = hand
    m = out.T @ out - rho * ex.T @ ex
    for ak, bk, t in zip(a_maps, b_maps, ts, strict=True):
        tt = np.diag(t)
        m += -2 * a * b * ak.T @ tt @ ak + (a + b) * (ak.T @ tt @ bk + bk.T @ tt @ ak)
        m += -2 * bk.T @ tt @ bk
    return m


def _cvxpy_optimum(hand) -> float:
    """min rho s.t. M(rho, T) <= 0 over per-neuron T >= 0 (the same LMI), by Clarabel."""
    ex, a_maps, b_maps, out, (a, b) = hand
    rho = cp.Variable()
    ts = [cp.Variable(ak.shape[0], nonneg=True) for ak in a_maps]
    m = out.T @ out - rho * (ex.T @ ex)
    for ak, bk, t in zip(a_maps, b_maps, ts, strict=True):
        tt = cp.diag(t)
        m = m - 2 * a * b * ak.T @ tt @ ak + (a + b) * (ak.T @ tt @ bk + bk.T @ tt @ ak)
        m = m - 2 * bk.T @ tt @ bk
    prob = cp.Problem(cp.Minimize(rho), [(m + m.T) / 2 << 0])
    prob.solve(solver="CLARABEL")
    assert prob.status == "optimal"
    return float(rho.value)


@pytest.mark.parametrize(
    ("act", "param", "seed"), [("relu", 0.0, 0), ("tanh", 0.0, 1), ("leaky_relu", 0.2, 2)]
)
def test_against_the_hand_built_lmi_and_its_cvxpy_optimum(act, param, seed) -> None:
    net, weights, slopes = _block_net(np.random.default_rng(seed), act, param)
    res = dag_bound(net)
    assert res.verified and res.method == "lipsdp-dag"
    cert = res.certificate
    hand = _hand_lmi(weights, slopes)
    # the certificate is a feasible point of the hand-written LMI (independent construction)
    top = np.linalg.eigvalsh(_hand_matrix(cert.rho, list(cert.multipliers), hand)).max()
    assert top <= 1e-9 * cert.rho
    opt = _cvxpy_optimum(hand)
    assert np.sqrt(opt) * (1 - 1e-6) <= res.value <= 1.5 * np.sqrt(opt)
    low = empirical_lower_bound(net, starts=16)
    comp = compute_bound(net, "naive", lower_bound=False).value
    assert low <= res.value <= comp


def test_identity_activations_bound_the_exact_norm() -> None:
    # with identity activations the network is linear: Lip = ||J||_2 exactly
    rng = np.random.default_rng(3)
    net, *_ = _block_net(rng, "identity")
    jac = net.forward(np.eye(4)) - net.forward(np.zeros(4))
    exact = np.linalg.norm(jac, 2)
    res = dag_bound(net)
    assert exact <= res.value <= exact * 1.02


def test_on_a_chain_it_is_the_chain_lmi() -> None:
    net = random_network(np.random.default_rng(4), [6, 12, 12, 12, 3])
    ecl = eclipse_fast_bound(net).certificate
    lmi_dag = DagLmi.from_network(net)
    lmi_chain = Lmi.from_chain(net.chain())
    # the same multipliers certify the same rho through both checks (up to float margins)
    r_dag = certify_dag(lmi_dag, ecl.multipliers)
    r_chain = certify_rho(lmi_chain, ecl.multipliers)
    assert r_dag == pytest.approx(r_chain, rel=1e-6)
    assert verify_dag(lmi_dag, ecl)
    # and the forward recursion is ECLipsE-Fast's on a chain
    k_star, t = dag_multipliers(lmi_dag, "scalar")
    assert k_star == pytest.approx(ecl.meta["closed_form_rho"], rel=1e-9)
    assert len(t) == 3 and all(np.all(ti > 0) for ti in t)


def test_tampered_certificates_fail() -> None:
    net, *_ = _block_net(np.random.default_rng(5))
    cert = dag_bound(net).certificate
    assert verify_dag_on(net, cert)
    assert not verify_dag_on(net, replace(cert, rho=cert.rho * 0.99))
    shrunk = tuple(t * 1e-3 for t in cert.multipliers)
    assert not verify_dag_on(net, replace(cert, multipliers=shrunk))
    assert not verify_dag_on(net, replace(cert, multipliers=cert.multipliers[:-1]))
    neg = (-cert.multipliers[0], *cert.multipliers[1:])
    assert not verify_dag_on(net, replace(cert, multipliers=neg))
    other, *_ = _block_net(np.random.default_rng(6))
    assert not verify_dag_on(other, cert)
    with pytest.raises(CertificateError):
        certify_dag(DagLmi.from_network(net), shrunk)


def test_recheck_of_a_dag_document() -> None:
    net, *_ = _block_net(np.random.default_rng(7))
    res = compute_bound(net, "lipsdp-dag", lower_bound=False)
    doc = {
        "lipschitz_bound": res.value,
        "method": "lipsdp-dag",
        "verified": True,
        "certificate": json.loads(res.certificate.to_json()),
    }
    recheck_document(net, doc)
    low = {**doc, "lipschitz_bound": res.value * 0.9}
    with pytest.raises(CertificateError):
        recheck_document(net, low)
    forged = json.loads(json.dumps(doc))
    forged["certificate"]["rho"] *= 0.9
    forged["lipschitz_bound"] = float(np.sqrt(forged["certificate"]["rho"]))
    with pytest.raises(CertificateError):
        recheck_document(net, forged)


def _conv_resnet(rng: np.random.Generator) -> Network:
    """A miniature of cifar10_resnet: conv stem, a stride-2 block with a 1x1 projection
    shortcut, an identity block, then dense layers."""

    def conv(ci, co, h, k, stride, pad):
        w = rng.standard_normal((co, ci, k, k)) / np.sqrt(ci * k * k)
        return Conv2d(w, 0.1 * rng.standard_normal(co), (ci, h, h), (stride, stride), (pad,) * 4)

    relu = Activation("relu")
    c0 = conv(2, 3, 8, 3, 2, 1)  # (2,8,8) -> (3,4,4)
    b1 = Residual(
        (conv(3, 4, 4, 3, 2, 1), relu, conv(4, 4, 2, 3, 1, 1)),
        (conv(3, 4, 4, 1, 2, 0),),
    )
    b2 = Residual((conv(4, 4, 2, 3, 1, 1), relu, conv(4, 4, 2, 3, 1, 1)))
    d1 = Dense(rng.standard_normal((10, 16)) / 4, np.zeros(10))
    d2 = Dense(rng.standard_normal((3, 10)) / 3, np.zeros(3))
    return Network((2, 8, 8), (c0, relu, b1, relu, b2, relu, d1, relu, d2))


def test_conv_resnet_and_auto_uses_it() -> None:
    net = _conv_resnet(np.random.default_rng(8))
    res = compute_bound(net, "auto")
    assert res.method == "lipsdp-dag" and res.verified
    assert any("lipsdp-dag used" in n for n in res.notes)
    comp = compute_bound(net, "naive", lower_bound=False)
    assert comp.method == "naive-compositional"
    assert res.lower_bound <= res.value < comp.value
    assert verify_dag_on(net, res.certificate)


def test_auto_falls_back_to_the_product_over_the_time_limit() -> None:
    net = _conv_resnet(np.random.default_rng(9))
    res = compute_bound(net, "auto", timeout_s=1e-9, lower_bound=False)
    assert res.method == "naive-compositional"
    assert any("time limit" in n for n in res.notes)
    with pytest.raises(LipcertError):
        dag_bound(net, time_limit_s=1e-9)


def test_refused_on_mixed_sign_slopes() -> None:
    net, *_ = _block_net(np.random.default_rng(10), "gelu")
    with pytest.raises(NotApplicable):
        dag_bound(net)


@pytest.mark.parametrize(
    ("ci", "co", "hw", "k", "stride", "pad", "dil", "groups"),
    [
        (3, 4, (7, 6), 3, 2, (1, 1, 1, 1), (1, 1), 1),
        (4, 6, (8, 8), 3, 1, (1, 0, 2, 1), (2, 1), 2),
        (2, 2, (5, 5), 1, 2, (0, 0, 0, 0), (1, 1), 1),
        (3, 3, (9, 9), 4, 2, (1, 1, 1, 1), (1, 1), 3),
    ],
)
def test_conv_matrix_is_the_unrolled_convolution(ci, co, hw, k, stride, pad, dil, groups) -> None:
    rng = np.random.default_rng(ci * co + k)
    w = rng.standard_normal((co, ci // groups, k, k))
    conv = Conv2d(w, np.zeros(co), (ci, *hw), (stride, stride), pad, dil, groups)
    assert np.array_equal(conv_matrix(conv), conv.matrix())


def test_output_reading_the_input_directly() -> None:
    # y = W3 (x + W2 relu(W1 x)): the output's sources are the input and the hidden node
    rng = np.random.default_rng(12)
    w1, w2, w3 = (
        rng.standard_normal((8, 4)),
        rng.standard_normal((4, 8)),
        rng.standard_normal((3, 4)),
    )
    block = Residual((Dense(w1, np.zeros(8)), Activation("relu"), Dense(w2, np.zeros(4))))
    net = Network((4,), (block, Dense(w3, np.zeros(3))))
    res = dag_bound(net)
    assert verify_dag_on(net, res.certificate)
    comp = compute_bound(net, "naive", lower_bound=False).value
    assert empirical_lower_bound(net, starts=16) <= res.value <= comp
    # the Jacobian at any point is a lower bound: W3 (I + W2 diag(W1 x > 0) W1)
    for x in rng.standard_normal((50, 4)):
        d = (w1 @ x > 0).astype(float)
        piece = w3 @ (np.eye(4) + w2 @ (d[:, None] * w1))
        assert np.linalg.norm(piece, 2) <= res.value


@pytest.mark.slow
def test_resnet_2b_fixture_below_the_compositional_product(fixtures_dir) -> None:
    # the real cifar10_resnet net of issue 13 (about a minute on a loaded core)
    path = fixtures_dir / "vnncomp2021/benchmarks/cifar10_resnet/onnx/resnet_2b.onnx"
    net = load_model(path.read_bytes())
    res = dag_bound(net)
    comp = compute_bound(net, "naive", lower_bound=False).value
    low = empirical_lower_bound(net, starts=4)
    assert low <= res.value < comp / 5
    assert res.certificate.meta["structure"] == "dag"


_FUZZ_ACTS = [
    ("relu", 0.0),
    ("leaky_relu", 0.1),
    ("leaky_relu", 3.0),
    ("tanh", 0.0),
    ("sigmoid", 0.0),
    ("elu", 2.5),
    ("softplus", 0.0),
    ("identity", 0.0),
]


def _random_residual(rng: np.random.Generator) -> Network:
    """Random residual nets: nested blocks, linear-only bodies, projection shortcuts, a block
    right at the input, trailing activations."""
    n = int(rng.integers(1, 5))
    n0 = n

    def dense(o: int, i: int) -> Dense:
        w = rng.standard_normal((o, i)) * rng.uniform(0.3, 1.5) / np.sqrt(i)
        return Dense(w, 0.3 * rng.standard_normal(o))

    def act() -> Activation:
        name, p = _FUZZ_ACTS[int(rng.integers(len(_FUZZ_ACTS)))]
        return Activation(name, p)  # type: ignore[arg-type]

    ops: list = []
    for _ in range(int(rng.integers(1, 4))):
        kind = int(rng.integers(4))
        m = int(rng.integers(2, 6))
        if kind == 0:  # plain layer
            ops += [dense(m, n), act()]
            n = m
        elif kind == 1:  # identity block
            ops.append(Residual((dense(m, n), act(), dense(n, m))))
        elif kind == 2:  # projection block, linear body
            ops.append(Residual((dense(m, n),), (dense(m, n),)))
            n = m
        else:  # nested block
            inner = Residual((dense(m, n), act(), dense(n, m)))
            ops.append(Residual((inner, act(), dense(n, n))))
        if rng.random() < 0.5:
            ops.append(act())
    ops.append(dense(int(rng.integers(1, 4)), n))
    return Network((n0,), tuple(ops))


@pytest.mark.parametrize("seed", range(12))
def test_random_residual_nets_are_above_strong_lower_bounds(seed: int) -> None:
    from tests.sdp.test_audit_soundness import strong_lower_bound

    net = _random_residual(np.random.default_rng(1000 + seed))
    res = dag_bound(net)
    assert verify_dag_on(net, res.certificate)
    low = strong_lower_bound(net, seed)
    assert res.value >= low * (1 - 1e-9)
    comp = compute_bound(net, "naive", lower_bound=False).value
    assert res.value <= comp * 1.5  # never wildly off the compositional product either


def test_a_one_dimensional_output_map_is_refused() -> None:
    """p = (1, -1) as a 1-D array would enter the LMI as the scalar ||p||^2 instead of p p^T
    and prove a far too small rho for p^T f (here f = (x, -x), Lip(p^T f) = 2)."""
    net = Network(
        (1,),
        (
            Dense(np.array([[1.0], [-1.0]]), np.zeros(2)),
            Activation("identity"),
            Dense(np.eye(2), np.zeros(2)),
        ),
    )
    doc = {
        "format": "lipcert-certificate/1",
        "rho": 1e-6,
        "multipliers": [[10.0, 10.0]],
        "meta": {"structure": "dag"},
    }
    with pytest.raises(CertificateError):
        Certificate.from_json(json.dumps({**doc, "output_map": [1.0, -1.0]}))
    flat = Certificate(rho=1e-6, multipliers=(np.full(2, 10.0),), output_map=np.array([1.0, -1.0]))
    assert not verify_dag_on(net, flat)
    assert not verify_on(net, flat)
    honest = Certificate.from_json(json.dumps({**doc, "output_map": [[1.0, -1.0]]}))
    assert not verify_dag_on(net, honest)  # rho = 1e-6 < 4 = Lip(p^T f)^2
