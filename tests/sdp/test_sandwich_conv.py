"""Convolutional sandwich maths in numpy: per-frequency Cayley, exact Conv2d export, and the
per-frequency closed-form check (cross-checked against the dense-unrolled LipSDP LMI)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sdp.bounds import sandwich as sandwich_check
from sdp.bounds.sandwich import conv_sandwich_bound, frequency_lmis, layer_rho, sandwich_bound
from sdp.certificate import Lmi, certify_rho, verify_certificate
from sdp.errors import CertificateError, ModelRejected, NotApplicable
from sdp.ir import Conv2d, Dense, Network
from sdp.sandwich import conv as sandwich_conv
from sdp.sandwich.config import network_from_safetensors, params_to_safetensors
from sdp.sandwich.conv import (
    ConvSandwichLayer,
    ConvSandwichParams,
    conv_forward,
    depth_to_space,
    freq_apply,
    plain_network,
    space_to_depth,
)
from sdp.sandwich.dense import SandwichLayer, SandwichParams
from tests.sdp.sandwich_cases import random_conv_params

ARCHS = [
    ((1, 8, 8), [(2, 1), (3, 2)]),  # widening layers, stride 2
    ((2, 6, 6), [(2, 1)]),
    ((3, 6, 6), [(4, 2), (2, 1)]),  # odd grid 3; narrowing after stride 2 (p = 12 > q = 4)
]


def _params(seed: int, shape, layers, gamma: float = 2.0, **kw) -> ConvSandwichParams:
    return random_conv_params(np.random.default_rng(seed), shape, layers, 3, gamma, **kw)


@pytest.mark.parametrize(("shape", "layers"), ARCHS)
def test_per_frequency_cayley_is_orthogonal(shape, layers):
    p = _params(0, shape, layers)
    for layer in p.convs:
        a_h, b_h = layer.factors()
        gram = np.conj(a_h).transpose(0, 2, 1) @ a_h + np.conj(b_h).transpose(0, 2, 1) @ b_h
        np.testing.assert_allclose(
            gram, np.broadcast_to(np.eye(layer.out_channels), gram.shape), atol=1e-12
        )
        # conjugate symmetry on the self-conjugate rfft column v = 0: row u and row -u
        m = layer.grid
        a_grid = a_h.reshape(m, m // 2 + 1, *a_h.shape[1:])
        np.testing.assert_allclose(a_grid[1:, 0], np.conj(a_grid[:0:-1, 0]), atol=1e-12)


def test_alpha_rescaling_is_a_reparameterisation():
    p = _params(1, (1, 6, 6), [(2, 1)])
    layer = p.convs[0]
    norm = float(np.linalg.norm(layer.xy))
    scaled = ConvSandwichLayer(3.0 * layer.xy, layer.b, layer.d, layer.in_shape, 1, norm)
    for a, b in zip(layer.factors(), scaled.factors(), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-12)


def test_space_to_depth_is_an_inverse_permutation():
    x = np.random.default_rng(0).standard_normal((2, 3, 6, 6))
    s = space_to_depth(x, 2)
    assert s.shape == (2, 12, 3, 3)
    assert s[1, 3 * 4 - 4 + 1 * 2 + 1, 2, 1] == x[1, 2, 5, 3]  # channel c*4 + a*2 + b
    np.testing.assert_array_equal(depth_to_space(s, 2), x)


@pytest.mark.parametrize("as_conv", [False, True])
@pytest.mark.parametrize(("shape", "layers"), ARCHS)
def test_exported_plain_network_equals_sandwich_forward(shape, layers, as_conv, monkeypatch):
    if as_conv:  # force the big-kernel Conv2d export instead of the unrolled Dense one
        monkeypatch.setattr(sandwich_conv, "DENSE_EXPORT_MAX", 0)
    p = _params(2, shape, layers)
    net = plain_network(p)
    kinds = {type(op).__name__ for op in net.ops[:-1:2]}
    assert kinds == ({"Conv2d"} if as_conv else {"Dense"})
    x = np.random.default_rng(3).standard_normal((7, math.prod(shape)))
    np.testing.assert_allclose(net.forward(x), conv_forward(p, x), atol=1e-12, rtol=0)


@pytest.mark.parametrize("as_conv", [False, True])
def test_export_is_the_circular_linear_map(as_conv, monkeypatch):
    """The exported first op equals the layer's linear part applied to unit impulses."""
    if as_conv:
        monkeypatch.setattr(sandwich_conv, "DENSE_EXPORT_MAX", 0)
    p = _params(4, (2, 6, 6), [(3, 2)])
    layer = p.convs[0]
    conv = plain_network(p).ops[0]
    assert isinstance(conv, Conv2d if as_conv else Dense)
    basis = np.eye(72).reshape(72, 2, 6, 6)
    _, b_h = layer.factors()

    u = math.sqrt(2) * freq_apply(np.conj(b_h).transpose(0, 2, 1), space_to_depth(basis, 2))
    expected = math.sqrt(p.gamma) * u / layer.psi[:, None, None]
    np.testing.assert_allclose(conv.matrix().T, expected.reshape(72, -1), atol=1e-12)


