"""The network IR: the one noun shared by importers, bounds, certificates, radii and inference.

A network maps a flat input x in R^{n0} (``input_shape`` records how it is laid out, e.g.
(C, H, W)) to logits through a sequence of ops::

    Dense       z -> W z + b                      (W: (out, in))
    Conv2d      z -> conv(z) + b                  (a linear map with shape metadata)
    Activation  z -> phi(z) elementwise           (slope-restricted in [alpha, beta])
    Residual    z -> body(z) + shortcut(z)        (shortcut empty = identity)

Flatten/Reshape are implicit: every op reads and writes flat vectors (C-order).
A network without ``Residual`` is a *chain*; :meth:`Network.chain` normalises it to the form
of design.md §2, ``z_{k+1} = phi_k(W_k z_k + b_k)``, ``y = W_L z_L + b_L``, which the
LipSDP code consumes.

Everything is float64 numpy; arrays are made read-only so a network can be shared safely.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from typing import Any, Literal, TypeAlias

import numpy as np
from numpy.typing import NDArray
from scipy import optimize, special

from sdp.errors import NotApplicable

Array: TypeAlias = NDArray[np.float64]

ActivationName = Literal[
    "relu", "leaky_relu", "tanh", "sigmoid", "elu", "softplus", "identity", "gelu", "silu"
]


def _frozen(a: Any, ndim: int | None = None) -> Array:
    arr = np.array(a, dtype=np.float64, copy=True)
    if ndim is not None and arr.ndim != ndim:
        raise ValueError(f"expected a {ndim}-d array, got shape {arr.shape}")
    arr.setflags(write=False)
    return arr


def _gelu_prime(x: float) -> float:
    return float(special.ndtr(x) + x * math.exp(-0.5 * x * x) / math.sqrt(2 * math.pi))


def _silu_prime(x: float) -> float:
    s = float(special.expit(x))
    return s * (1.0 + x * (1.0 - s))


@cache
def _smooth_slope_bounds(name: str) -> tuple[float, float]:
    """Exact [min, max] of phi' for GELU (erf form) and SiLU, padded outward by 1e-9.

    GELU'(x) = Phi(x) + x phi(x) has extrema at x = +-sqrt(2): about [-0.1289, 1.1289].
    SiLU'(x) = s(x)(1 + x(1 - s(x))) has extrema at x ~ +-2.3994: about [-0.0998, 1.0998].
    """
    f = _gelu_prime if name == "gelu" else _silu_prime
    lo = optimize.minimize_scalar(f, bounds=(-6.0, 0.0), method="bounded", options={"xatol": 1e-12})
    hi = optimize.minimize_scalar(
        lambda x: -f(x), bounds=(0.0, 6.0), method="bounded", options={"xatol": 1e-12}
    )
    return float(lo.fun) - 1e-9, float(-hi.fun) + 1e-9


@dataclass(frozen=True)
class Activation:
    """Elementwise activation ``phi`` with slope bounds ``alpha <= phi' <= beta``.

    ``param`` is the negative slope of leaky_relu and the alpha of elu.
    Slopes: relu/tanh/softplus [0, 1]; sigmoid [0, 1/4]; identity [1, 1];
    leaky_relu(a) [min(a,1), max(a,1)]; elu(a>=0) [0, max(1,a)]; gelu, silu computed exactly.
    """

    name: ActivationName
    param: float = 0.0

    def __post_init__(self) -> None:
        if self.name not in _ACTIVATIONS:
            raise ValueError(f"unknown activation {self.name!r}")
        if self.name == "elu" and self.param < 0:
            raise ValueError("elu alpha must be >= 0")
        if not math.isfinite(self.param):
            raise ValueError("activation parameter must be finite")

    @property
    def slope_bounds(self) -> tuple[float, float]:
        n, p = self.name, self.param
        if n in ("relu", "tanh", "softplus"):
            return 0.0, 1.0
        if n == "sigmoid":
            return 0.0, 0.25
        if n == "identity":
            return 1.0, 1.0
        if n == "leaky_relu":
            return min(p, 1.0), max(p, 1.0)
        if n == "elu":
            return 0.0, max(1.0, p)
        return _smooth_slope_bounds(n)

    def __call__(self, x: Array) -> Array:
        return _ACTIVATIONS[self.name](np.asarray(x, dtype=np.float64), self.param)


_ACTIVATIONS: dict[str, Any] = {
    "relu": lambda x, p: np.maximum(x, 0.0),
    "leaky_relu": lambda x, p: np.where(x >= 0, x, p * x),
    "tanh": lambda x, p: np.tanh(x),
    "sigmoid": lambda x, p: special.expit(x),
    "elu": lambda x, p: np.where(x > 0, x, p * np.expm1(np.minimum(x, 0.0))),
    "softplus": lambda x, p: np.logaddexp(0.0, x),
    "identity": lambda x, p: x,
    "gelu": lambda x, p: x * special.ndtr(x),
    "silu": lambda x, p: x * special.expit(x),
}


@dataclass(frozen=True, eq=False)
class Dense:
    """z -> W z + b with W of shape (out, in)."""

    weight: Array
    bias: Array

    def __post_init__(self) -> None:
        object.__setattr__(self, "weight", _frozen(self.weight, 2))
        object.__setattr__(self, "bias", _frozen(self.bias, 1))
        if self.bias.shape[0] != self.weight.shape[0]:
            raise ValueError(f"bias {self.bias.shape} does not match weight {self.weight.shape}")

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[0])

    def apply(self, x: Array) -> Array:
        """Batched affine map, x: (batch, in) -> (batch, out)."""
        return x @ self.weight.T + self.bias

    def apply_linear(self, x: Array) -> Array:
        return x @ self.weight.T

    def apply_transpose(self, y: Array) -> Array:
        """Adjoint of the linear part, y: (batch, out) -> (batch, in)."""
        return y @ self.weight

    def matrix(self) -> Array:
        return self.weight


@dataclass(frozen=True, eq=False)
class Conv2d:
    """2-D cross-correlation (ONNX/torch ``Conv``) on a fixed input shape, as a linear map.

    weight: (C_out, C_in / groups, kh, kw); in_shape: (C_in, H, W);
    padding: (top, left, bottom, right). Input and output are flattened in C-order.
    """

    weight: Array
    bias: Array
    in_shape: tuple[int, int, int]
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int, int, int] = (0, 0, 0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "weight", _frozen(self.weight, 4))
        object.__setattr__(self, "bias", _frozen(self.bias, 1))
        object.__setattr__(self, "in_shape", tuple(int(v) for v in self.in_shape))
        co, ci_g, _, _ = self.weight.shape
        if self.in_shape[0] != ci_g * self.groups or co % self.groups:
            raise ValueError(
                f"conv weight {self.weight.shape} with groups={self.groups} "
                f"does not fit input {self.in_shape}"
            )
        if self.bias.shape != (co,):
            raise ValueError(f"conv bias {self.bias.shape} does not match {co} channels")
        if min(self.out_shape) <= 0:
            raise ValueError(f"conv produces an empty output {self.out_shape}")

    @property
    def out_shape(self) -> tuple[int, int, int]:
        _, h, w = self.in_shape
        co, _, kh, kw = self.weight.shape
        pt, pl, pb, pr = self.padding
        (sh, sw), (dh, dw) = self.stride, self.dilation
        ho = (h + pt + pb - dh * (kh - 1) - 1) // sh + 1
        wo = (w + pl + pr - dw * (kw - 1) - 1) // sw + 1
        return int(co), int(ho), int(wo)

    @property
    def in_features(self) -> int:
        return math.prod(self.in_shape)

    @property
    def out_features(self) -> int:
        return math.prod(self.out_shape)

    def _taps(self) -> Iterator[tuple[int, int, slice, slice]]:
        """(i, j, rows, cols): kernel tap (i, j) reads padded input at these strided slices."""
        _, ho, wo = self.out_shape
        _, _, kh, kw = self.weight.shape
        (sh, sw), (dh, dw) = self.stride, self.dilation
        for i in range(kh):
            for j in range(kw):
                r0, c0 = i * dh, j * dw
                yield (
                    i,
                    j,
                    slice(r0, r0 + sh * (ho - 1) + 1, sh),
                    slice(c0, c0 + sw * (wo - 1) + 1, sw),
                )

    def apply_linear(self, x: Array) -> Array:
        b = x.shape[0]
        c, h, w = self.in_shape
        pt, pl, pb, pr = self.padding
        xp = np.zeros((b, c, h + pt + pb, w + pl + pr))
        xp[:, :, pt : pt + h, pl : pl + w] = x.reshape(b, c, h, w)
        co, cig, _, _ = self.weight.shape
        g = self.groups
        cog = co // g
        _, ho, wo = self.out_shape
        out = np.zeros((b, g, cog, ho, wo))
        xg = xp.reshape(b, g, cig, *xp.shape[2:])
        wg = self.weight.reshape(g, cog, cig, *self.weight.shape[2:])
        for i, j, rs, cs in self._taps():
            # out[b, g, o, :, :] += sum_c w[g, o, c, i, j] * x[b, g, c, rs, cs]
            out += np.einsum("goc,bgchw->bgohw", wg[:, :, :, i, j], xg[:, :, :, rs, cs])
        return out.reshape(b, -1)

    def apply(self, x: Array) -> Array:
        _, ho, wo = self.out_shape
        return self.apply_linear(x) + np.repeat(self.bias, ho * wo)

    def apply_transpose(self, y: Array) -> Array:
        b = y.shape[0]
        c, h, w = self.in_shape
        pt, pl, pb, pr = self.padding
        co, cig, _, _ = self.weight.shape
        g = self.groups
        cog = co // g
        _, ho, wo = self.out_shape
        yg = y.reshape(b, g, cog, ho, wo)
        wg = self.weight.reshape(g, cog, cig, *self.weight.shape[2:])
        xp = np.zeros((b, g, cig, h + pt + pb, w + pl + pr))
        for i, j, rs, cs in self._taps():
            xp[:, :, :, rs, cs] += np.einsum("goc,bgohw->bgchw", wg[:, :, :, i, j], yg)
        return xp.reshape(b, c, h + pt + pb, w + pl + pr)[:, :, pt : pt + h, pl : pl + w].reshape(
            b, -1
        )

    def matrix(self) -> Array:
        """The dense (out_features, in_features) matrix of the linear part."""
        return self.apply_transpose(np.eye(self.out_features))


Affine: TypeAlias = Dense | Conv2d


@dataclass(frozen=True, eq=False)
class Residual:
    """z -> body(z) + shortcut(z); an empty shortcut is the identity."""

    body: tuple[Op, ...]
    shortcut: tuple[Op, ...] = ()

    def apply(self, x: Array) -> Array:
        return _run(self.body, x) + _run(self.shortcut, x)


Op: TypeAlias = Dense | Conv2d | Activation | Residual


def _run(ops: tuple[Op, ...], x: Array) -> Array:
    for op in ops:
        x = op(x) if isinstance(op, Activation) else op.apply(x)
    return x


@dataclass(frozen=True, eq=False)
class Chain:
    """design.md §2 normal form: ``affines`` W_0..W_L, ``activations`` phi_0..phi_{L-1}."""

    affines: tuple[Affine, ...]
    activations: tuple[Activation, ...]
    weight_errors: tuple[float, ...] = ()
    """Per affine layer, an upper bound of ||W_k - W_k*||_2, W_k* the exact product of the
    network's consecutive affine layers that W_k stands for (:func:`composition_error`); ()
    or 0.0 where W_k is a layer of the network as it is."""

    def __post_init__(self) -> None:
        if len(self.affines) != len(self.activations) + 1:
            raise ValueError("a chain has one more affine layer than activations")
        if self.weight_errors and len(self.weight_errors) != len(self.affines):
            raise ValueError("one weight error bound per affine layer")

    def errors(self) -> tuple[float, ...]:
        """:attr:`weight_errors`, one per affine layer (0.0 where none is given)."""
        return self.weight_errors or (0.0,) * len(self.affines)

    def weights(self) -> list[Array]:
        """Dense float64 matrices W_0..W_L (convolutions unrolled)."""
        return [a.matrix() for a in self.affines]

    @property
    def hidden_sizes(self) -> list[int]:
        return [a.out_features for a in self.affines[:-1]]

    def slopes(self) -> list[tuple[float, float]]:
        return [phi.slope_bounds for phi in self.activations]


@dataclass(frozen=True)
class InputLayout:
    """The model file's own input layout, when it differs from the IR's by an axis permutation.

    An ONNX file whose raw input goes straight into a Transpose (e.g. NHWC -> NCHW before a
    Conv) is imported with the transposed layout as ``Network.input_shape``; the file (and
    onnxruntime) takes inputs of ``shape``. For one input x of the file's ``shape``::

        z = x.transpose(perm).ravel()        # the IR input, laid out as Network.input_shape

    so ``Network.input_shape == tuple(shape[p] for p in perm)``. ``shape`` drops the batch dim
    as ``Network.input_shape`` does.

    Warning:
        The permutation is an input convention, not part of the function that is bounded:
        ``Network.content_hash`` (what certificates name) does not include it, and an l2
        Lipschitz bound or radius holds unchanged in either layout (a permutation is an
        isometry).
    """

    shape: tuple[int, ...]
    perm: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(v) for v in self.shape))
        object.__setattr__(self, "perm", tuple(int(v) for v in self.perm))
        if sorted(self.perm) != list(range(len(self.shape))):
            raise ValueError(f"{self.perm} is not a permutation of the axes of {self.shape}")

    @property
    def ir_shape(self) -> tuple[int, ...]:
        return tuple(self.shape[p] for p in self.perm)

    def index(self) -> NDArray[np.intp]:
        """``idx`` with ``z = x_flat[idx]``: IR position k reads file position idx[k]."""
        size = math.prod(self.shape)
        return np.arange(size).reshape(self.shape).transpose(self.perm).ravel()


@dataclass(frozen=True, eq=False)
class Network:
    """A network: ``ops`` applied to flat inputs of ``input_shape``.

    ``sandwich`` holds the raw sandwich parameters (:class:`sdp.sandwich.SandwichParams`)
    when the network came from a sandwich model; the closed-form check uses them.
    ``input_layout`` (:class:`InputLayout`) is set when the model file takes its input in
    another axis order than ``input_shape`` (an absorbed input Transpose); None otherwise.
    :meth:`forward` and every bound work in the IR layout; :meth:`ir_inputs` maps rows in the
    file's layout (what onnxruntime takes) to it.
    """

    input_shape: tuple[int, ...]
    ops: tuple[Op, ...]
    sandwich: Any = None
    name: str = ""
    input_layout: InputLayout | None = None
    _hash: list[str] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_shape", tuple(int(v) for v in self.input_shape))
        object.__setattr__(self, "ops", tuple(self.ops))
        layout = self.input_layout
        if layout is not None:
            if layout.ir_shape != self.input_shape:
                raise ValueError(
                    f"input layout {layout} does not give the input shape {self.input_shape}"
                )
            if layout.perm == tuple(range(len(layout.perm))):
                object.__setattr__(self, "input_layout", None)  # the same layout
        n_out = _check_sizes(self.ops, self.input_size)
        object.__setattr__(self, "_out", n_out)

    @property
    def input_size(self) -> int:
        return math.prod(self.input_shape)

    @property
    def output_size(self) -> int:
        return int(self._out)  # type: ignore[attr-defined]

    @property
    def file_input_shape(self) -> tuple[int, ...]:
        """The input shape of the model file (what onnxruntime takes, batch dim dropped):
        ``input_layout.shape`` for a permuted input, else ``input_shape``."""
        return self.input_shape if self.input_layout is None else self.input_layout.shape

    def ir_inputs(self, x: Any) -> Array:
        """Rows in the file's layout -> float64 rows (batch, n0) in the IR layout.

        x: (batch, n0) flat rows (C-order of :attr:`file_input_shape`) or
        (batch, *file_input_shape). Without an :attr:`input_layout` this only reshapes.
        """
        arr = np.asarray(x, dtype=np.float64)
        arr = arr.reshape(arr.shape[0], -1)
        if arr.shape[1] != self.input_size:
            raise ValueError(
                f"input has {arr.shape[1]} features, the network expects {self.input_size}"
            )
        if self.input_layout is None:
            return arr
        return arr[:, self.input_layout.index()]

    @property
    def is_chain(self) -> bool:
        return not any(isinstance(op, Residual) for op in self.ops)

    @property
    def kind(self) -> str:
        """feedforward | conv | residual | sandwich (for metadata)."""
        if self.sandwich is not None:
            return "sandwich"
        if not self.is_chain:
            return "residual"
        if any(isinstance(op, Conv2d) for op in _walk(self.ops)):
            return "conv"
        return "feedforward"

    @property
    def num_parameters(self) -> int:
        return sum(
            op.weight.size + op.bias.size
            for op in _walk(self.ops)
            if isinstance(op, Dense | Conv2d)
        )

    def forward(self, x: Any) -> Array:
        """Logits in float64. x: (n0,), (batch, n0) or (batch, *input_shape)."""
        arr = np.asarray(x, dtype=np.float64)
        single = arr.ndim == 1 or arr.shape == self.input_shape
        arr = arr.reshape(1 if single else arr.shape[0], -1)
        if arr.shape[1] != self.input_size:
            raise ValueError(
                f"input has {arr.shape[1]} features, the network expects {self.input_size}"
            )
        y = _run(self.ops, arr)
        return y[0] if single else y

    def chain(self) -> Chain:
        """Normal form for LipSDP: merge consecutive dense layers, add identity layers at the ends.

        A trailing activation (e.g. ERAN nets end in Relu) becomes phi followed by y = I z;
        an activation not preceded by an affine layer (at the start, or a second activation
        in a row) gets an identity layer before it. Raises NotApplicable for residual networks.
        """
        if not self.is_chain:
            raise NotApplicable("residual network: not a chain; use the compositional bound")
        affines: list[Affine] = []
        errors: list[float] = []
        acts: list[Activation] = []
        pending: Affine | None = None
        error = 0.0  # bound of ||pending - exact product||_2 (composition_error)
        n = self.input_size
        for op in self.ops:
            if isinstance(op, Activation):
                if pending is None:
                    pending = Dense(np.eye(n), np.zeros(n))
                affines.append(pending)
                errors.append(error)
                acts.append(op)
                pending, error = None, 0.0
            else:
                assert isinstance(op, Dense | Conv2d)
                pending, error = (op, 0.0) if pending is None else _compose(pending, op, error)
            n = _out_size(op, n)
        if pending is None:
            pending = Dense(np.eye(n), np.zeros(n))
        affines.append(pending)
        errors.append(error)
        return Chain(tuple(affines), tuple(acts), tuple(errors) if any(errors) else ())

    def content_hash(self) -> str:
        """sha256 over the structure and the float64 bytes of every array (stable across runs).

        ``input_layout`` is left out on purpose: the hash names the IR function that bounds and
        certificates are about, and a permutation of its input changes no l2 bound.
        """
        if not self._hash:
            h = hashlib.sha256()
            h.update(repr(self.input_shape).encode())
            _hash_ops(h, self.ops)
            self._hash.append(h.hexdigest())
        return self._hash[0]


_UNIT_ROUNDOFF = 2.0**-53
_SUBNORMAL = 2.0**-1074
"""The smallest positive float64: the spacing of the subnormal range."""


def frobenius_norm(x: Array) -> float:
    """||x||_F, to a relative 1e-12 or so, without the over/underflow of summing squares
    (``np.linalg.norm`` squares the entries: 0.0 for entries below 1e-162, inf above 1e154):
    scaled by max|x|, an entry of the scaled matrix is 1, so the dropped squares are below
    1e-308 relative. inf where the norm itself overflows."""
    m = float(np.max(np.abs(x), initial=0.0))
    if not m or not math.isfinite(m):
        return m
    return m * float(np.linalg.norm(np.asarray(x) / m))


def composition_error(second: Array, first: Array, first_error: float = 0.0) -> float:
    """Upper bound of ||fl(A B) - A B*||_2 for A = ``second``, B = ``first`` (float64) and B*
    the exact matrix B stands for, ||B - B*||_2 <= ``first_error``.

    Each entry of fl(A B) is an inner product of length k computed in floating point, in any
    order (BLAS blocking, FMA): |fl(A B) - A B| <= gamma_k |A| |B| entrywise, gamma_k =
    k u / (1 - k u) (Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., §3.5),
    and ||A (B - B*)||_2 <= ||A||_F ||B - B*||_2. With gradual underflow every product adds
    at most eta = 2^-1075 absolute (Higham (2.8); sums that underflow are exact), so each entry
    gains k eta (and the bound's own float evaluation a few more): (2 k sqrt(m n) + 4)
    2^-1074 in all. The Frobenius norms are computed scaled (:func:`frobenius_norm`); the
    factor 1.001 covers their rounding (relative k u and (m n) u, below 1e-4 for any
    matrix that fits in memory). Without this bound the chain's composite weight is taken as
    exact, and a product that cancels in float64 (1e20 (1 + 2^-60) - 1e20 -> 0) makes LipSDP
    certify a bound of another function (review, session 11); without the underflow term the
    same happens at 1e-170 (review, session 11, second wave). A zero factor's product is exact.
    """
    m, k = second.shape
    n = first.shape[1]
    rounded = bool(np.any(second) and np.any(first))  # else fl(A B) = A B = 0 exactly
    gamma = k * _UNIT_ROUNDOFF / (1.0 - k * _UNIT_ROUNDOFF)
    with np.errstate(over="ignore", invalid="ignore"):
        rounding = gamma * frobenius_norm(np.abs(second) @ np.abs(first)) if rounded else 0.0
        carried = frobenius_norm(second) * first_error if first_error else 0.0
        underflow = (2 * k * math.ceil(math.sqrt(m * n)) + 4) * _SUBNORMAL if rounded else 0.0
        bound = (rounding + carried) * 1.001 + underflow
        if carried and not rounding:  # A (B - B*) alone: its float product may underflow
            bound += 4 * _SUBNORMAL
    return bound if math.isfinite(bound) else math.inf


def _compose(first: Affine, second: Affine, first_error: float) -> tuple[Dense, float]:
    """second(first(z)) as one dense layer, and the bound of its weight's distance to the
    exact product (:func:`composition_error`; ``first_error`` is first's own)."""
    w_first, w_second = first.matrix(), second.matrix()  # unrolled once (convolutions)
    b = second.apply(first.apply(np.zeros((1, first.in_features))))
    error = composition_error(w_second, w_first, first_error)
    return Dense(w_second @ w_first, b.ravel()), error


def _out_size(op: Op, n: int) -> int:
    if isinstance(op, Dense | Conv2d):
        return op.out_features
    return n if isinstance(op, Activation) else _check_sizes(op.body, n)


def _check_sizes(ops: tuple[Op, ...], n: int) -> int:
    for op in ops:
        if isinstance(op, Dense | Conv2d):
            if op.in_features != n:
                raise ValueError(f"layer expects {op.in_features} inputs but receives {n}")
            n = op.out_features
        elif isinstance(op, Residual):
            nb = _check_sizes(op.body, n)
            ns = _check_sizes(op.shortcut, n)
            if nb != ns:
                raise ValueError(f"residual branches disagree: {nb} vs {ns}")
            n = nb
    return n


def _walk(ops: tuple[Op, ...]) -> Iterator[Op]:
    for op in ops:
        yield op
        if isinstance(op, Residual):
            yield from _walk(op.body)
            yield from _walk(op.shortcut)


def _hash_ops(h: Any, ops: tuple[Op, ...]) -> None:
    for op in ops:
        h.update(type(op).__name__.encode())
        if isinstance(op, Activation):
            h.update(f"{op.name}:{op.param!r}".encode())
        elif isinstance(op, Residual):
            h.update(b"(")
            _hash_ops(h, op.body)
            h.update(b"|")
            _hash_ops(h, op.shortcut)
            h.update(b")")
        else:
            if isinstance(op, Conv2d):
                h.update(
                    repr((op.in_shape, op.stride, op.padding, op.dilation, op.groups)).encode()
                )
            for a in (op.weight, op.bias):
                h.update(repr(a.shape).encode())
                h.update(np.ascontiguousarray(a, dtype="<f8").tobytes())
