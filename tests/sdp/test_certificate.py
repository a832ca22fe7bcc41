"""Certificates: JSON round trip, layer-wise T always verifies, repairs never report less."""

from __future__ import annotations

import numpy as np
import pytest

from sdp.bounds.lipsdp import pairwise_bounds
from sdp.certificate import (
    Certificate,
    Lmi,
    certify_multipliers,
    certify_rho,
    layerwise_multipliers,
    verify_certificate,
    verify_on,
)
from sdp.errors import CertificateError
from sdp.ir import Activation, Dense, Network
from tests.sdp._nets import random_network


@pytest.mark.parametrize("act", ["relu", "tanh", "sigmoid", "gelu", "leaky_relu"])
def test_layerwise_certificate_is_valid_and_above_lower_bound(act):
    from sdp.bounds import empirical_lower_bound

    net = random_network(np.random.default_rng(0), [3, 7, 5, 4, 2], act, 0.1)
    lmi = Lmi.from_chain(net.chain())
    t0 = layerwise_multipliers(lmi)
    rho = certify_rho(lmi, t0)
    assert verify_certificate(lmi, Certificate(rho, t0))
    assert np.sqrt(rho) >= empirical_lower_bound(net, starts=16, iters=8, refine_steps=2)


def test_json_round_trip_and_garbage():
    net = random_network(np.random.default_rng(1), [3, 4, 2])
    lmi = Lmi.from_chain(net.chain())
    rep = certify_multipliers(lmi, layerwise_multipliers(lmi))
    cert = Certificate(rep.rho, rep.multipliers, None, net.content_hash(), {"method": "x"})
    back = Certificate.from_json(cert.to_json())
    assert back.rho == cert.rho and back.network_hash == cert.network_hash
    assert all(
        np.array_equal(a, b) for a, b in zip(back.multipliers, cert.multipliers, strict=True)
    )
    assert verify_certificate(lmi, back)
    with pytest.raises(CertificateError):
        Certificate.from_json('{"format": "other"}')


def test_wrong_shapes_and_negative_multipliers_do_not_verify():
    net = random_network(np.random.default_rng(2), [3, 4, 4, 2])
    lmi = Lmi.from_chain(net.chain())
    t = layerwise_multipliers(lmi)
    rho = certify_rho(lmi, t)
    assert not verify_certificate(lmi, Certificate(rho, t[:1]))
    neg = (-t[0], t[1])
    assert not verify_certificate(lmi, Certificate(rho, neg))
    assert not verify_certificate(lmi, Certificate(float("nan"), t))


def test_pairwise_output_map_certificate_bounds_the_difference():
    net = random_network(np.random.default_rng(3), [3, 6, 3])
    row = np.array([[1.0, -1.0, 0.0]])
    lmi_p = Lmi.from_chain(net.chain(), output_map=row)
    t = layerwise_multipliers(lmi_p)
    cert = Certificate(certify_rho(lmi_p, t), t, row)
    assert verify_certificate(lmi_p, cert)
    rng = np.random.default_rng(4)
    x, d = rng.standard_normal((500, 3)), 1e-3 * rng.standard_normal((500, 3))
    g = (net.forward(x + d) - net.forward(x)) @ row.T
    assert np.max(np.abs(g[:, 0]) / np.linalg.norm(d, axis=1)) <= np.sqrt(cert.rho)


def test_an_output_map_is_applied_without_cancellation() -> None:
    """P W_L with three terms per entry: BLAS sums 1e20 + 1e20 2^-60 - 1e20 to 0, a zero last
    layer, and the scaled certificate of that LMI claimed Lip(P f) <= 1e-105 for a P f whose
    slope along e_1 is about 100 here; verify_on accepted it. The map is now applied with every
    entry correctly rounded (mapped_output), so the forged certificate is refused, and a
    pairwise row e_y - e_j is BLAS's product as before."""
    from fractions import Fraction

    from sdp.bounds.residual import DagLmi
    from sdp.certificate import first_zero_layer, mapped_output, zero_layer_multipliers

    rng = np.random.default_rng(0)
    w0 = 10.0 * rng.standard_normal((4, 2))
    w_last = 1e20 * np.array([[1.0] * 4, [2.0**-60] * 4, [1.0] * 4])
    net = Network((2,), (Dense(w0, np.zeros(4)), Activation("relu"), Dense(w_last, np.zeros(3))))
    p = np.array([[1.0, 1.0, -1.0]])
    exact = float(Fraction(1e20) + Fraction(1e20 * 2.0**-60) - Fraction(1e20))
    lmi = Lmi.from_chain(net.chain(), output_map=p)
    assert lmi.weights[-1].tolist() == [[exact] * 4] and first_zero_layer(lmi) is None
    assert DagLmi.from_network(net, output_map=p).output[-1][1].tolist() == [[exact] * 4]
    blas = Lmi((w0, p @ w_last), lmi.alpha, lmi.beta)  # what the LMI was built from before
    assert first_zero_layer(blas) == 1
    t = zero_layer_multipliers(blas, 1)
    forged = Certificate(certify_rho(blas, t), t, p)
    assert forged.lipschitz_bound < 1e-100 and not verify_on(net, forged)
    # exactly, P f(x) = exact * sum(relu(W_0 x)) (a float forward pass cancels it to 0 too)
    x, d = rng.standard_normal(2), np.array([1e-3, 0.0])
    z0, z1 = np.maximum(w0 @ x, 0.0), np.maximum(w0 @ (x + d), 0.0)
    assert exact * abs(z1.sum() - z0.sum()) / 1e-3 > 1.0  # a lower bound of Lip(P f)
    pair = np.array([[0.0, 1.0, -1.0], [-3.0, 0.0, 0.0]])  # one rounding per entry: BLAS's
    assert np.array_equal(mapped_output(pair, w_last), pair @ w_last)


def test_verify_on_applies_the_certificates_output_map() -> None:
    """verify_on builds the LMI of the network with the certificate's own output map: a
    pairwise certificate verifies on the network, and the same (rho, T) without its map (what
    verify_certificate on a hand-built LMI would check) is not taken for it."""
    rng = np.random.default_rng(3)
    net = Network(
        (4,),
        (
            Dense(rng.standard_normal((6, 4)), np.zeros(6)),
            Activation("relu"),
            Dense(3.0 * rng.standard_normal((3, 6)), np.zeros(3)),
        ),
    )
    _, certs, _ = pairwise_bounds(net, "neuron")
    for cert in certs:
        assert cert.output_map is not None
        assert verify_on(net, cert)
    # the same certificates checked on the LMI of f itself (the map forgotten) do not all hold
    plain = Lmi.from_chain(net.chain())
    assert not all(verify_certificate(plain, cert) for cert in certs)
    widest = max(certs, key=lambda c: c.rho)
    too_small = Certificate(widest.rho * 0.25, widest.multipliers, widest.output_map)
    assert not verify_on(net, too_small)
    wrong_shape = Certificate(widest.rho, (np.ones(5),), widest.output_map)
    assert not verify_on(net, wrong_shape)
