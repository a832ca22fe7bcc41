"""The network IR: convolutions against torch, adjoints, the LipSDP normal form, hashing and
activation slope bounds (checked numerically)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import special

from sdp.errors import NotApplicable
from sdp.ir import Activation, Chain, Conv2d, Dense, Network, Residual

CONV_CASES = [
    # (in_shape, out_channels, kernel, stride, padding(t,l,b,r), dilation, groups)
    ((3, 8, 8), 4, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1),
    ((3, 9, 7), 5, (4, 4), (2, 2), (1, 1, 1, 1), (1, 1), 1),
    ((4, 10, 10), 6, (3, 2), (2, 1), (0, 2, 1, 0), (2, 1), 2),
    ((4, 6, 6), 4, (2, 2), (1, 2), (0, 0, 0, 0), (1, 1), 4),
    ((2, 5, 5), 3, (1, 1), (2, 2), (0, 0, 0, 0), (1, 1), 1),
]


def _conv(case: tuple, seed: int = 0) -> Conv2d:
    in_shape, co, (kh, kw), stride, pad, dil, g = case
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((co, in_shape[0] // g, kh, kw))
    return Conv2d(w, rng.standard_normal(co), in_shape, stride, pad, dil, g)


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_matches_torch(case: tuple) -> None:
    conv = _conv(case)
    x = np.random.default_rng(1).standard_normal((3, *conv.in_shape))
    t, left, b, r = conv.padding
    xt = F.pad(torch.from_numpy(x), (left, r, t, b))
    want = F.conv2d(
        xt,
        torch.tensor(conv.weight),
        torch.tensor(conv.bias),
        stride=conv.stride,
        dilation=conv.dilation,
        groups=conv.groups,
    )
    assert tuple(want.shape[1:]) == conv.out_shape
    got = conv.apply(x.reshape(3, -1))
    np.testing.assert_allclose(got, want.numpy().reshape(3, -1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_transpose_is_adjoint_and_matrix_consistent(case: tuple) -> None:
    conv = _conv(case, seed=2)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, conv.in_features))
    y = rng.standard_normal((4, conv.out_features))
    lhs = np.sum(conv.apply_linear(x) * y, axis=1)
    rhs = np.sum(x * conv.apply_transpose(y), axis=1)
    np.testing.assert_allclose(lhs, rhs, rtol=1e-11)
    m = conv.matrix()
    assert m.shape == (conv.out_features, conv.in_features)
    np.testing.assert_allclose(x @ m.T, conv.apply_linear(x), atol=1e-12)
    np.testing.assert_allclose(y @ m, conv.apply_transpose(y), atol=1e-12)


def test_dense_adjoint_and_matrix() -> None:
    rng = np.random.default_rng(0)
    d = Dense(rng.standard_normal((3, 5)), rng.standard_normal(3))
    x, y = rng.standard_normal((2, 5)), rng.standard_normal((2, 3))
    np.testing.assert_allclose(
        np.sum(d.apply_linear(x) * y, 1), np.sum(x * d.apply_transpose(y), 1), rtol=1e-12
    )
    np.testing.assert_array_equal(d.matrix(), d.weight)
    with pytest.raises(ValueError):
        d.weight[0, 0] = 1.0  # arrays are read-only


def _run_chain(ch: Chain, x: np.ndarray) -> np.ndarray:
    z = x
    for w, phi in zip(ch.affines[:-1], ch.activations, strict=True):
        z = phi(w.apply(z))
    return ch.affines[-1].apply(z)


def _dense(rng: np.random.Generator, o: int, i: int) -> Dense:
    return Dense(rng.standard_normal((o, i)), rng.standard_normal(o))


def test_chain_trailing_activation_gets_identity_output() -> None:
    rng = np.random.default_rng(0)
    net = Network(
        (4,), (_dense(rng, 6, 4), Activation("relu"), _dense(rng, 3, 6), Activation("relu"))
    )
    ch = net.chain()
    assert len(ch.affines) == 3 and len(ch.activations) == 2
    np.testing.assert_array_equal(ch.affines[-1].matrix(), np.eye(3))
    x = rng.standard_normal((5, 4))
    np.testing.assert_allclose(_run_chain(ch, x), net.forward(x), rtol=1e-13)


def test_chain_merges_consecutive_affines_exactly() -> None:
    rng = np.random.default_rng(1)
    c1 = _conv(((2, 6, 6), 3, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1), seed=4)
    c2 = Conv2d(rng.standard_normal((2, 3, 2, 2)), rng.standard_normal(2), c1.out_shape, (2, 2))
    ops = (
        c1,
        c2,
        Activation("tanh"),
        _dense(rng, 7, c2.out_features),
        _dense(rng, 5, 7),
        Activation("sigmoid"),
        _dense(rng, 2, 5),
    )
    net = Network((2, 6, 6), ops)
    ch = net.chain()
    assert len(ch.affines) == 3 and [a.name for a in ch.activations] == ["tanh", "sigmoid"]
    w0 = ch.weights()[0]
    np.testing.assert_allclose(w0, c2.matrix() @ c1.matrix(), rtol=1e-12, atol=1e-12)
    x = rng.standard_normal((4, 72))
    np.testing.assert_allclose(_run_chain(ch, x), net.forward(x), rtol=1e-12, atol=1e-12)
    assert ch.slopes() == [(0.0, 1.0), (0.0, 0.25)]


def test_chain_leading_activation_and_residual() -> None:
    rng = np.random.default_rng(2)
    net = Network((3,), (Activation("relu"), _dense(rng, 2, 3)))
    ch = net.chain()
    np.testing.assert_array_equal(ch.affines[0].matrix(), np.eye(3))
    x = rng.standard_normal((3, 3))
    np.testing.assert_allclose(_run_chain(ch, x), net.forward(x))
    body = (_dense(rng, 3, 3), Activation("relu"), _dense(rng, 3, 3))
    res = Network((3,), (Residual(body), Activation("relu")))
    assert res.kind == "residual" and not res.is_chain
    want = np.maximum(body[2].apply(np.maximum(body[0].apply(x), 0)) + x, 0)
    np.testing.assert_allclose(res.forward(x), want, rtol=1e-13)
    with pytest.raises(NotApplicable):
        res.chain()


def test_forward_shapes_and_size_checks() -> None:
    rng = np.random.default_rng(3)
    net = Network((1, 2, 2), (_dense(rng, 3, 4),))
    x = rng.standard_normal((5, 1, 2, 2))
    assert net.forward(x).shape == (5, 3)
    assert net.forward(x[0]).shape == (3,)
    assert net.forward(x[0].ravel()).shape == (3,)
    with pytest.raises(ValueError):
        Network((5,), (_dense(rng, 3, 4),))


def _hash_net(w00: float = 0.5) -> Network:
    w = np.arange(6.0).reshape(2, 3) / 7
    w[0, 0] = w00
    return Network(
        (3,),
        (Dense(w, np.ones(2)), Activation("leaky_relu", 0.1), Dense(np.eye(2), np.zeros(2))),
        name="a",
    )


def test_content_hash_stable_and_sensitive() -> None:
    h = _hash_net().content_hash()
    assert len(h) == 64 and h == _hash_net().content_hash() == _hash_net().content_hash()
    assert _hash_net(0.5 + 1e-12).content_hash() != h
    renamed = Network(_hash_net().input_shape, _hash_net().ops, name="other")
    assert renamed.content_hash() == h  # the name is metadata, not content
    n = _hash_net()
    other_act = Network(n.input_shape, (n.ops[0], Activation("leaky_relu", 0.2), n.ops[2]))
    assert other_act.content_hash() != h
    c = _conv(CONV_CASES[0])
    strided = Conv2d(c.weight, c.bias, c.in_shape, (2, 2), c.padding)
    assert (
        Network(c.in_shape, (c,)).content_hash() != Network(c.in_shape, (strided,)).content_hash()
    )
    # the same value in a fresh interpreter (no dependence on process state)
    code = (
        "import numpy as np; from sdp.ir import Activation, Dense, Network\n"
        "w = np.arange(6.0).reshape(2, 3) / 7; w[0, 0] = 0.5\n"
        "net = Network((3,), (Dense(w, np.ones(2)), Activation('leaky_relu', 0.1),"
        " Dense(np.eye(2), np.zeros(2))))\n"
        "print(net.content_hash())"
    )
    env = {"PYTHONPATH": ".", "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    assert out.stdout.strip() == h


ACTIVATIONS = [
    Activation("relu"),
    Activation("leaky_relu", 0.1),
    Activation("leaky_relu", 2.0),
    Activation("tanh"),
    Activation("sigmoid"),
    Activation("elu", 0.5),
    Activation("elu", 2.0),
    Activation("softplus"),
    Activation("identity"),
    Activation("gelu"),
    Activation("silu"),
]


@pytest.mark.parametrize("act", ACTIVATIONS, ids=lambda a: f"{a.name}-{a.param}")
def test_slope_bounds_hold_and_are_tight(act: Activation) -> None:
    """Every secant slope lies in [alpha, beta]; the grid gets within 1e-2 of both ends."""
    alpha, beta = act.slope_bounds
    x = np.linspace(-12, 12, 240_001)
    y = act(x)
    secant = np.diff(y) / np.diff(x)
    tol = 1e-9
    assert secant.min() >= alpha - tol and secant.max() <= beta + tol
    assert secant.min() <= alpha + 1e-2 and secant.max() >= beta - 1e-2
    rng = np.random.default_rng(0)
    a, b = rng.uniform(-8, 8, 10_000), rng.uniform(-8, 8, 10_000)
    keep = np.abs(a - b) > 1e-6
    s = (act(a[keep]) - act(b[keep])) / (a[keep] - b[keep])
    assert s.min() >= alpha - 1e-8 and s.max() <= beta + 1e-8


def test_named_slope_bounds() -> None:
    assert Activation("sigmoid").slope_bounds == (0.0, 0.25)
    assert Activation("leaky_relu", 0.01).slope_bounds == (0.01, 1.0)
    assert Activation("relu").slope_bounds == (0.0, 1.0)
    lo, hi = Activation("gelu").slope_bounds
    # closed form: GELU'(x) = Phi(x) + x phi(x) is extremal at x = -+sqrt(2)
    r2 = np.sqrt(2.0)
    ext = float(special.ndtr(r2) + r2 * np.exp(-1.0) / np.sqrt(2 * np.pi))
    assert hi == pytest.approx(ext, abs=1e-8) and lo == pytest.approx(1.0 - ext, abs=1e-8)
    assert lo <= 1.0 - ext and hi >= ext  # padded outward, never inward
    with pytest.raises(ValueError):
        Activation("softmax")  # type: ignore[arg-type]