@pytest.mark.parametrize(("shape", "layers"), ARCHS)
def test_closed_form_check_verifies_gamma_and_matches_dense_lipsdp(shape, layers):
    p = _params(5, shape, layers, gamma=3.0)
    net = plain_network(p)
    res = sandwich_bound(net)  # dispatches on the parameters to the per-frequency check
    assert res.method == "sandwich" and res.verified
    assert res.certificate.meta["per_frequency"] and res.certificate.meta["closed_form_confirmed"]
    assert res.value <= 3.0 * (1 + 1e-6)
    assert res.certificate.meta["dense_verified"] is True  # small: re-verified on the ops
    # sound: never below the spectral norm of any linearisation (here: all ReLUs active)
    ws = [np.asarray(w) for w in net.chain().weights()]
    lin = ws[0]
    for w in ws[1:]:
        lin = w @ lin
    assert res.value >= np.linalg.norm(lin, 2) * (1 - 1e-9)
    # cross-check: the telescoped certificate verifies on the dense-unrolled LipSDP LMI
    lmi = Lmi.from_chain(net.chain())
    assert verify_certificate(lmi, res.certificate)
    dense_rho = certify_rho(lmi, res.certificate.multipliers)
    assert dense_rho <= res.certificate.rho * (1 + 1e-6)
    assert math.sqrt(dense_rho) >= res.value * (1 - 1e-6)


def test_check_on_conv2d_export(monkeypatch):
    monkeypatch.setattr(sandwich_conv, "DENSE_EXPORT_MAX", 0)
    p = _params(11, (1, 6, 6), [(2, 1), (2, 2)])
    net = plain_network(p)
    res = conv_sandwich_bound(net)
    assert res.certificate.meta["closed_form_confirmed"]
    assert verify_certificate(Lmi.from_chain(net.chain()), res.certificate)
    monkeypatch.setattr(sandwich_check, "DENSE_VERIFY_MAX", 10)
    skipped = conv_sandwich_bound(net)
    assert skipped.certificate.meta["dense_verified"] is None
    assert skipped.value == res.value


def test_each_layer_rho_is_one_up_to_rounding():
    p = _params(6, (3, 6, 6), [(4, 2), (2, 1)])
    for layer in p.convs:
        rho = layer_rho(layer, (1 + 1e-8) * layer.psi**2)
        assert 1 - 1e-9 <= rho <= 1 + 1e-6
    # every frequency's LMI is real-embedded: twice the channel counts
    lmis = frequency_lmis(p.convs[1])
    assert len(lmis) == 3 * 2 and lmis[0].weights[0].shape == (4, 8)


def test_halved_psi_in_t_fails():
    p = _params(7, (2, 6, 6), [(2, 1), (2, 1)], d_scale=0.5)
    for layer in p.convs:
        try:
            rho = layer_rho(layer, (layer.psi / 2) ** 2)
        except CertificateError:
            continue
        assert rho > 1.01
    net = plain_network(p)
    cert = conv_sandwich_bound(net).certificate
    lmi = Lmi.from_chain(net.chain())
    bad = tuple(t / 4 for t in cert.multipliers)
    assert not verify_certificate(lmi, type(cert)(cert.rho, bad))


