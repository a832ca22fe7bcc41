"""Small random networks of every IR kind for the sdp.local tests (numpy only)."""

from __future__ import annotations

import math

import mpmath
import numpy as np

from sdp.ir import Activation, Conv2d, Dense, Network, Residual

ACT_NAMES = ["relu", "leaky_relu", "tanh", "sigmoid", "elu", "softplus", "gelu", "silu", "identity"]


def mp_phi(phi: Activation, x):
    """phi(x) in mpmath (the exact reference of the local-bound tests)."""
    n, p = phi.name, mpmath.mpf(phi.param)
    if n == "relu":
        return max(x, mpmath.mpf(0))
    if n == "leaky_relu":
        return x if x >= 0 else p * x
    if n == "tanh":
        return mpmath.tanh(x)
    if n == "sigmoid":
        return 1 / (1 + mpmath.exp(-x))
    if n == "elu":
        return x if x > 0 else p * mpmath.expm1(x)
    if n == "softplus":
        return mpmath.log1p(mpmath.exp(x))
    if n == "gelu":
        return x * (1 + mpmath.erf(x / mpmath.sqrt(2))) / 2
    if n == "silu":
        return x / (1 + mpmath.exp(-x))
    return x


def act(name: str) -> Activation:
    return Activation(name, {"leaky_relu": 0.1, "elu": 1.0}.get(name, 0.0))


def dense_net(rng, sizes, name="relu", out_act=False, scale=1.0) -> Network:
    ops: list = []
    for i in range(len(sizes) - 1):
        w = rng.normal(size=(sizes[i + 1], sizes[i])) * scale / math.sqrt(sizes[i])
        ops.append(Dense(w, rng.normal(size=sizes[i + 1]) * 0.3))
        if i < len(sizes) - 2 or out_act:
            ops.append(act(name))
    return Network((sizes[0],), tuple(ops))


def conv_layer(rng, stride=(2, 2)) -> Conv2d:
    """A random 3x3 convolution, 2 -> 3 channels on 5x5 inputs, padding 1."""
    return Conv2d(
        rng.normal(size=(3, 2, 3, 3)) * 0.4,
        rng.normal(size=3) * 0.1,
        (2, 5, 5),
        stride=stride,
        padding=(1, 1, 1, 1),
    )


def conv_net(rng, name="relu") -> Network:
    c1 = conv_layer(rng)
    n1 = c1.out_features
    return Network(
        (2, 5, 5), (c1, act(name), Dense(rng.normal(size=(4, n1)) * 0.3, rng.normal(size=4) * 0.1))
    )


def residual_net(rng, name="relu") -> Network:
    d = 5
    body = (
        Dense(rng.normal(size=(d, d)) * 0.4, rng.normal(size=d) * 0.1),
        act(name),
        Dense(rng.normal(size=(d, d)) * 0.4, np.zeros(d)),
    )
    inner = Residual((act(name), Dense(rng.normal(size=(d, d)) * 0.3, np.zeros(d))))
    ops = (
        Dense(rng.normal(size=(d, 4)), rng.normal(size=d) * 0.2),
        act(name),
        Residual(body),
        act(name),
        inner,
        Residual(
            (Dense(rng.normal(size=(d, d)) * 0.3, np.zeros(d)),),
            (Dense(rng.normal(size=(d, d)) * 0.3, np.zeros(d)),),
        ),
        Dense(rng.normal(size=(3, d)), rng.normal(size=3) * 0.1),
    )
    return Network((4,), ops)
