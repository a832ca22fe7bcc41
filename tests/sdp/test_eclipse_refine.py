"""eclipse-refined: per-neuron LipSDP-Neuron multipliers on the sparse LMI (eclipse_refine).

Checked against independent numbers: the dense unrolled conv matrices, ECLipsE-Fast's own
closed form (sdp.bounds.eclipse), finite differences of rho(T), the dense certificate check,
the CVXPY LipSDP-Neuron optimum (never beaten), the empirical lower bound and the naive product.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from sdp import certificate
from sdp.bounds import compute_bound, empirical_lower_bound
from sdp.bounds.eclipse import eclipse_multipliers
from sdp.bounds.eclipse_refine import (
    SparseChain,
    _Problem,
    conv_sparse,
    eclipse_refined_bound,
)
from sdp.bounds.plan import check_bound_request
from sdp.certificate import Certificate, Lmi, certify_rho, verify_certificate, verify_on
from sdp.errors import CertificateError, NotApplicable
from sdp.ir import Activation, Conv2d, Dense, Network
from tests.sdp._nets import random_network
from tests.sdp.test_bounds import _residual_net


def conv_net(seed: int, *, channels: int = 2, side: int = 6, act: str = "relu") -> Network:
    """in (1, side, side) -> conv 3x3 s1 p1 -> act -> conv 4x4 s2 p1 -> act -> dense 8 -> act
    -> dense 3: a small chain with the oval21 nets' layer kinds."""
    rng = np.random.default_rng(seed)
    c1 = Conv2d(
        rng.standard_normal((channels, 1, 3, 3)) / 3,
        0.1 * rng.standard_normal(channels),
        (1, side, side),
        (1, 1),
        (1, 1, 1, 1),
    )
    c2 = Conv2d(
        rng.standard_normal((channels, channels, 4, 4)) / 4,
        0.1 * rng.standard_normal(channels),
        c1.out_shape,
        (2, 2),
        (1, 1, 1, 1),
    )
    n2 = c2.out_features
    d1 = Dense(rng.standard_normal((8, n2)) / np.sqrt(n2), 0.1 * rng.standard_normal(8))
    d2 = Dense(rng.standard_normal((3, 8)) / np.sqrt(8), np.zeros(3))
    a = Activation(act)  # type: ignore[arg-type]
    return Network((1, side, side), (c1, a, c2, a, d1, a, d2))