def test_lowered_claim_is_not_confirmed_and_mismatch_rejected():
    p = _params(8, (1, 6, 6), [(2, 1)], gamma=2.0)
    true = conv_sandwich_bound(plain_network(p)).value
    claim = true * (1 - 1e-4)
    low = ConvSandwichParams(p.gamma, p.convs, p.output, p.input_shape, claimed_gamma=claim)
    res = conv_sandwich_bound(plain_network(low))
    assert not res.certificate.meta["closed_form_confirmed"]
    assert res.value == pytest.approx(true, rel=1e-12) and "NOT confirmed" in " ".join(res.notes)
    # ops that are not the ones the parameters define
    other = plain_network(_params(9, (1, 6, 6), [(2, 1)]))
    with pytest.raises(CertificateError) as e:
        conv_sandwich_bound(Network(other.input_shape, other.ops, sandwich=p))
    assert e.value.code == "sandwich-mismatch"


def _config(p: ConvSandwichParams):
    """(tensors, config) in the lipcert/1 conv format, written independently of models/."""
    tensors = {"log_gamma": np.array([math.log(p.gamma)])}
    specs = []
    for i, layer in enumerate(p.convs):
        tensors[f"c{i}.XY"], tensors[f"c{i}.d"], tensors[f"c{i}.b"] = layer.xy, layer.d, layer.b
        specs.append(
            {
                "type": "sandwich_conv",
                "in_shape": list(layer.in_shape),
                "out_channels": layer.out_channels,
                "kernel_size": layer.xy.shape[-1],
                "stride": layer.stride,
                "activation": "relu",
                "tensors": {"XY": f"c{i}.XY", "d": f"c{i}.d", "b": f"c{i}.b"},
            }
        )
    head = SandwichLayer("sandwich_output", p.output.xy, p.output.b)
    _, cfg = params_to_safetensors(SandwichParams(p.gamma, (head,), (head.in_features,)))
    tensors["o.XY"], tensors["o.b"] = head.xy, head.b
    out_spec = dict(cfg["layers"][0], tensors={"XY": "o.XY", "b": "o.b"})
    config = {
        "format": "lipcert/1",
        "kind": "sandwich",
        "gamma": p.claimed_gamma,
        "input_shape": list(p.input_shape),
        "tensors": {"log_gamma": "log_gamma"},
        "layers": [*specs, out_spec],
    }
    return tensors, config


def test_config_round_trip_and_rejections():
    p = _params(10, (1, 8, 8), [(2, 1), (3, 2)])
    tensors, config = _config(p)
    net = network_from_safetensors(tensors, config)
    x = np.random.default_rng(0).standard_normal((3, 64))
    np.testing.assert_allclose(net.forward(x), plain_network(p).forward(x), atol=1e-13)
    assert sandwich_bound(net).certificate.meta["closed_form_confirmed"]

    def broken(**change):
        cfg = {**config, "layers": [dict(config["layers"][0], **change), *config["layers"][1:]]}
        with pytest.raises(ModelRejected):
            network_from_safetensors(tensors, cfg)

    broken(stride=3)
    broken(in_shape=[1, 8, 7])
    broken(kernel_size=5)  # tensor shape mismatch
    broken(out_channels=4)
    broken(activation="no-such-activation")
    gelu = {
        **config,
        "layers": [dict(config["layers"][0], activation="gelu"), *config["layers"][1:]],
    }
    with pytest.raises(NotApplicable):  # slopes outside [0, 1]: no closed form
        sandwich_bound(network_from_safetensors(tensors, gelu))
    big = {**config, "input_shape": [64, 256, 256]}
    big["layers"] = [dict(config["layers"][0], in_shape=[64, 256, 256], out_channels=512)]
    with pytest.raises(ModelRejected) as e:  # refused before any tensor is read or FFT done
        network_from_safetensors(
            {"log_gamma": tensors["log_gamma"]},
            {**big, "layers": [*big["layers"], config["layers"][-1]]},
        )
    assert e.value.code == "too-many-parameters"
    bad = dict(tensors)
    bad["c0.d"] = np.full(2, 400.0)
    with pytest.raises(ModelRejected):
        network_from_safetensors(bad, config)
