"""A priori bound on the rounding error of a forward pass in floating point (for sound radii).

A certified radius m / (sqrt(2) L) is only sound for the EXACT margin m. Logits computed in
float32 differ from the exact ones by up to ~1e-7 relative, enough to enlarge a radius
beyond the true distance to the decision boundary. This module bounds ||f^(x) - f(x)||_2, the
error of the computed logits, by E(x) = e0 + e1 ||x||_2 (two constants per network and
precision), so a radius from computed logits can use the margin m^ - sqrt(2) E(x) <= m.

Model (standard forward error analysis, Higham, "Accuracy and Stability of Numerical
Algorithms", 2nd ed., §3.1-3.5), unit roundoff u, gamma_n = n u / (1 - n u):

* input cast to the working precision: ||x^ - x|| <= u ||x||;
* affine layer y = W z + b with n terms per output (dense: n = in; conv: C_in/g kh kw):
  stored weights |W^ - W| <= u |W|, and any summation order / FMA gives
  |fl(W^ z^ + b^) - (W^ z^ + b^)| <= gamma_{n+1} (|W^| |z^| + |b^|) entrywise, so
  E_out <= ||W|| E_in + (u + gamma_{n+1}(1 + u)) (|| |W| || (N_in + E_in) + ||b||) + u ||b||
  with N_in >= ||z|| (exact), || |W| || <= ||W||_F (dense) or sqrt(||A||_1 ||A||_inf) (conv);
* activation phi with slopes in [a, b], l = max(|a|, |b|): phi^(v) = phi(v) + d with
  |d| <= c u (|phi(v)| + l |v|) + tiny (library functions are accurate to a few ulps; c = 16;
  relu/identity are exact, leaky_relu is one product), and ||phi(v)|| <= |phi(0)| sqrt(n) + l ||v||;
* residual y = body + shortcut: the two errors add, plus one rounding of the sum.

Each quantity is an affine function of s = ||x||_2 with non-negative coefficients, so the
whole bound is E(x) = e0 + e1 s. ``safety`` multiplies every rounding term (e.g. for cuDNN
convolution algorithms such as FFT/Winograd, whose error constants are larger than a GEMM's).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from sdp.bounds.naive import conv_holder_bound, conv_norm, dense_norm
from sdp.ir import Activation, Array, Conv2d, Dense, Network, Op, Residual

ACTIVATION_ULPS = 16.0
"""Assumed accuracy (in units of u, relative to |phi(v)| + l |v|) of library activations."""
_TINY = 1e-30
"""Per-element absolute slack for underflow / flush-to-zero (float32 smallest normal ~1e-38)."""

# An affine form c0 + c1 * s (s = ||x||_2) as a pair.
_Form = tuple[float, float]


def _add(*fs: _Form) -> _Form:
    return (sum(f[0] for f in fs), sum(f[1] for f in fs))


def _scale(k: float, f: _Form) -> _Form:
    return (k * f[0], k * f[1])


def _gamma(n: int, u: float) -> float:
    return n * u / (1 - n * u)


@dataclass(frozen=True)
class LogitErrorBound:
    """E(x) = e0 + e1 ||x||_2 bounds ||f^(x) - f(x)||_2 for logits computed with roundoff u."""

    e0: float
    e1: float
    unit_roundoff: float

    def __call__(self, x: Array) -> Array:
        """Per-row bound for inputs x of shape (B, n0), at upper bounds of ||x_i||_2."""
        return self.at_norms(row_norm_upper_bounds(x))

    def at_norms(self, norms: Array) -> Array:
        """E at given upper bounds of ||x||_2 (E is increasing in ||x||)."""
        return np.asarray((self.e0 + self.e1 * norms) * (1 + 1e-12), dtype=np.float64)


#: Sums of squares in [_SUMSQ_MIN, inf) cannot have lost more than n 2^-1022 to underflow.
_SUMSQ_MIN = 2.0**-900
_U64 = float(np.finfo(np.float64).eps) / 2  # unit roundoff of float64
_TINY64 = float(np.finfo(np.float64).tiny)  # smallest normal float64, 2^-1022


def row_norm_upper_bounds(x: Array) -> Array:
    """Upper bounds on ||x_i||_2 for the rows of x (B, ...), in float64.

    s = fl(sum_j x_ij^2) (one pass, any summation order) satisfies s >= (1 - gamma_{n+1})
    ||x_i||^2 when nothing overflowed or underflowed (Higham §3.1), so sqrt(s) (1 + 4 (n + 2) u)
    >= ||x_i|| with the rounding of sqrt and of the product covered. Rows where s is not finite
    (overflow) or below 2^-900 (underflow may matter) use the scaled norm
    max|x| ||x / max|x||| with the same widening; the smallest normal number 2^-1022 is added
    to every bound for results in the subnormal range (absolute rounding).
    """
    a = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    n = a.shape[1]
    widen = 1.0 + 4.0 * (n + 2) * _U64
    s = np.einsum("ij,ij->i", a, a)
    norms = np.sqrt(s)
    bad = ~(np.isfinite(s) & (s >= _SUMSQ_MIN))
    if bad.any():
        r = np.abs(a[bad])
        top = r.max(axis=1, initial=0.0)
        norms[bad] = top * np.linalg.norm(r / np.where(top > 0, top, 1.0)[:, None], axis=1)
    return np.asarray(norms * widen + _TINY64, dtype=np.float64)


def _affine_norms(op: Dense | Conv2d) -> tuple[float, float, float, int]:
    """(||W||_2 upper bound, || |W| ||_2 upper bound, ||b_full||_2, terms per output)."""
    if isinstance(op, Dense):
        spec = dense_norm(op.weight)
        absn = float(np.linalg.norm(op.weight)) * (1 + 1e-12)
        return spec, max(absn, spec), float(np.linalg.norm(op.bias)), op.in_features
    spec, _ = conv_norm(op)
    absn = conv_holder_bound(op)
    _, ho, wo = op.out_shape
    _, cig, kh, kw = op.weight.shape
    return spec, max(absn, spec), float(np.linalg.norm(op.bias)) * math.sqrt(ho * wo), cig * kh * kw


def _act_error_constant(phi: Activation) -> float:
    if phi.name in ("relu", "identity"):
        return 0.0
    if phi.name == "leaky_relu":
        return 1.0
    return ACTIVATION_ULPS


def _propagate(
    ops: tuple[Op, ...], n: int, norm: _Form, err: _Form, u: float, safety: float
) -> tuple[int, _Form, _Form]:
    """(width, bound on ||z|| exact, bound on ||z^ - z||) after ``ops``."""
    for op in ops:
        if isinstance(op, Dense | Conv2d):
            spec, absn, bnorm, terms = _affine_norms(op)
            d = safety * (u + _gamma(terms + 1, u) * (1 + u))
            computed = _add(norm, err)
            err = _add(
                _scale(spec, err), _scale(d * absn, computed), (d * bnorm + safety * u * bnorm, 0.0)
            )
            norm = _add(_scale(spec, norm), (bnorm, 0.0))
            n = op.out_features
        elif isinstance(op, Activation):
            a, b = op.slope_bounds
            lip = max(abs(a), abs(b))
            phi0 = abs(float(op(np.zeros(1))[0])) * math.sqrt(n)
            c = safety * _act_error_constant(op) * u
            computed_in = _add(norm, err)
            err = _add(
                _scale(lip, err),
                _scale(c, _add((phi0, 0.0), _scale(2 * lip, computed_in))),
                (_TINY * math.sqrt(n), 0.0),
            )
            norm = _add((phi0, 0.0), _scale(lip, norm))
        elif isinstance(op, Residual):
            nb, norm_b, err_b = _propagate(op.body, n, norm, err, u, safety)
            _, norm_s, err_s = (
                _propagate(op.shortcut, n, norm, err, u, safety) if op.shortcut else (n, norm, err)
            )
            norm = _add(norm_b, norm_s)
            err = _add(err_b, err_s, _scale(safety * u, _add(norm, err_b, err_s)))
            n = nb
    return n, norm, err


def logit_error_bound(
    net: Network, unit_roundoff: float, *, safety: float = 1.0
) -> LogitErrorBound:
    """Constants (e0, e1) with ||f^(x) - f(x)||_2 <= e0 + e1 ||x||_2 for every input x.

    Args:
        net: the network whose logits are computed.
        unit_roundoff: u of the working precision (2^-24 float32, 2^-53 float64).
        safety: factor on every rounding term (>= 1).
    """
    u = float(unit_roundoff)
    if not 0 < u < 1e-3:
        raise ValueError("unit_roundoff must be a small positive number")
    _, _, err = _propagate(net.ops, net.input_size, (0.0, 1.0), (0.0, safety * u), u, safety)
    return LogitErrorBound(float(err[0]), float(err[1]), u)


def unit_roundoff(dtype: str) -> float:
    """u for 'float32' / 'float64'."""
    return float(np.finfo(np.dtype(dtype)).eps) / 2
