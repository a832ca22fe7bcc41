"""compute_bound: published LipSDP values, closed forms, slope handling, methods and fallbacks."""

from __future__ import annotations

import numpy as np
import pytest

from sdp.bounds import compute_bound, naive_bound
from sdp.bounds import naive as naive_mod
from sdp.certificate import Lmi, verify_certificate
from sdp.errors import NotApplicable, UnsupportedMethod
from sdp.ir import Activation, Conv2d, Dense, Network, Residual
from sdp.sandwich.dense import plain_network
from sdp.solvers import available_solvers
from tests.sdp._nets import dense_network, mat_network, random_network
from tests.sdp.sandwich_cases import random_params

RANDOM_NEURON, RANDOM_LAYER, MNIST_NEURON = 36.482, 39.839, 24.366


def _rel(value: float, ref: float) -> float:
    return (value - ref) / ref


@pytest.fixture(scope="module")
def random_net(fixtures_dir):
    return mat_network(fixtures_dir / "lipsdp" / "random_weights.mat")


def _check(res, net) -> None:
    assert res.verified
    lmi = Lmi.from_chain(net.chain(), output_map=res.certificate.output_map)
    assert verify_certificate(lmi, res.certificate)


@pytest.mark.parametrize(
    ("method", "ref"), [("lipsdp-neuron", RANDOM_NEURON), ("lipsdp-layer", RANDOM_LAYER)]
)
def test_random_weights_published_values_default_solver(random_net, method, ref):
    res = compute_bound(random_net, method, lower_bound=False)
    _check(res, random_net)
    # published values are rounded to 3 decimals: never more than half a unit below
    assert res.value >= ref - 5e-4
    assert _rel(res.value, ref) < 1e-3


@pytest.mark.parametrize(
    ("method", "ref"), [("lipsdp-neuron", RANDOM_NEURON), ("lipsdp-layer", RANDOM_LAYER)]
)
def test_random_weights_published_values_cvxpy_clarabel(random_net, method, ref):
    if "clarabel" not in available_solvers():
        pytest.skip("clarabel not installed")
    res = compute_bound(random_net, method, solver="clarabel", lower_bound=False)
    assert res.solver == "clarabel"
    _check(res, random_net)
    assert res.value >= ref - 5e-4 and _rel(res.value, ref) < 1e-3


@pytest.mark.slow
def test_random_weights_published_value_cvxpy_scs(random_net):
    res = compute_bound(random_net, "lipsdp-neuron", solver="scs", lower_bound=False)
    assert res.solver == "scs"
    _check(res, random_net)
    assert res.value >= RANDOM_NEURON - 5e-4 and _rel(res.value, RANDOM_NEURON) < 1e-3


def test_mnist_weights_published_value(fixtures_dir):
    net = mat_network(fixtures_dir / "lipsdp" / "mnist_weights.mat")
    res = compute_bound(net, "lipsdp-neuron", lower_bound=False)
    _check(res, net)
    assert "exact QR input reduction 784 -> 50 inputs (W_0 = R^T Q^T, nothing dropped)" in res.notes
    assert res.value >= MNIST_NEURON - 5e-4 and _rel(res.value, MNIST_NEURON) < 1e-3
    naive, _ = naive_bound(net)
    assert naive == pytest.approx(31.50, abs=0.01)  # design.md §6 product of norms


def test_cvxpy_scs_through_the_input_reduction():
    """SCS solves the reduced problem and its multipliers certify the original LMI at the
    interior-point optimum (SCS_EPS accuracy). The published values through SCS are checked
    on random_weights above; on mnist_weights (784 -> 50) the same path cost 50 s of SCS."""
    net = random_network(np.random.default_rng(0), [30, 8, 8, 3], "relu")
    res = compute_bound(net, "lipsdp-neuron", solver="scs", lower_bound=False)
    assert res.solver == "scs"
    assert "exact QR input reduction 30 -> 8 inputs (W_0 = R^T Q^T, nothing dropped)" in res.notes
    _check(res, net)
    ref = compute_bound(net, "lipsdp-neuron", solver="structured", lower_bound=False).value
    assert ref * (1 - 1e-7) <= res.value and _rel(res.value, ref) < 1e-4


def test_single_affine_layer_is_its_spectral_norm():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((4, 6))
    net = Network((6,), (Dense(w, rng.standard_normal(4)),))
    exact = np.linalg.svd(w, compute_uv=False)[0]
    for method in ("naive", "lipsdp-neuron", "auto"):
        res = compute_bound(net, method, lower_bound=True)
        assert exact <= res.value <= exact * (1 + 1e-8), method
        assert res.lower_bound == pytest.approx(exact, rel=1e-6)


