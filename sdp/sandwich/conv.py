"""Convolutional sandwich layers in numpy: per-frequency Cayley transform, the equivalent plain
network (design.md §3.4, last paragraph).

Derivation. A circular 2-D convolution on an m x m grid with c_in -> c_out channels is
block-diagonalised by the unitary 2-D DFT F: for each frequency f = (f1, f2) it is a complex
c_out x c_in matrix. The layer's free parameters are a real kernel ``XY`` of shape
(q + p, q, k, k) (k x k taps, circularly placed around the origin of the m x m grid), rescaled
to Frobenius norm ``alpha`` when given; its DFT gives per frequency the complex matrices
X(f) (q x q) and Y(f) (p x q). Per frequency (^H = conjugate transpose)::

    Z = X - X^H + Y^H Y,    A^H := (I + Z)^{-1} (I - Z),    B^H := -2 Y (I + Z)^{-1}

and since Z + Z^H = 2 Y^H Y, (I - Z)^H (I - Z) + 4 Y^H Y = (I + Z)^H (I + Z), hence
A A^H + B B^H = I_q (I + Z is invertible: its Hermitian part is I + Y^H Y >= I). In code
``astar`` = A^H (q x q) and ``bstar`` = B^H (p x q). The layer (stride 1) is::

    u = sqrt2 Psi^{-1} B h + b,   v = sigma(u),   h_out = sqrt2 A^H Psi v,

with B, A^H acting per frequency of F h and Psi = diag(exp(d)) per *channel* (shared over
pixels, so it commutes with F). Stride 2 first applies space-to-depth S (c, 2m, 2m) ->
(4c, m, m) (``pixel_unshuffle`` order), a permutation, so ||S h|| = ||h||.
The kernel is real, so X(-f) = conj X(f) and every derived matrix is conjugate-symmetric:
the layer maps real images to real images (rfft2/irfft2 over half the spectrum).

1-Lipschitz, per frequency. For differences dh, du, dv (pixels x channels) the neuron
constraint QC(T) = sum_pixels 2 dv^T T (du - dv) >= 0 holds for slopes in [0, 1]. With T =
Psi^2 per channel, Parseval gives QC = sum_f 2 Re dv(f)^H Psi^2 (du(f) - dv(f)), and per
frequency |dh(f)|^2 - |dh_out(f)|^2 - QC_f = |dh(f) - sqrt2 B^H Psi dv(f)|^2 >= 0.

The closed-form check frequency by frequency is :mod:`sdp.bounds.sandwich`.

Export. The plain network has W_j = (sqrt2 Psi_j^{-1} B_j S_j)(sqrt2 A_{j-1}^H Psi_{j-1}),
a circular stride-s correlation y[o, i] = sum_x G[o, c, (x - s i) mod n] h[c, x] whose kernel G
is read off the adjoint applied to unit impulses. Small layers (<= DENSE_EXPORT_MAX matrix
entries) are exported unrolled as ``Dense`` (rows = shifted copies of G). Larger ones are an IR
``Conv2d`` (zero-padded cross-correlation) with kernel size 2n - s, padding n - s and stride s,
K[t] = G[(t - n + s) mod n]: exact and compact, but slow to run with the tap-loop Conv2d.
The output layer is a ``Dense``.

Reference: R. Wang, I. R. Manchester, "Direct Parameterization of Lipschitz-Bounded Deep
Networks", ICML 2023 (sandwich layers and their convolutional, FFT-based version).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from sdp._blas import one_thread
from sdp.ir import Activation, Array, Conv2d, Dense, Network, Op
from sdp.sandwich.dense import SandwichLayer

CArray = npt.NDArray[np.complex128]
SQRT2 = math.sqrt(2.0)
DENSE_EXPORT_MAX = 1 << 22
"""Layers whose unrolled matrix has at most this many entries are exported as ``Dense``
(fast to run); larger ones as the exact big-kernel ``Conv2d`` (compact)."""


# --------------------------------------------------------------------------- grid operations


def space_to_depth(x: Array, s: int) -> Array:
    """(B, c, s m, s m) -> (B, c s^2, m, m): channel c s^2 + a s + b is x[c, s i + a, s j + b]."""
    if s == 1:
        return x
    b, c, n, _ = x.shape
    m = n // s
    return x.reshape(b, c, m, s, m, s).transpose(0, 1, 3, 5, 2, 4).reshape(b, c * s * s, m, m)


def depth_to_space(x: Array, s: int) -> Array:
    """Inverse (and adjoint) of :func:`space_to_depth`."""
    if s == 1:
        return x
    b, cs, m, _ = x.shape
    c = cs // (s * s)
    return x.reshape(b, c, s, s, m, m).transpose(0, 1, 4, 2, 5, 3).reshape(b, c, s * m, s * m)


def freq_apply(mats: CArray, x: Array) -> Array:
    """Per-frequency ``mats[f] @ x(f)`` on real images: (F, a, b) x (B, b, m, m) -> (B, a, m, m).

    ``mats`` covers the rfft2 bins (m, m // 2 + 1) in C order and must be conjugate-symmetric.
    Uses the unitary DFT (norm="ortho").
    """
    bsz, _, m, _ = x.shape
    xf = np.fft.rfft2(x, norm="ortho").reshape(bsz, x.shape[1], -1)
    yf = np.einsum("fab,Bbf->Baf", mats, xf)
    return np.fft.irfft2(yf.reshape(bsz, mats.shape[1], m, m // 2 + 1), s=(m, m), norm="ortho")


def kernel_on_grid(xy: Array, m: int) -> Array:
    """The k x k kernel placed circularly around the origin of an m x m grid."""
    k = xy.shape[-1]
    pad = np.zeros((*xy.shape[:2], m, m))
    pad[:, :, :k, :k] = xy
    return np.roll(pad, (-(k // 2), -(k // 2)), axis=(2, 3))


# --------------------------------------------------------------------------- parameters


@dataclass(frozen=True, eq=False)
class ConvSandwichLayer:
    """Raw parameters of one convolutional sandwich layer (float64).

    ``xy``: (q + p, q, k, k) with p = c_in * stride^2; ``in_shape``: (c_in, n, n) before
    space-to-depth; ``d``, ``b``: (q,); ``alpha``: None or the Frobenius norm of the rescaled xy.
    """

    xy: Array
    b: Array
    d: Array
    in_shape: tuple[int, int, int]
    stride: int = 1
    alpha: float | None = None
    activation: Activation = field(default_factory=lambda: Activation("relu"))

    @property
    def out_channels(self) -> int:
        return int(self.xy.shape[1])

    @property
    def grid(self) -> int:
        return self.in_shape[1] // self.stride

    @property
    def out_shape(self) -> tuple[int, int, int]:
        return (self.out_channels, self.grid, self.grid)

    @property
    def psi(self) -> Array:
        return np.exp(self.d)

    def factors(self) -> tuple[CArray, CArray]:
        """(A^H (F, q, q), B^H (F, p, q)) per rfft2 frequency; A A^H + B B^H = I."""
        return frequency_cayley(self.xy, self.alpha, self.grid)

    def forward(self, h: Array) -> Array:
        """The sandwich layer itself on (B, c_in, n, n)."""
        astar, bstar = self.factors()
        psi = self.psi[:, None, None]
        x = space_to_depth(h, self.stride)
        u = SQRT2 * freq_apply(np.conj(bstar).transpose(0, 2, 1), x) / psi + self.b[:, None, None]
        return SQRT2 * freq_apply(astar, self.activation(u) * psi)


@dataclass(frozen=True, eq=False)
class ConvSandwichParams:
    """A conv LBDN: h_0 = sqrt(gamma) x, conv sandwich layers, flatten, optional dense sandwich
    layers, y = sqrt(gamma) B_L h + b_L.

    ``output`` is a dense :class:`sdp.sandwich.dense.SandwichLayer` of type "sandwich_output";
    ``dense`` holds dense ones of type "sandwich" (1-Lipschitz each, checked like the convs
    with T = Psi^2 on their own one-layer LMI).
    """

    gamma: float
    convs: tuple[ConvSandwichLayer, ...]
    output: SandwichLayer
    input_shape: tuple[int, int, int]
    claimed_gamma: float | None = None
    dense: tuple[SandwichLayer, ...] = ()


def frequency_cayley(xy: Array, alpha: float | None, m: int) -> tuple[CArray, CArray]:
    """Per-frequency Cayley transform of the kernel ``xy`` on an m x m grid (module docstring)."""
    xy = np.asarray(xy, dtype=np.float64)
    if alpha is not None:
        norm = float(np.linalg.norm(xy))
        xy = xy * (alpha / norm) if norm > 0 else xy
    q = xy.shape[1]
    spec = np.fft.rfft2(kernel_on_grid(xy, m)).reshape(xy.shape[0], q, -1).transpose(2, 0, 1)
    x, y = spec[:, :q], spec[:, q:]
    yh = np.conj(y).transpose(0, 2, 1)
    z = x - np.conj(x).transpose(0, 2, 1) + yh @ y
    eye = np.eye(q)
    inv = np.linalg.inv(eye + z)
    astar = np.asarray(2.0 * inv - eye, dtype=np.complex128)
    return astar, np.asarray(-2.0 * (y @ inv), dtype=np.complex128)


def conv_forward(params: ConvSandwichParams, x: Array) -> Array:
    """The sandwich forward pass (float64, batched), independent of the exported plain ops."""
    g = params.gamma
    h = math.sqrt(g) * np.asarray(x, dtype=np.float64).reshape(len(x), *params.input_shape)
    for layer in params.convs:
        h = layer.forward(h)
    h = h.reshape(len(h), -1)
    for dl in params.dense:
        a, b = dl.cayley()
        u = SQRT2 * (h @ b.T) / dl.psi + dl.b
        h = SQRT2 * (layer_activation(dl)(u) * dl.psi) @ a
    _, b_out = params.output.cayley()
    return math.sqrt(g) * (h @ b_out.T) + params.output.b


# --------------------------------------------------------------------------- plain network


def _post_adjoint(layer: ConvSandwichLayer | None, gamma: float, w: Array) -> Array:
    """Adjoint of h = sqrt2 A^H Psi v (or h = sqrt(gamma) x when ``layer`` is None)."""
    if layer is None:
        return math.sqrt(gamma) * w
    astar, _ = layer.factors()
    return SQRT2 * layer.psi[:, None, None] * freq_apply(np.conj(astar).transpose(0, 2, 1), w)


def _pre_adjoint(layer: ConvSandwichLayer, y: Array) -> Array:
    """Adjoint of u = sqrt2 Psi^{-1} B S h (linear part)."""
    _, bstar = layer.factors()
    return depth_to_space(SQRT2 * freq_apply(bstar, y / layer.psi[:, None, None]), layer.stride)


def plain_ops(params: ConvSandwichParams) -> tuple[Op, ...]:
    """Conv2d/Activation ops then the output Dense: the forward-equivalent plain network.

    Deterministic: BLAS runs on one thread (:mod:`sdp._blas`), the same bits in every process.
    """
    with one_thread():
        return _plain_ops(params)


def _plain_ops(params: ConvSandwichParams) -> tuple[Op, ...]:
    ops: list[Op] = []
    prev: ConvSandwichLayer | None = None
    for layer in params.convs:
        q, m, _ = layer.out_shape
        impulses = np.zeros((q, q, m, m))
        impulses[np.arange(q), np.arange(q), 0, 0] = 1.0
        g = _post_adjoint(prev, params.gamma, _pre_adjoint(layer, impulses))  # (q, c, n, n)
        n, s = layer.in_shape[1], layer.stride
        if q * m * m * math.prod(layer.in_shape) <= DENSE_EXPORT_MAX:
            # row (o, i, j) of W is G shifted by (s i, s j): R[..., x, y] = G[..., x - s i, y - s j]
            rows = [np.roll(g, (s * i, s * j), axis=(2, 3)) for i in range(m) for j in range(m)]
            w = np.stack(rows, axis=1).reshape(q * m * m, -1)
            ops.append(Dense(w, np.repeat(layer.b, m * m)))
        else:
            idx = (np.arange(2 * n - s) - (n - s)) % n
            kernel = g[:, :, idx][:, :, :, idx]
            ops.append(Conv2d(kernel, layer.b, layer.in_shape, (s, s), (n - s,) * 4))
        ops.append(layer.activation)
        prev = layer
    post = _flat_post_adjoint(prev, params.gamma)
    for dl in params.dense:  # W = (sqrt2 Psi^{-1} B) (the previous layer's post map)
        a, b = dl.cayley()
        ops.append(Dense(post(SQRT2 * b / dl.psi[:, None]), dl.b))
        ops.append(layer_activation(dl))
        post = _dense_post_adjoint(a, dl.psi)
    _, b_out = params.output.cayley()
    ops.append(Dense(math.sqrt(params.gamma) * post(b_out), params.output.b))
    return tuple(ops)


def layer_activation(layer: SandwichLayer) -> Activation:
    """A dense hidden layer's activation (ReLU when the parameters leave it unset)."""
    return layer.activation or Activation("relu")


def _flat_post_adjoint(prev: ConvSandwichLayer | None, gamma: float) -> Callable[[Array], Array]:
    """rows (r, size) -> rows composed with the last conv layer's post map (flattened)."""
    if prev is None:
        return lambda rows: math.sqrt(gamma) * rows
    shape = prev.out_shape
    return lambda rows: _post_adjoint(prev, gamma, rows.reshape(len(rows), *shape)).reshape(
        len(rows), -1
    )


def _dense_post_adjoint(a: Array, psi: Array) -> Callable[[Array], Array]:
    """rows -> rows (sqrt2 A^T Psi): the adjoint of a dense layer's h = sqrt2 A^T Psi v."""
    return lambda rows: SQRT2 * (rows @ a.T) * psi[None, :]


def plain_network(params: ConvSandwichParams) -> Network:
    return Network(params.input_shape, plain_ops(params), sandwich=params)
