"""Consecutive affine layers are composed in float64 (``Network.chain``): the chain carries a
bound of each composite's rounding and the LMI check proves the bound for every exact weight
within it (review, session 11: a product that cancels to 0 made LipSDP certify 1.9e-106 for a
network of Lipschitz constant >= 306)."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sdp.bounds.compute import compute_bound
from sdp.certificate import Lmi, certify_rho, layerwise_multipliers, verify_on
from sdp.errors import CertificateError, LipcertError
from sdp.ir import Activation, Dense, Network, composition_error


def _exact_product(a: np.ndarray, b: np.ndarray) -> list[list[Fraction]]:
    return [
        [
            sum(
                (Fraction(float(a[i, k])) * Fraction(float(b[k, j])) for k in range(a.shape[1])),
                Fraction(0),
            )
            for j in range(b.shape[1])
        ]
        for i in range(a.shape[0])
    ]


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 4),
    st.integers(1, 6),
    st.integers(1, 4),
    st.integers(0, 2**32 - 1),
    st.sampled_from([1.0, 1e20, 1e-30]),
)
def test_composition_error_bounds_the_exact_rounding(
    m: int, k: int, n: int, seed: int, scale: float
):
    """||fl(A B) - A B||_F (exact, in rationals) <= composition_error(A, B), also where the
    float product cancels (entries 1 and 2^-60 of one scale)."""
    rng = np.random.default_rng(seed)
    a = rng.choice([-1.0, 1.0, 2.0**-60, 0.5], size=(m, k)) * scale
    b = rng.choice([-1.0, 1.0, 3.0, 2.0**-60], size=(k, n))
    fl = a @ b
    exact = _exact_product(a, b)
    err2 = sum((Fraction(float(fl[i, j])) - exact[i][j]) ** 2 for i in range(m) for j in range(n))
    bound = composition_error(a, b)
    assert err2 <= Fraction(bound) ** 2


def _cancelling_net() -> Network:
    w_a = np.array([[1.0], [2.0], [0.5], [1.5]])
    w_1 = 1e20 * np.array([[1.0] * 4, [2.0**-60] * 4, [1.0] * 4])  # no activation after it
    w_2 = np.array([[-1.0, -1.0, 1.0], [0.0, 0.0, 0.0]])
    return Network(
        (1,),
        (
            Dense(w_a, np.zeros(4)),
            Activation("relu"),
            Dense(w_1, np.zeros(3)),
            Dense(w_2, np.array([1.0, 0.0])),
        ),
    )


def test_a_cancelling_composite_is_not_taken_as_exact():
    """The float composite of W_2 W_1 is 0 (the network looks constant); the exact function's
    f(1) - f(0) is 433.68 (in rationals), so every certified bound must be at least that."""
    net = _cancelling_net()
    chain = net.chain()
    assert not np.any(chain.weights()[-1])  # the float product cancelled
    assert chain.errors()[-1] > 0
    exact_gap = 433.68  # |f(1) - f(0)| of the real-arithmetic function, by Fraction
    for method in ("lipsdp-neuron", "lipsdp-layer"):
        res = compute_bound(net, method, lower_bound=False)
        assert res.verified and res.value >= exact_gap
        assert not any("constant" in n for n in res.notes)
    lmi = Lmi.from_chain(chain)
    t = [np.full(n, 1e-200) for n in lmi.hidden_sizes]  # the zero-layer certificate before
    try:
        rho = certify_rho(lmi, t)
    except CertificateError:
        return
    assert rho >= exact_gap**2


def test_exact_chains_carry_no_error_and_certify_as_before():
    """A chain without consecutive affine layers has no error bounds: nothing changes."""
    rng = np.random.default_rng(0)
    net = Network(
        (5,),
        (
            Dense(rng.normal(size=(7, 5)), np.zeros(7)),
            Activation("relu"),
            Dense(rng.normal(size=(3, 7)), np.zeros(3)),
        ),
    )
    chain = net.chain()
    assert chain.weight_errors == () and Lmi.from_chain(chain).weight_errors == ()


def test_a_composite_chain_certifies_and_verifies_with_its_error():
    """An ordinary net with two affine layers in a row: the bound holds (above the exact
    chain's own bound, by a rounding-sized amount) and verify_on re-proves the certificate."""
    rng = np.random.default_rng(4)
    w0, w1, w2 = rng.normal(size=(8, 6)), rng.normal(size=(5, 8)), rng.normal(size=(3, 5))
    composed = Network(
        (6,),
        (
            Dense(w0, np.zeros(8)),
            Activation("tanh"),
            Dense(w1, np.zeros(5)),
            Dense(w2, np.zeros(3)),
        ),
    )
    lmi = Lmi.from_chain(composed.chain())
    assert lmi.weight_errors and lmi.weight_errors[-1] > 0
    rho = certify_rho(lmi, layerwise_multipliers(lmi))
    exact_rho = certify_rho(Lmi((w0, w2 @ w1), lmi.alpha, lmi.beta), layerwise_multipliers(lmi))
    assert rho >= exact_rho and rho == pytest.approx(exact_rho, rel=1e-9)
    res = compute_bound(composed, "lipsdp-neuron", lower_bound=False)
    assert res.verified and res.certificate is not None and verify_on(composed, res.certificate)


def test_composition_error_survives_underflow():
    """At 1e-170 the squares of np.linalg.norm underflow (the bound was 0.0 for a product that
    cancels to 0 but is exactly 1e-170 2^-60), and a product of 1e-200s underflows to 0."""
    a = 1e-170 * np.array([[1.0, 2.0**-60, -1.0]])
    b = np.ones((3, 1))
    assert not np.any(a @ b)
    assert Fraction(composition_error(a, b)) >= Fraction(1e-170) * Fraction(2.0**-60)
    assert composition_error(np.array([[1e-200]]), np.array([[1e-200]])) > 0
    assert composition_error(np.zeros((2, 3)), np.ones((3, 2))) == 0.0  # exact: 0 A = 0


def _tiny_composite_net(gain: float) -> Network:
    """x -> gain relu(gain relu(c x)): the first composite cancels to 0 in float64 at 1e-170
    (exactly c = 1e-170 2^-60), the two later layers scale by ``gain`` each."""
    w_1 = 1e-170 * np.array([[1.0], [2.0**-60], [1.0]])
    return Network(
        (1,),
        (
            Dense(w_1, np.zeros(3)),
            Dense(np.array([[-1.0, 1.0, 1.0]]), np.zeros(1)),
            Activation("relu"),
            Dense(np.array([[gain]]), np.zeros(1)),
            Activation("relu"),
            Dense(np.array([[gain]]), np.zeros(1)),
        ),
    )


def test_a_tiny_cancelling_composite_is_not_taken_as_constant():
    """The first composite cancels at 1e-170 (exactly 1e-170 2^-60 x), the later layers scale
    by 1e120: Lip f >= 8.67e-69 by exact rationals; certified 1.5e-154 ('constant') before."""
    net = _tiny_composite_net(1e60)
    exact_gap = Fraction(1e60) * Fraction(1e60) * Fraction(1e-170) * Fraction(2.0**-60)
    res = compute_bound(net, "lipsdp-layer", lower_bound=False)
    assert res.verified and Fraction(res.value) >= exact_gap


def test_auto_falls_back_when_the_composite_is_too_loose_for_lipsdp():
    """A first-layer composite whose error bound (~1e4) no multiplier can cover: LipSDP
    refuses (certificate-infeasible) and auto reports the naive bound instead of failing."""
    w_1 = 1e20 * np.array([[1.0] * 4, [2.0**-60] * 4, [1.0] * 4])
    net = Network(
        (4,),
        (
            Dense(w_1, np.zeros(3)),
            Dense(np.array([[-1.0, -1.0, 1.0], [0.0, 0.0, 0.0]]), np.zeros(2)),
            Activation("relu"),
            Dense(np.eye(2), np.zeros(2)),
        ),
    )
    with pytest.raises(CertificateError):
        compute_bound(net, "lipsdp-neuron", lower_bound=False)
    res = compute_bound(net, "auto", lower_bound=False)
    # exact |f(-1) - f(0)| / ||1||: 4e20 2^-60 / 2 = 173.5 (the float composite is 0)
    assert res.verified and res.method == "naive" and res.value >= 173.5
    assert any("LipSDP not used" in n for n in res.notes)


def test_cancelled_and_overflowing_scales_are_refused_not_crashed():
    """A composite that cancels to 0 made eclipse take log(0) (ValueError); weights of 1e100
    overflowed the layer-wise certificate and eclipse's blocks (ValueError from scipy). Each
    is a LipcertError now, and auto reports a verified bound (the exact |f(1) - f(0)| of the
    1e100 net is 8.7e11)."""
    tail = _cancelling_net()
    with pytest.raises(LipcertError):
        compute_bound(tail, "eclipse-fast", lower_bound=False)
    big = _tiny_composite_net(1e100)
    for method in ("lipsdp-neuron", "eclipse-fast"):
        with pytest.raises(LipcertError):
            compute_bound(big, method, lower_bound=False)
    res = compute_bound(big, "auto", lower_bound=False)
    assert res.verified and res.value >= 8.7e11
