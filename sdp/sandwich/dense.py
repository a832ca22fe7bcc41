"""Dense sandwich (LBDN) networks in numpy: Cayley transform and the equivalent plain network
(design.md §3.4).

A hidden sandwich layer (p inputs -> q outputs) has free parameters ``XY = [X; Y]``
((q + p) x q), optionally rescaled to Frobenius norm ``alpha``, ``d`` (q) and ``b`` (q)::

    Z   = X - X^T + Y^T Y
    A^T = (I + Z)^{-1} (I - Z),     B^T = -2 Y (I + Z)^{-1},      so  A A^T + B B^T = I_q
    h_out = sqrt(2) A^T Psi sigma( sqrt(2) Psi^{-1} B h_in + b ),   Psi = diag(exp(d)).

An LBDN with scale gamma is ``h = sqrt(gamma) x``, L hidden sandwich layers, and the output
layer ``y = sqrt(gamma) B_L h + b_L``. Its equivalent plain network (z_{k+1} = sigma(W_k z_k + b_k))
has ``W_k = 2 Psi_k^{-1} B_k A_{k-1}^T Psi_{k-1}`` (A_{-1} = I, Psi_{-1} = sqrt(gamma/2) I) and
``W_L = sqrt(2 gamma) B_L A_{L-1}^T Psi_{L-1}``.

The closed-form certificate check of these networks is :mod:`sdp.bounds.sandwich`; the
safetensors format is :mod:`sdp.sandwich.config`.

References:
    R. Wang, I. R. Manchester, "Direct Parameterization of Lipschitz-Bounded Deep Networks",
    ICML 2023. M. Fazlyab et al., "Efficient and Accurate Estimation of Lipschitz Constants
    for Deep Neural Networks", NeurIPS 2019.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import linalg

from sdp._blas import one_thread
from sdp.ir import Activation, Array, Dense, Network, Op

LayerType = Literal["sandwich", "sandwich_output"]


@dataclass(frozen=True, eq=False)
class SandwichLayer:
    """Raw parameters of one sandwich layer (float64 copies).

    ``xy``: [X; Y], shape (q + p, q). ``alpha``: None or the Frobenius norm [X; Y] is rescaled
    to. ``d``: (q,) for hidden layers, None for the output layer. ``b``: (q,).
    """

    type: LayerType
    xy: Array
    b: Array
    d: Array | None = None
    alpha: float | None = None
    activation: Activation | None = None

    @property
    def out_features(self) -> int:
        return int(self.xy.shape[1])

    @property
    def in_features(self) -> int:
        return int(self.xy.shape[0] - self.xy.shape[1])

    def cayley(self) -> tuple[Array, Array]:
        """(A, B) with A (q x q), B (q x p) and A A^T + B B^T = I (float64)."""
        return cayley(self.xy, self.alpha)

    @property
    def psi(self) -> Array:
        assert self.d is not None
        return np.exp(self.d)


@dataclass(frozen=True, eq=False)
class SandwichParams:
    """An LBDN's raw parameters: hidden layers, the output layer, and the scale.

    ``gamma`` is the scale the forward pass uses (h_0 = sqrt(gamma) x); ``claimed_gamma`` is
    the bound written in the file's metadata, the claim :func:`sandwich_bound` checks.
    """

    gamma: float
    layers: tuple[SandwichLayer, ...]
    input_shape: tuple[int, ...]
    claimed_gamma: float | None = None

    @property
    def hidden(self) -> tuple[SandwichLayer, ...]:
        return self.layers[:-1]

    @property
    def output(self) -> SandwichLayer:
        return self.layers[-1]

    @property
    def activation(self) -> Activation | None:
        """The hidden activation when all hidden layers share one (else the first)."""
        return self.hidden[0].activation if self.hidden else None


def cayley(xy: Array, alpha: float | None = None) -> tuple[Array, Array]:
    """Cayley transform of [X; Y] (q + p, q), optionally rescaled to Frobenius norm ``alpha``.

    Z = X - X^T + Y^T Y; A^T = (I + Z)^{-1}(I - Z); B^T = -2 Y (I + Z)^{-1}. I + Z is always
    invertible (its symmetric part is I + Y^T Y >= I). Returns (A, B), A (q, q), B (q, p).
    """
    xy = np.asarray(xy, dtype=np.float64)
    q = xy.shape[1]
    if alpha is not None:
        norm = float(np.linalg.norm(xy))
        xy = xy * (alpha / norm) if norm > 0 else xy
    x, y = xy[:q], xy[q:]
    z = x - x.T + y.T @ y
    eye = np.eye(q)
    lu = linalg.lu_factor(eye + z)
    a_t = linalg.lu_solve(lu, eye - z)
    # B^T = -2 Y (I+Z)^{-1}  <=>  B = -2 (I+Z)^{-T} Y^T
    b = -2.0 * linalg.lu_solve(lu, y.T, trans=1)
    return a_t.T, b


def plain_weights(params: SandwichParams) -> list[tuple[Array, Array]]:
    """(W_k, b_k) of the equivalent plain network, k = 0..L (design.md §3.4), in float64.

    Deterministic: BLAS runs on one thread (:mod:`sdp._blas`), so the weights are the same
    bits in every process (the closed-form check compares them exactly with the imported ones).
    """
    with one_thread():
        return _plain_weights(params)


def _plain_weights(params: SandwichParams) -> list[tuple[Array, Array]]:
    out: list[tuple[Array, Array]] = []
    a_prev_t: Array | None = None  # A_{k-1}^T Psi_{k-1} (None: sqrt(gamma/2) I)
    for layer in params.hidden:
        a, b = layer.cayley()
        right = b * math.sqrt(params.gamma / 2) if a_prev_t is None else b @ a_prev_t
        out.append(((2.0 / layer.psi)[:, None] * right, layer.b))
        a_prev_t = a.T * layer.psi[None, :]
    _, b_out = params.output.cayley()
    if a_prev_t is None:  # no hidden layer: y = sqrt(gamma) B_L sqrt(gamma) x + b_L
        w_out = params.gamma * b_out
    else:
        w_out = math.sqrt(2 * params.gamma) * (b_out @ a_prev_t)
    out.append((w_out, params.output.b))
    return out


def plain_network(params: SandwichParams, *, with_params: bool = True) -> Network:
    """The forward-equivalent plain network (Dense + Activation ops) in the sdp IR."""
    ops: list[Op] = []
    weights = plain_weights(params)
    for (w, b), layer in zip(weights[:-1], params.hidden, strict=True):
        ops.append(Dense(w, b))
        ops.append(layer.activation or Activation("relu"))
    ops.append(Dense(*weights[-1]))
    return Network(params.input_shape, tuple(ops), sandwich=params if with_params else None)


def sandwich_forward(params: SandwichParams, x: Array) -> Array:
    """The sandwich forward pass itself (float64, batched), independent of plain_weights."""
    h = math.sqrt(params.gamma) * np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    for layer in params.hidden:
        a, b = layer.cayley()
        act = layer.activation or Activation("relu")
        u = math.sqrt(2.0) * (h @ b.T) / layer.psi + layer.b
        h = math.sqrt(2.0) * (act(u) * layer.psi) @ a
    _, b_out = params.output.cayley()
    return math.sqrt(params.gamma) * (h @ b_out.T) + params.output.b
