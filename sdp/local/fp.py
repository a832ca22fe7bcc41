"""Rigorous floating-point helpers for local bounds (float64, round to nearest).

Model (Higham, "Accuracy and Stability of Numerical Algorithms", 2nd ed., §2.2 and §3.1):
unit roundoff u = 2^-53; every basic operation satisfies fl(a op b) = (a op b)(1 + d) + t with
|d| <= u and |t| <= eta (underflow; we take the generous eta = 2^-1022 per operation); a sum or
dot product of n terms in any order and with any blocking satisfies
|fl(sum) - sum| <= gamma_n sum |terms| + n eta, gamma_n = n u / (1 - n u).

Error bounds are themselves computed in floating point; a sum of non-negative terms computed in
float64 underestimates the exact sum by at most a factor (1 - gamma_N) >= 1/2 for any N < 2^51,
so every error term below is doubled (``_TWO``) to stay an upper bound.

References:
    N. J. Higham, Accuracy and Stability of Numerical Algorithms, SIAM 2002.
    A. Neumaier, O. Shcherbina, "Safe bounds in linear and mixed-integer linear programming",
    Math. Programming 99 (2004): rounding errors of a dual bound are absorbed with bounds on
    the primal variables, which is what :mod:`sdp.local.propagate` does with interval bounds.
"""

from __future__ import annotations

import numpy as np

from sdp.ir import Array

U = float(np.finfo(np.float64).eps) / 2
"""Unit roundoff of float64."""
ETA = 2.0**-1022
"""Absolute error allowance per operation for underflow (generous: the smallest normal)."""
_TWO = 2.0


def gamma(n: int) -> float:
    """gamma_n = n u / (1 - n u) (Higham §3.1)."""
    return n * U / (1.0 - n * U)


def err_scale(n: int) -> float:
    """Doubled gamma_{n+2}: the factor on sum |terms| that bounds a computed n-term sum's error."""
    return _TWO * gamma(n + 2)


def down(x: Array, mag: Array | float) -> Array:
    """A float <= the exact value of an expression computed as ``x`` with a few roundings.

    ``mag`` must bound the sum of the absolute values of the expression's terms (and of every
    intermediate result); each of up to 4 roundings moved the value by at most u * mag.
    The result is pushed one more ulp down; NaN becomes -inf (nothing certified).
    """
    r = np.nextafter(x - 8.0 * U * np.abs(mag) - 4 * ETA, -np.inf)
    return np.where(np.isnan(r), -np.inf, r)


def up(x: Array, mag: Array | float) -> Array:
    """Mirror of :func:`down`: a float >= the exact value; NaN becomes +inf."""
    r = np.nextafter(x + 8.0 * U * np.abs(mag) + 4 * ETA, np.inf)
    return np.where(np.isnan(r), np.inf, r)


def sum_down(a: Array, b: Array) -> Array:
    """A float <= a + b (exact) for floats a, b: one rounding to nearest, then one ulp down."""
    r = np.nextafter(a + b, -np.inf)
    return np.where(np.isnan(r), -np.inf, r)


def sum_up(a: Array, b: Array) -> Array:
    """A float >= a + b (exact)."""
    r = np.nextafter(a + b, np.inf)
    return np.where(np.isnan(r), np.inf, r)


def widen_up(x: Array, n: int = 1) -> Array:
    """An upper bound of a non-negative quantity computed with n-term sums: doubled rel. error."""
    return np.asarray(x * (1.0 + err_scale(n)) + (n + 2) * ETA, dtype=np.float64)