@pytest.mark.parametrize(
    ("shape", "stride", "padding", "dilation", "groups"),
    [
        ((4, 2, 3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1),
        ((4, 2, 4, 4), (2, 2), (1, 1, 1, 1), (1, 1), 1),
        ((6, 1, 3, 2), (2, 1), (0, 2, 1, 0), (2, 1), 2),
    ],
)
def test_sparse_conv_is_the_unrolled_matrix(shape, stride, padding, dilation, groups) -> None:
    rng = np.random.default_rng(0)
    conv = Conv2d(
        rng.standard_normal(shape),
        np.zeros(shape[0]),
        (shape[1] * groups, 7, 8),
        stride,
        padding,
        dilation,
        groups,
    )
    assert np.array_equal(conv_sparse(conv).toarray(), conv.matrix())


@pytest.mark.parametrize("seed", [0, 1])
def test_start_is_eclipse_fast_closed_form(seed) -> None:
    net = conv_net(seed) if seed else random_network(np.random.default_rng(3), [5, 9, 9, 9, 2])
    k_dense, t_dense = eclipse_multipliers(Lmi.from_chain(net.chain()))
    k_sparse, t_sparse = _Problem(SparseChain.from_chain(net.chain())).eclipse_start()
    assert k_sparse == pytest.approx(k_dense, rel=1e-8)
    for a, b in zip(t_sparse, t_dense, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-8)


def test_value_is_the_dense_certificate_and_gradient_is_finite_differences() -> None:
    net = conv_net(2)
    lmi = Lmi.from_chain(net.chain())
    problem = _Problem(SparseChain.from_chain(net.chain()))
    k, tp = problem.eclipse_start()
    rng = np.random.default_rng(1)
    t = tuple(1.1 * k * x * np.exp(0.2 * rng.standard_normal(x.shape)) for x in tp)
    point = problem.evaluate(t)
    assert point is not None
    # certify_rho adds float margins of relative size ~1e-9: a hair above the plain value
    assert certify_rho(lmi, t) == pytest.approx(point.rho, rel=1e-7)
    for j, i in [(0, 0), (0, 17), (1, 3), (2, 5)]:
        h = 1e-6 * t[j][i]
        up = [x.copy() for x in t]
        up[j][i] += h
        dn = [x.copy() for x in t]
        dn[j][i] -= h
        p_up, p_dn = problem.evaluate(tuple(up)), problem.evaluate(tuple(dn))
        assert p_up is not None and p_dn is not None
        fd = (p_up.rho - p_dn.rho) / (2 * h)
        assert point.grad[j][i] == pytest.approx(fd, rel=1e-3, abs=1e-6 * abs(point.rho / t[j][i]))


def test_infeasible_multipliers_are_refused_like_the_certificate() -> None:
    net = conv_net(3)
    problem = _Problem(SparseChain.from_chain(net.chain()))
    k, tp = problem.eclipse_start()
    tiny = tuple(1e-3 * k * x for x in tp)  # the last block 2 T - W_L^T W_L is indefinite
    assert problem.evaluate(tiny) is None
    with pytest.raises(CertificateError):
        certify_rho(Lmi.from_chain(net.chain()), tiny)


@pytest.mark.parametrize(("seed", "act"), [(4, "relu"), (6, "tanh")])
def test_between_lipsdp_optimum_lower_bound_and_start(seed, act) -> None:
    net = conv_net(seed, act=act)
    res = eclipse_refined_bound(net, timeout_s=120)  # stops by itself (PATIENCE) in seconds
    assert res.verified and res.method == "eclipse-refined"
    assert verify_on(net, res.certificate)
    opt = compute_bound(net, "lipsdp-neuron", solver="clarabel", lower_bound=False).value
    start = compute_bound(net, "eclipse-fast", lower_bound=False).value
    naive = compute_bound(net, "naive", lower_bound=False).value
    low = empirical_lower_bound(net, starts=16)
    assert low <= opt * (1 + 1e-9)
    assert res.value >= opt * (1 - 1e-7)  # a certified feasible point: never below the optimum
    assert res.value <= naive
    # the descent starts at eclipse-fast's closed-form direction; it gets close to the optimum
    # (0.03-0.3 % above it on these nets)
    assert res.value <= start
    assert res.value <= opt * 1.02


def test_certificate_round_trips_and_tampering_fails() -> None:
    net = conv_net(7)
    res = compute_bound(net, "eclipse-refined", lower_bound=False)
    assert res.certificate is not None
    cert = Certificate.from_json(res.certificate.to_json())
    lmi = Lmi.from_chain(net.chain())
    assert verify_on(net, cert) and verify_certificate(lmi, cert)
    assert not verify_certificate(lmi, replace(cert, rho=cert.rho * 0.9))
    shrunk = tuple(t * 1e-3 for t in cert.multipliers)
    assert not verify_certificate(lmi, replace(cert, multipliers=shrunk))


def test_auto_uses_it_on_a_conv_chain_too_large_for_lipsdp() -> None:
    net = conv_net(8, channels=4, side=24)  # 2304 + 576 + 8 hidden neurons > AUTO_HIDDEN_CAP
    # eclipse-refined descends until 85% of the time limit (30 s cost 30 s of wall clock); auto
    # runs it only if its certificate check (~2.3 s, estimated from a timed product) fits 60%
    # of that: 15 s leaves a 3x margin for a loaded machine (8 s failed once at load 6)
    res = compute_bound(net, "auto", timeout_s=15)
    assert res.method == "eclipse-refined" and res.verified
    assert any("eclipse-refined used" in n for n in res.notes)
    assert verify_on(net, res.certificate)
    assert res.lower_bound <= res.value < compute_bound(net, "naive", lower_bound=False).value


def test_refused_on_residual_networks() -> None:
    net, _ = _residual_net(np.random.default_rng(0))
    with pytest.raises(NotApplicable):
        check_bound_request(net, "eclipse-refined")


def test_certify_rho_lanczos_candidate_is_the_dense_one(monkeypatch) -> None:
    net = random_network(np.random.default_rng(9), [1_100, 40, 30, 4])  # input block > 1000
    lmi = Lmi.from_chain(net.chain())
    k, tp = eclipse_multipliers(lmi)
    t = tuple(1.01 * k * x for x in tp)
    fast = certify_rho(lmi, t)
    monkeypatch.setattr(certificate, "LANCZOS_MIN_DIM", 10**9)  # the dense eigvalsh path
    dense = certify_rho(lmi, t)
    assert fast == pytest.approx(dense, rel=1e-9)
    for rho in (fast, dense):
        assert verify_certificate(lmi, Certificate(rho=rho, multipliers=t))
