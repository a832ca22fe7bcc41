"""Closed-form maths of sandwich networks (numpy side, sdp.sandwich and sdp.bounds.sandwich)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sdp.bounds import compute_bound
from sdp.bounds.sandwich import closed_form_lmi, explicit_certificate, sandwich_bound
from sdp.certificate import Certificate, Lmi, certify_rho, verify_certificate
from sdp.errors import CertificateError, ModelRejected, NotApplicable
from sdp.ir import Activation, Dense, Network
from sdp.sandwich.config import (
    network_from_safetensors,
    params_from_safetensors,
    params_to_safetensors,
)
from sdp.sandwich.dense import (
    SandwichLayer,
    SandwichParams,
    cayley,
    plain_network,
    sandwich_forward,
)
from tests.sdp.sandwich_cases import random_params

SIZES = [[5, 8, 6, 3], [20, 10, 10, 4], [2, 16, 16, 1], [30, 12, 3], [6, 4]]


@given(
    p=st.integers(1, 12),
    q=st.integers(1, 12),
    scale=st.floats(0.01, 30.0),
    alpha=st.one_of(st.none(), st.floats(0.1, 20.0)),
    seed=st.integers(0, 2**31),
)
@settings(max_examples=40, deadline=None)
def test_cayley_gives_a_row_orthonormal_pair(p, q, scale, alpha, seed):
    xy = scale * np.random.default_rng(seed).standard_normal((q + p, q))
    a, b = cayley(xy, alpha)
    assert a.shape == (q, q) and b.shape == (q, p)
    np.testing.assert_allclose(a @ a.T + b @ b.T, np.eye(q), atol=1e-9)


def test_alpha_rescales_to_the_frobenius_norm():
    xy = np.random.default_rng(0).standard_normal((7, 3))
    a1, b1 = cayley(xy * (2.5 / np.linalg.norm(xy)))
    a2, b2 = cayley(3.0 * xy, 2.5)
    np.testing.assert_allclose(a1, a2, atol=1e-12)
    np.testing.assert_allclose(b1, b2, atol=1e-12)


@pytest.mark.parametrize("sizes", SIZES)
@pytest.mark.parametrize("act", ["relu", "tanh", "sigmoid", "leaky_relu"])
def test_plain_network_equals_sandwich_forward(sizes, act):
    rng = np.random.default_rng(1)
    params = random_params(rng, sizes, 3.0, activation=Activation(act, 0.1), d_scale=1.0)
    x = rng.standard_normal((9, sizes[0]))
    np.testing.assert_allclose(
        plain_network(params).forward(x), sandwich_forward(params, x), rtol=0, atol=1e-10
    )


def _gamma_psi2(params: SandwichParams, factor: float = 1.0) -> tuple[np.ndarray, ...]:
    return tuple(factor * params.gamma * layer.psi**2 for layer in params.hidden)


@pytest.mark.parametrize("sizes", [[5, 8, 6, 3], [20, 10, 10, 4], [40, 16, 16, 10]])
def test_explicit_certificate_is_gamma_psi_squared_not_half(sizes):
    """M(gamma^2, gamma Psi^2) <= 0 on the plain chain; T = gamma Psi^2 / 2 fails."""
    params = random_params(np.random.default_rng(2), sizes, 2.0)
    net = plain_network(params)
    lmi = Lmi.from_chain(net.chain())
    g = params.gamma
    rho = g * g * (1 + 1e-6)
    assert verify_certificate(lmi, Certificate(rho, _gamma_psi2(params)))
    assert not verify_certificate(lmi, Certificate(rho, _gamma_psi2(params, 0.5)))
    # the exact smallest rho for T = gamma Psi^2 is at most gamma^2 (up to the float margin)
    assert math.sqrt(certify_rho(lmi, _gamma_psi2(params))) <= g * (1 + 1e-6)
    # a clearly smaller rho does not verify with that T (the closed form is nearly tight)
    assert not verify_certificate(lmi, Certificate(0.25 * g * g, _gamma_psi2(params)))


def test_half_multipliers_cannot_certify_gamma_at_all():
    params = random_params(np.random.default_rng(3), [20, 10, 10, 4], 2.0)
    lmi = closed_form_lmi(params)
    try:
        rho = certify_rho(lmi, _gamma_psi2(params, 0.5))
    except CertificateError:
        return  # H(T) not even negative definite
    assert math.sqrt(rho) > params.gamma * 1.01


@pytest.mark.parametrize("slack", [1e-9, 1e-6, 1e-3])
def test_slacked_certificate_verifies_and_costs_what_it_says(slack):
    params = random_params(np.random.default_rng(4), [3, 12, 12, 2], 1.5)
    cert = explicit_certificate(params, slack=slack)
    lmi = closed_form_lmi(params)
    assert verify_certificate(lmi, cert)
    assert cert.rho == pytest.approx(1.5**2 * (1 - slack) ** -2, rel=1e-12)


@pytest.mark.parametrize("sizes", SIZES)
def test_sandwich_bound_confirms_gamma(sizes):
    params = random_params(np.random.default_rng(5), sizes, 4.0, d_scale=0.8)
    result = sandwich_bound(plain_network(params))
    assert result.verified and result.method == "sandwich"
    assert result.value <= 4.0 * (1 + 1e-6)
    assert result.certificate is not None
    assert result.certificate.meta["closed_form_confirmed"] is True
    assert verify_certificate(closed_form_lmi(params), result.certificate)
    # certified >= empirical: Jacobian norms at random points
    net = plain_network(params)
    w = [op.weight for op in net.ops if isinstance(op, Dense)]
    rng = np.random.default_rng(6)
    for _ in range(20):
        x = rng.standard_normal(sizes[0])
        jac, h = np.eye(sizes[0]), x
        for wk, op in zip(w[:-1], [op for op in net.ops if isinstance(op, Dense)], strict=False):
            u = op.apply(h[None])[0]
            jac = ((u > 0)[:, None] * wk) @ jac
            h = np.maximum(u, 0)
        jac = w[-1] @ jac
        assert np.linalg.norm(jac, 2) <= result.value * (1 + 1e-9)


def test_metadata_gamma_is_a_claim_not_a_fact():
    """A file whose metadata claims a smaller gamma than its scale tensor is not confirmed."""
    params = random_params(np.random.default_rng(7), [10, 8, 8, 3], 2.0)
    tensors, config = params_to_safetensors(params)
    config["gamma"] = 1.0  # the claim; log_gamma still says 2
    res = sandwich_bound(network_from_safetensors(tensors, config))
    assert res.certificate is not None
    assert res.certificate.meta["closed_form_confirmed"] is False
    assert res.value > 1.0 and any("NOT confirmed" in n for n in res.notes)


def test_tampered_ops_are_refused():
    params = random_params(np.random.default_rng(8), [6, 5, 2], 1.0)
    net = plain_network(params)
    w0 = net.ops[0]
    assert isinstance(w0, Dense)
    bad = Network(net.input_shape, (Dense(2 * w0.weight, w0.bias), *net.ops[1:]), sandwich=params)
    with pytest.raises(CertificateError):
        sandwich_bound(bad)
    with pytest.raises(NotApplicable):
        sandwich_bound(Network(net.input_shape, net.ops))


def test_activations_outside_zero_one_are_not_applicable():
    params = random_params(np.random.default_rng(9), [4, 5, 2], 1.0, activation=Activation("gelu"))
    with pytest.raises(NotApplicable):
        sandwich_bound(plain_network(params))


@pytest.mark.parametrize(
    "activation", [Activation("gelu"), Activation("silu"), Activation("leaky_relu", 2.0)]
)
def test_auto_falls_back_when_the_closed_form_does_not_apply(activation, tmp_path):
    """A sandwich file whose slopes leave [0, 1] is accepted by the importer; ``auto`` then
    bounds it as a plain network (LipSDP / naive) instead of failing method-not-applicable,
    and only the explicit method "sandwich" refuses it."""
    params = random_params(np.random.default_rng(11), [4, 6, 5, 2], 1.5, activation=activation)
    tensors, config = params_to_safetensors(params)
    net = network_from_safetensors(tensors, config)
    assert net.sandwich is not None
    res = compute_bound(net, "auto")
    assert res.verified and res.method in ("lipsdp-neuron", "naive")
    assert any("sandwich check not applicable" in n for n in res.notes)
    assert res.lower_bound <= res.value
    with pytest.raises(NotApplicable):
        compute_bound(net, "sandwich")


def test_safetensors_config_round_trip():
    params = random_params(np.random.default_rng(10), [12, 7, 5, 3], 2.5)
    tensors, config = params_to_safetensors(params)
    back = params_from_safetensors(tensors, config)
    x = np.random.default_rng(11).standard_normal((4, 12))
    np.testing.assert_allclose(sandwich_forward(back, x), sandwich_forward(params, x), atol=1e-12)
    net = network_from_safetensors(tensors, config)
    assert net.kind == "sandwich" and isinstance(net.sandwich, SandwichParams)


def _mutations():
    yield "missing tensor", lambda t, c: t.pop("layers.0.XY")
    yield "wrong shape", lambda t, c: t.__setitem__("layers.0.d", np.zeros(3))
    yield "nan", lambda t, c: t["layers.1.XY"].__setitem__((0, 0), np.nan)
    yield "sizes", lambda t, c: c["layers"][1].__setitem__("in", 99)
    yield "format", lambda t, c: c.__setitem__("format", "other/9")
    yield "gamma", lambda t, c: c.__setitem__("gamma", -1.0)
    yield "activation", lambda t, c: c["layers"][0].__setitem__("activation", "os.system")
    yield "activation list", lambda t, c: c["layers"][0].__setitem__("activation", ["relu"])
    yield "layer type", lambda t, c: c["layers"][0].__setitem__("type", "sandwich_output")
    yield "huge d", lambda t, c: t.__setitem__("layers.0.d", np.full(7, 1e4))
    yield "string dtype", lambda t, c: t.__setitem__("layers.0.b", np.array(["a"] * 7))
    yield "activation param", lambda t, c: c["layers"][0].__setitem__("activation_param", "x")
    yield "alpha nan", lambda t, c: _set_alpha(t, c, np.array([np.nan]))
    yield "alpha shape", lambda t, c: _set_alpha(t, c, np.ones(2))


def _set_alpha(tensors, config, alpha):
    tensors["layers.0.alpha"] = alpha
    config["layers"][0]["tensors"]["alpha"] = "layers.0.alpha"


@pytest.mark.parametrize(("what", "mutate"), list(_mutations()), ids=[m[0] for m in _mutations()])
def test_bad_configs_are_rejected(what, mutate):
    params = random_params(np.random.default_rng(12), [12, 7, 3], 2.5)
    tensors, config = params_to_safetensors(params)
    tensors = {k: np.array(v) for k, v in tensors.items()}
    mutate(tensors, config)
    with pytest.raises(ModelRejected):
        network_from_safetensors(tensors, config)


def test_no_hidden_layer_is_a_scaled_contraction():
    rng = np.random.default_rng(13)
    out = SandwichLayer("sandwich_output", rng.standard_normal((9, 3)), np.zeros(3))
    params = SandwichParams(3.0, (out,), (6,), 3.0)
    res = sandwich_bound(plain_network(params))
    assert res.value <= 3.0 * (1 + 1e-6)
    _, b = out.cayley()
    assert res.value >= 3.0 * np.linalg.norm(b, 2) * (1 - 1e-9)
