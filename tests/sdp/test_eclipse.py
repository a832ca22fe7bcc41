"""eclipse-fast: closed-form per-layer LipSDP-Neuron multipliers, certified (sdp.bounds.eclipse).

Every value is checked against independent numbers: the LipSDP-Neuron optimum (interior
point, below it), the naive product and an empirical lower bound (above / below it), and the
certificate itself (re-verified; a tampered one must fail).
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import pytest

from sdp.bounds import compute_bound, empirical_lower_bound
from sdp.bounds.compute import AUTO_HIDDEN_CAP
from sdp.bounds.eclipse import eclipse_fast_bound, eclipse_fast_multipliers
from sdp.certificate import Lmi, verify_certificate, verify_on
from sdp.errors import NotApplicable
from tests.sdp._nets import random_network
from tests.sdp.test_bounds import _residual_net

CASES = [
    ([5, 10, 10, 3], "relu", 0.0, 0),
    ([8, 20, 20, 20, 4], "relu", 0.0, 1),
    ([6, 12, 12, 12, 12, 5], "leaky_relu", 0.1, 2),
    ([4, 16, 16, 3], "tanh", 0.0, 3),
]


@pytest.mark.parametrize(("sizes", "act", "param", "seed"), CASES)
def test_between_lipsdp_optimum_lower_bound_and_naive(sizes, act, param, seed) -> None:
    net = random_network(np.random.default_rng(seed), sizes, act, param)
    res = eclipse_fast_bound(net)
    assert res.verified and res.method == "eclipse-fast"
    assert verify_on(net, res.certificate)
    opt = compute_bound(net, "lipsdp-neuron", lower_bound=False).value
    naive = compute_bound(net, "naive", lower_bound=False).value
    low = empirical_lower_bound(net, starts=16)
    assert low <= opt * (1 + 1e-9) <= res.value * (1 + 1e-9)
    assert res.value <= naive
    # the scaling search only ever improves on the closed-form point k* (also certified)
    assert res.certificate.rho <= res.certificate.meta["closed_form_rho"] * 1.01


def test_tampered_certificate_fails() -> None:
    net = random_network(np.random.default_rng(5), [6, 15, 15, 15, 3])
    cert = eclipse_fast_bound(net).certificate
    lmi = Lmi.from_chain(net.chain())
    assert verify_certificate(lmi, cert)
    assert not verify_certificate(lmi, replace(cert, rho=cert.rho * 0.5))
    shrunk = tuple(t * 1e-3 for t in cert.multipliers)  # H(T) no longer negative definite
    assert not verify_certificate(lmi, replace(cert, multipliers=shrunk))


def test_multipliers_are_one_positive_scalar_per_layer() -> None:
    net = random_network(np.random.default_rng(7), [5, 9, 9, 9, 2])
    k_star, t = eclipse_fast_multipliers(Lmi.from_chain(net.chain()))
    assert k_star > 0 and len(t) == 3
    for tj in t:
        assert np.all(tj > 0) and np.ptp(tj) == 0


def test_refused_on_residual_and_mixed_sign_slopes() -> None:
    res_net, _ = _residual_net(np.random.default_rng(8))
    with pytest.raises(NotApplicable):
        compute_bound(res_net, "eclipse-fast", lower_bound=False)
    with pytest.raises(NotApplicable):
        eclipse_fast_multipliers(Lmi((np.eye(3), np.eye(3)), (np.full(3, -0.5),), (np.ones(3),)))


def test_deep_chain_100_by_80_is_fast_and_auto_uses_it() -> None:
    net = random_network(np.random.default_rng(9), [80] * 101 + [10])
    t0 = time.perf_counter()
    res = compute_bound(net, "auto", lower_bound=False)
    elapsed = time.perf_counter() - t0
    assert sum(net.chain().hidden_sizes) > AUTO_HIDDEN_CAP
    assert res.method == "eclipse-fast" and res.verified
    assert verify_on(net, res.certificate)
    naive = compute_bound(net, "naive", lower_bound=False).value
    assert res.value < naive * 1e-6  # random deep nets: many orders of magnitude tighter
    assert elapsed < 60  # generous (takes ~1 s); the speed target itself is in bench_deep.py


@pytest.mark.parametrize(("sizes", "act", "param", "seed"), CASES[:3])
def test_eclipse_per_layer_sdp_is_verified_and_between_lipsdp_and_naive(
    sizes, act, param, seed
) -> None:
    net = random_network(np.random.default_rng(seed), sizes, act, param)
    res = compute_bound(net, "eclipse", lower_bound=False)
    assert res.verified and res.method == "eclipse"
    assert verify_on(net, res.certificate)
    # one multiplier per neuron (not forced equal within a layer)
    assert len(res.certificate.multipliers) == len(sizes) - 2
    opt = compute_bound(net, "lipsdp-neuron", lower_bound=False).value
    naive = compute_bound(net, "naive", lower_bound=False).value
    assert opt * (1 - 1e-9) <= res.value <= naive


def test_eclipse_per_layer_sdp_is_capped_to_small_chains() -> None:
    net = random_network(np.random.default_rng(10), [8, 100, 8, 3])
    with pytest.raises(NotApplicable):
        compute_bound(net, "eclipse", lower_bound=False)
    assert compute_bound(net, "eclipse-fast", lower_bound=False).verified
