"""Property tests: every reported bound is sound and verified, on random small networks."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sdp.bounds import compute_bound, empirical_lower_bound
from sdp.certificate import Certificate, Lmi, certify_multipliers, verify_certificate
from sdp.solvers import available_solvers
from tests.sdp._nets import random_network

ACTIVATIONS = [
    ("relu", 0.0),
    ("leaky_relu", 0.1),
    ("leaky_relu", -0.3),
    ("tanh", 0.0),
    ("sigmoid", 0.0),
    ("elu", 1.0),
    ("softplus", 0.0),
    ("gelu", 0.0),
    ("silu", 0.0),
    ("identity", 0.0),
]

nets = st.builds(
    lambda seed, act, depth, widths: (seed, act, [widths[0], *widths[1 : depth + 1], widths[-1]]),
    st.integers(0, 2**31 - 1),
    st.sampled_from(ACTIVATIONS),
    st.integers(1, 5),
    st.lists(st.integers(2, 6), min_size=7, max_size=7),
)

SETTINGS = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)


def _build(spec):
    seed, (act, param), sizes = spec
    return random_network(np.random.default_rng(seed), sizes, act, param)


@SETTINGS
@given(nets)
def test_lipsdp_is_sound_verified_and_below_naive(spec):
    net = _build(spec)
    res = compute_bound(net, "lipsdp-neuron", lower_bound=False)
    naive = compute_bound(net, "naive", lower_bound=False)
    lower = empirical_lower_bound(net, starts=16, iters=8, refine_steps=4)
    assert res.verified
    lmi = Lmi.from_chain(net.chain())
    assert verify_certificate(lmi, res.certificate)
    assert lower <= res.value * (1 + 1e-9)
    assert lower <= naive.value * (1 + 1e-9)
    alpha = min(float(a.min()) for a in lmi.alpha)
    if alpha >= 0:  # slopes in [a, b] with a >= 0: LipSDP (layer multipliers) <= norms product
        assert res.value <= naive.value * (1 + 1e-6)

    # tampering: 1 % less rho is below rho(T), the smallest certifiable rho for this T
    c = res.certificate
    low = Certificate(c.rho * 0.99, c.multipliers, c.output_map, c.network_hash)
    assert not verify_certificate(lmi, low)
    # T = 0 leaves W_L^T W_L uncancelled: H(0) is not negative definite
    zero = Certificate(c.rho, tuple(np.zeros_like(t) for t in c.multipliers))
    assert not verify_certificate(lmi, zero) or not np.any(lmi.weights[-1])


@SETTINGS
@given(nets, st.sampled_from([0.5, 0.1, 0.0]))
def test_perturbed_multipliers_are_repaired_never_trusted(spec, scale):
    net = _build(spec)
    lmi = Lmi.from_chain(net.chain())
    res = compute_bound(net, "lipsdp-neuron", lower_bound=False)
    bad = tuple(scale * t for t in res.certificate.multipliers)
    rep = certify_multipliers(lmi, bad)
    cert = Certificate(rep.rho, rep.multipliers)
    assert verify_certificate(lmi, cert)
    assert np.sqrt(rep.rho) >= empirical_lower_bound(net, starts=8, iters=6, refine_steps=0)
    assert rep.rho >= res.certificate.rho * (1 - 1e-6) or rep.note == "verified solver multipliers"


@pytest.mark.skipif("clarabel" not in available_solvers(), reason="clarabel not installed")
@settings(max_examples=5, deadline=None, derandomize=True)
@given(nets)
def test_cvxpy_path_is_sound(spec):
    net = _build(spec)
    res = compute_bound(net, "lipsdp-neuron", solver="clarabel", lower_bound=False)
    assert res.solver in ("clarabel", None) and res.verified  # None: all layers linear
    assert verify_certificate(Lmi.from_chain(net.chain()), res.certificate)
    assert empirical_lower_bound(net, starts=16, iters=8, refine_steps=4) <= res.value
