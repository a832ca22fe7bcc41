"""Empirical LOWER bounds on the Lipschitz constant (the gap check for certified bounds).

For any two inputs, ||f(x) - f(x')|| / ||x - x'|| <= Lip(f). We look for a large ratio with the
local Jacobian: at a random start x, power iteration on J(x)^T J(x) (forward-mode J v and
reverse-mode J^T u through the IR, numpy only) gives the direction v of largest local gain;
the reported number is the measured two-point ratio ||f(x + h v) - f(x)|| / ||h v||, which is a
true lower bound (no differentiability assumption), maximised over many random starts and a few
steps of random-search refinement of the best start.
"""

from __future__ import annotations

import math
import time

import numpy as np
from scipy import special

from sdp.ir import Activation, Array, Conv2d, Dense, Network, Op, Residual


def activation_derivative(phi: Activation, x: Array) -> Array:
    """phi'(x) elementwise (one-sided choice at kinks)."""
    n, p = phi.name, phi.param
    if n == "relu":
        return (x > 0).astype(np.float64)
    if n == "leaky_relu":
        return np.where(x >= 0, 1.0, p)
    if n == "tanh":
        return 1.0 - np.tanh(x) ** 2
    if n == "sigmoid":
        s = special.expit(x)
        return s * (1.0 - s)
    if n == "elu":
        return np.where(x > 0, 1.0, p * np.exp(np.minimum(x, 0.0)))
    if n == "softplus":
        return special.expit(x)
    if n == "identity":
        return np.ones_like(x)
    if n == "gelu":
        return special.ndtr(x) + x * np.exp(-0.5 * x * x) / np.sqrt(2 * np.pi)
    if n == "silu":
        s = special.expit(x)
        return s * (1.0 + x * (1.0 - s))
    raise ValueError(f"no derivative for {n!r}")


def _forward_tangent(ops: tuple[Op, ...], x: Array, v: Array) -> tuple[Array, Array]:
    """(f(x), J(x) v) for batched x, v (forward mode)."""
    for op in ops:
        if isinstance(op, Activation):
            v = activation_derivative(op, x) * v
            x = op(x)
        elif isinstance(op, Dense | Conv2d):
            x, v = op.apply(x), op.apply_linear(v)
        elif isinstance(op, Residual):
            xb, vb = _forward_tangent(op.body, x, v)
            xs, vs = _forward_tangent(op.shortcut, x, v) if op.shortcut else (x, v)
            x, v = xb + xs, vb + vs
    return x, v


def _vjp(ops: tuple[Op, ...], x: Array, u: Array) -> Array:
    """J(x)^T u for batched x, u (reverse mode; recomputes the forward pass)."""
    inputs = []
    for op in ops:
        inputs.append(x)
        x = op(x) if isinstance(op, Activation) else op.apply(x)
    for op, xin in zip(reversed(ops), reversed(inputs), strict=True):
        if isinstance(op, Activation):
            u = activation_derivative(op, xin) * u
        elif isinstance(op, Dense | Conv2d):
            u = op.apply_transpose(u)
        elif isinstance(op, Residual):
            ub = _vjp(op.body, xin, u)
            us = _vjp(op.shortcut, xin, u) if op.shortcut else u
            u = ub + us
    return u


def jacobian_vector(net: Network, x: Array, v: Array) -> Array:
    """J(x) v (batched)."""
    return _forward_tangent(net.ops, x, v)[1]


def vector_jacobian(net: Network, x: Array, u: Array) -> Array:
    """J(x)^T u (batched)."""
    return _vjp(net.ops, x, u)


def _top_directions(
    net: Network,
    x: Array,
    iters: int,
    rng: np.random.Generator,
    deadline: float = math.inf,
) -> Array:
    v = rng.standard_normal(x.shape)
    for _ in range(iters):
        if time.perf_counter() > deadline:  # any direction gives a valid ratio
            break
        v /= np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-300)
        v = vector_jacobian(net, x, jacobian_vector(net, x, v))
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-300)


def _ratios(net: Network, x: Array, v: Array, h: float) -> Array:
    d = net.forward(x + h * v) - net.forward(x)
    return np.asarray(np.linalg.norm(d, axis=1) / h, dtype=np.float64)


def empirical_lower_bound(
    net: Network,
    *,
    starts: int = 64,
    iters: int = 20,
    refine_steps: int = 20,
    scale: float = 1.0,
    seed: int = 0,
    step: float = 1e-4,
    time_limit_s: float | None = None,
) -> float:
    """max over sampled pairs of ||f(x) - f(x')|| / ||x - x'||: a sound lower bound on Lip(f).

    Starts are N(0, scale^2) and U[0, scale] inputs (half each); directions come from power
    iteration on J^T J; the best start is refined by random search around it. With
    ``time_limit_s`` the power iterations and the refinement stop at that deadline (every
    measured ratio is a lower bound, so stopping early only loosens it).
    """
    deadline = math.inf if time_limit_s is None else time.perf_counter() + time_limit_s
    rng = np.random.default_rng(seed)
    n = net.input_size
    half = max(starts // 2, 1)
    x = np.concatenate(
        [scale * rng.standard_normal((half, n)), scale * rng.uniform(size=(starts - half, n))]
    )
    h = step * max(scale, 1e-12)
    v = _top_directions(net, x, iters, rng, deadline)
    r = _ratios(net, x, v, h)
    best = int(np.argmax(r))
    best_x, best_r = x[best : best + 1], float(r[best])
    radius = 0.3 * scale
    for _ in range(refine_steps):
        if time.perf_counter() > deadline:
            break
        cand = best_x + radius * rng.standard_normal((8, n)) / np.sqrt(n)
        vc = _top_directions(net, cand, iters // 2 + 1, rng, deadline)
        rc = _ratios(net, cand, vc, h)
        i = int(np.argmax(rc))
        if rc[i] > best_r:
            best_x, best_r = cand[i : i + 1], float(rc[i])
        else:
            radius *= 0.7
    return best_r