def test_identity_activation_net_equals_norm_of_product():
    rng = np.random.default_rng(2)
    w0, w1 = rng.standard_normal((5, 3)), rng.standard_normal((2, 5))
    net = dense_network([w0, w1], "identity")
    exact = np.linalg.svd(w1 @ w0, compute_uv=False)[0]
    res = compute_bound(net, "lipsdp-neuron", lower_bound=False)
    assert exact <= res.value <= exact * (1 + 1e-4)
    assert naive_bound(net)[0] >= np.linalg.norm(w0, 2) * np.linalg.norm(w1, 2)


def test_sigmoid_uses_slope_quarter():
    rng = np.random.default_rng(3)
    ws = [rng.standard_normal((6, 4)), rng.standard_normal((3, 6))]
    sig = compute_bound(dense_network(ws, "sigmoid"), "lipsdp-neuron", lower_bound=False)
    tanh = compute_bound(dense_network(ws, "tanh"), "lipsdp-neuron", lower_bound=False)
    # one hidden layer: slopes [0, b] scale the bound by exactly b
    assert sig.value == pytest.approx(tanh.value / 4, rel=1e-4)
    ws3 = [*ws[:1], rng.standard_normal((5, 6)), rng.standard_normal((3, 5))]
    deep_sig = compute_bound(dense_network(ws3, "sigmoid"), "lipsdp-neuron", lower_bound=False)
    deep_tanh = compute_bound(dense_network(ws3, "tanh"), "lipsdp-neuron", lower_bound=False)
    assert deep_sig.value < deep_tanh.value / 4


def test_leaky_relu_uses_its_alpha():
    rng = np.random.default_rng(4)
    ws = [rng.standard_normal((8, 4)), rng.standard_normal((6, 8)), rng.standard_normal((3, 6))]
    lmi = Lmi.from_chain(dense_network(ws, "leaky_relu", 0.2).chain())
    assert np.all(lmi.alpha[0] == 0.2) and np.all(lmi.beta[0] == 1.0)
    relu = compute_bound(dense_network(ws, "relu"), "lipsdp-neuron", lower_bound=False).value
    inner = compute_bound(dense_network(ws, "leaky_relu", 0.5), "lipsdp-neuron", lower_bound=False)
    outer = compute_bound(dense_network(ws, "leaky_relu", -0.5), "lipsdp-neuron", lower_bound=False)
    tol = 1e-4 * relu
    assert inner.value <= relu + tol  # [0.5, 1] is inside [0, 1]
    assert outer.value >= relu - tol  # [-0.5, 1] contains [0, 1]


def test_lipsdp_network_is_refused_and_unknown_methods_too(random_net):
    with pytest.raises(UnsupportedMethod, match="unsound"):
        compute_bound(random_net, "lipsdp-network")
    with pytest.raises(UnsupportedMethod):
        compute_bound(random_net, "magic")


def test_sandwich_method_needs_a_sandwich_net(random_net):
    with pytest.raises(NotApplicable):
        compute_bound(random_net, "sandwich")


def _residual_net(rng):
    w_in = rng.standard_normal((6, 4)) / 2
    w1, w2 = rng.standard_normal((6, 6)) / 3, rng.standard_normal((6, 6)) / 3
    w_out = rng.standard_normal((3, 6)) / 2
    block = Residual((Dense(w1, np.zeros(6)), Activation("relu"), Dense(w2, np.zeros(6))))
    ops = (Dense(w_in, np.zeros(6)), Activation("relu"), block, Activation("tanh"))
    return Network((4,), (*ops, Dense(w_out, np.zeros(3)))), (w_in, w1, w2, w_out)


def test_residual_is_compositional():
    rng = np.random.default_rng(5)
    net, (w_in, w1, w2, w_out) = _residual_net(rng)
    n = [np.linalg.norm(w, 2) for w in (w_in, w1, w2, w_out)]
    expected = n[0] * (1 + n[1] * n[2]) * n[3]
    res = compute_bound(net, "naive")
    assert res.method == "naive-compositional"
    assert any("compositional" in note for note in res.notes)
    assert expected <= res.value <= expected * (1 + 1e-8)
    assert res.lower_bound <= res.value
    # auto bounds residual nets by LipSDP over the DAG (design.md §3.6), never above this
    auto = compute_bound(net, "auto")
    assert auto.method == "lipsdp-dag" and auto.lower_bound <= auto.value <= res.value
    with pytest.raises(NotApplicable):
        compute_bound(net, "lipsdp-neuron")


