"""Float64 values with rigorous absolute error bounds, for re-checking optimised local bounds.

An :class:`EReal` is a pair (v, e) of float64 arrays that stands for an unknown exact real
array X with |X - v| <= e entrywise. Operations return pairs with the same meaning, using the
standard model of floating-point arithmetic (Higham, "Accuracy and Stability of Numerical
Algorithms", 2nd ed., §2.2 and §3.1): one correctly rounded operation has
fl(a op b) = (a op b)(1 + d), |d| <= u = 2^-53, and a dot product of length n computed in any
order (BLAS, FMA) has |fl(x^T y) - x^T y| <= gamma_n |x|^T |y| with gamma_n = n u / (1 - n u).

Every error expression is itself evaluated in floating point, so it is widened by the factor
``1 + 16 u`` (covers the few roundings in it; sums of n error terms also by 1 + 2 gamma_n) and
by ``TINY`` per entry (underflow). Inputs
that are exact floats (weights, biases, the input point, chosen multipliers) enter with e = 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from sdp.ir import Array

U = float(np.finfo(np.float64).eps) / 2
"""Unit roundoff of float64."""
TINY = 2.0**-1000
"""Absolute slack per entry for subnormal results."""


def gamma(n: int) -> float:
    """gamma_n = n u / (1 - n u), rounded up."""
    return n * U / (1 - n * U) * (1 + 4 * U)


def up(x: Array) -> Array:
    """Widen a non-negative error expression computed in floating point."""
    return np.asarray(x * (1 + 16 * U) + TINY, dtype=np.float64)


def lower(v: Array, e: Array) -> Array:
    """A float <= every real in [v - e, v + e] (rounding of the subtraction covered)."""
    d = v - e
    return np.asarray(d - 2 * U * np.abs(d) - TINY, dtype=np.float64)


def upper(v: Array, e: Array) -> Array:
    """A float >= every real in [v - e, v + e]."""
    d = v + e
    return np.asarray(d + 2 * U * np.abs(d) + TINY, dtype=np.float64)


@dataclass(frozen=True, eq=False)
class EReal:
    """v (float64 array) with |exact - v| <= e entrywise."""

    v: Array
    e: Array

    @staticmethod
    def exact(x: Array | float) -> EReal:
        a = np.asarray(x, dtype=np.float64)
        return EReal(a, np.zeros_like(a))

    def __add__(self, o: EReal) -> EReal:
        v = self.v + o.v
        return EReal(v, up(self.e + o.e + U * np.abs(v)))

    def __sub__(self, o: EReal) -> EReal:
        v = self.v - o.v
        return EReal(v, up(self.e + o.e + U * np.abs(v)))

    def __getitem__(self, idx: Any) -> EReal:
        return EReal(self.v[idx], self.e[idx])

    def __neg__(self) -> EReal:
        return EReal(-self.v, self.e)

    def __mul__(self, o: EReal) -> EReal:
        v = self.v * o.v
        e = np.abs(self.v) * o.e + np.abs(o.v) * self.e + self.e * o.e + U * np.abs(v)
        return EReal(v, up(e))

    def scale(self, s: Array | float) -> EReal:
        """Times an exact float array s."""
        s = np.asarray(s, dtype=np.float64)
        v = self.v * s
        return EReal(v, up(np.abs(s) * self.e + U * np.abs(v)))

    def div(self, d: Array) -> EReal:
        """Divided by an exact positive float array d."""
        v = self.v / d
        return EReal(v, up(self.e / d + U * np.abs(v)))

    def lo(self) -> Array:
        return lower(self.v, self.e)

    def hi(self) -> Array:
        return upper(self.v, self.e)

    def sum(self, axis: int = -1) -> EReal:
        """Sum along ``axis`` (any summation order)."""
        n = self.v.shape[axis]
        v = self.v.sum(axis=axis)
        e = self.e.sum(axis=axis) + gamma(n) * np.abs(self.v).sum(axis=axis)
        return EReal(v, up(e * (1 + 2 * gamma(n))))

    def matmul(self, b: Array) -> EReal:
        """self @ b for an exact float matrix b (self: (..., k), b: (k, m))."""
        ab = np.abs(b)
        v = self.v @ b
        k = b.shape[0]
        e = self.e @ ab + gamma(k) * (np.abs(self.v) @ ab)
        return EReal(v, up(e * (1 + 2 * gamma(k))))


def matmul_exact(a: Array, b: Array) -> EReal:
    """a @ b for exact float arrays, with the rounding error of the products and sums."""
    v = a @ b
    k = a.shape[-1]
    e = gamma(k) * (np.abs(a) @ np.abs(b))
    return EReal(v, up(e * (1 + 2 * gamma(k))))


def norm_upper(x: EReal) -> Array:
    """Upper bounds of the l2 norms of the rows of the exact array (rows of x.v +- x.e)."""
    from sdp.rounding import row_norm_upper_bounds

    v2 = np.atleast_2d(x.v)
    e2 = np.atleast_2d(x.e)
    s = row_norm_upper_bounds(v2) + row_norm_upper_bounds(e2)
    return np.asarray(s * (1 + 4 * U) + TINY, dtype=np.float64)