def test_conv_naive_bounds_are_rigorous(monkeypatch):
    rng = np.random.default_rng(6)
    conv = Conv2d(rng.standard_normal((4, 2, 3, 3)), np.zeros(4), (2, 7, 7), (2, 2), (1, 1, 1, 1))
    exact = np.linalg.norm(conv.matrix(), 2)
    assert naive_mod.conv_norm(conv)[0] == pytest.approx(exact, rel=1e-9)
    monkeypatch.setattr(naive_mod, "DENSE_CONV_CAP", 0)  # force the matrix-free bounds
    value, how = naive_mod.conv_norm(conv)
    assert value >= exact and "bound" in how
    assert naive_mod.conv_power_estimate(conv) <= exact * (1 + 1e-12)


def test_conv_net_lipsdp_unrolled_and_below_naive():
    rng = np.random.default_rng(7)
    conv = Conv2d(
        rng.standard_normal((3, 1, 3, 3)) / 3, np.zeros(3), (1, 6, 6), (1, 1), (1, 1, 1, 1)
    )
    ops = (conv, Activation("relu"), Dense(rng.standard_normal((4, 108)) / 10, np.zeros(4)))
    net = Network((1, 6, 6), ops)
    res = compute_bound(net, "lipsdp-neuron")
    naive = compute_bound(net, "naive", lower_bound=False)
    assert res.verified and any("unrolled" in n for n in res.notes)
    assert res.lower_bound <= res.value <= naive.value * (1 + 1e-9)
    auto = compute_bound(net, "auto", lower_bound=False)
    assert auto.method == "lipsdp-neuron"


def test_pairwise_bounds_verify_and_are_below_sqrt2_global():
    rng = np.random.default_rng(8)
    net = random_network(rng, [4, 8, 8, 3])
    res = compute_bound(net, "lipsdp-neuron", pairwise=True, lower_bound=False)
    p = res.pairwise
    assert p.shape == (3, 3) and np.allclose(p, p.T) and np.all(np.diag(p) == 0)
    assert len(res.pairwise_certificates) == 3
    chain = net.chain()
    for cert in res.pairwise_certificates:
        assert verify_certificate(Lmi.from_chain(chain, output_map=cert.output_map), cert)
        y, j = cert.meta["pair"]
        assert p[y, j] == pytest.approx(cert.lipschitz_bound)
        assert p[y, j] <= np.sqrt(2) * res.value * (1 + 1e-4)
    # empirical check of one pair: Lip(f_0 - f_1) >= sampled ratios
    x = rng.standard_normal((200, 4))
    d = rng.standard_normal((200, 4)) * 1e-3
    g = net.forward(x + d) - net.forward(x)
    ratios = np.abs(g[:, 0] - g[:, 1]) / np.linalg.norm(d, axis=1)
    assert ratios.max() <= p[0, 1]


def test_scs_timeout_still_gives_a_verified_bound(random_net):
    res = compute_bound(
        random_net, "lipsdp-neuron", solver="scs", timeout_s=0.05, lower_bound=False
    )
    _check(res, random_net)
    assert res.value >= RANDOM_NEURON - 5e-4
    assert res.notes  # says it was repaired / timed out


def test_progress_events(random_net):
    events: list[dict] = []
    compute_bound(random_net, "lipsdp-layer", progress=events.append, lower_bound=False)
    phases = [e["phase"] for e in events]
    for phase in ("reduce", "solve", "verify"):
        assert phase in phases


def test_sandwich_network_auto_reports_the_smaller_of_closed_form_and_lipsdp():
    params = random_params(np.random.default_rng(9), [5, 8, 6, 3], 3.0)
    net = plain_network(params)
    assert net.sandwich is not None
    closed = compute_bound(net, "sandwich", lower_bound=False)
    sdp_res = compute_bound(net, "lipsdp-neuron", lower_bound=False)
    res = compute_bound(net, "auto")
    assert res.verified and res.lower_bound <= res.value <= 3.0 * (1 + 1e-6)
    assert res.value == min(closed.value, sdp_res.value)
    assert res.method == ("sandwich" if closed.value <= sdp_res.value else "lipsdp-neuron")
    assert any("time limit 120 s" in n for n in res.notes)  # which limit applied
    assert sdp_res.value <= 3.0 * (1 + 1e-4)  # design.md §3.4: LipSDP on the plain net <= gamma
