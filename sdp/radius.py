"""Certified l2 robustness radii from a Lipschitz bound (design.md §4).

For logits f with ||f(x) - f(x')||_2 <= L ||x - x'||_2, predicted class y and margin
m = f_y(x) - max_{j != y} f_j(x): for every j, f_y - f_j is sqrt(2) L-Lipschitz (the row
e_y - e_j has norm sqrt(2)), so no class overtakes y while ||x' - x||_2 < m / (sqrt(2) L).
With pairwise bounds L_yj >= Lip(f_y - f_j) the radius is min_{j != y} (f_y - f_j) / L_yj.

Rounding: the guarantee holds for the EXACT logits. ``logit_error`` E (per input, a bound on
||f^(x) - f(x)||_2 for the computed logits f^, see :mod:`sdp.rounding`) shrinks every
difference f_y - f_j by sqrt(2) E before dividing (each |(f^_y - f^_j) - (f_y - f_j)| <=
sqrt(2) E), and the quotient is rounded down by a few ulps. If the computed top class is not
the exact one, the shrunk margin is <= 0 and the radius is 0.

Warning: radii live in the network's input space (after any preprocessing folded into the
network); a margin <= 0 (misclassified-or-tie at x itself) gives radius 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from sdp.ir import Array

_ROUND_DOWN = 1.0 - 8 * np.finfo(np.float64).eps
"""Factor that covers the rounding of sqrt(2), the product and the quotient of a radius."""


@dataclass(frozen=True, eq=False)
class RadiusResult:
    """Per-input certification: arrays of length B (``correct`` None without labels)."""

    prediction: np.ndarray
    margin: Array
    radius: Array
    radius_pairwise: Array | None
    correct: np.ndarray | None
    lipschitz: float

    @property
    def best_radius(self) -> Array:
        """The larger of the global and pairwise radius (both are sound)."""
        if self.radius_pairwise is None:
            return self.radius
        return np.maximum(self.radius, self.radius_pairwise)


def certified_radius(
    logits: Array,
    lipschitz: float,
    *,
    labels: np.ndarray | None = None,
    pairwise: Array | None = None,
    logit_error: Array | float | None = None,
) -> RadiusResult:
    """Radii r = max(m - sqrt(2) E, 0) / (sqrt(2) L) per input; optional pairwise radii.

    Args:
        logits: (B, K) network outputs.
        lipschitz: certified l2 bound L of x -> logits (> 0).
        labels: optional (B,) integer labels; ``correct`` = (prediction == label).
        pairwise: optional (K, K) symmetric L_yj bounds on Lip(f_y - f_j); entries that are
            not finite and > 0 certify nothing for their pair (radius 0 from it).
        logit_error: optional bound E (scalar or (B,)) on ||computed - exact logits||_2.

    Example:
        >>> certified_radius(np.array([[3.0, 1.0]]), 1.0).radius.round(4)
        array([1.4142])
    """
    f = np.atleast_2d(np.asarray(logits, dtype=np.float64))
    if f.ndim != 2 or f.shape[1] < 2:
        raise ValueError(f"logits must be (batch, classes >= 2), got {f.shape}")
    if not (math.isfinite(lipschitz) and lipschitz > 0):
        raise ValueError("lipschitz must be a finite positive number")
    b, k = f.shape
    pred = np.argmax(f, axis=1)
    top = f[np.arange(b), pred]
    others = f.copy()
    others[np.arange(b), pred] = -np.inf
    margin = top - others.max(axis=1)
    err = np.broadcast_to(
        np.asarray(0.0 if logit_error is None else logit_error, dtype=np.float64), (b,)
    )
    if np.any(err < 0):
        raise ValueError("logit_error must be >= 0")
    # overflowed logits or an infinite error bound certify nothing (radius 0, never inf)
    usable_row = np.isfinite(f).all(axis=1) & np.isfinite(err)
    slack = math.sqrt(2.0) * np.where(usable_row, err, 0.0) * (1 + 1e-12)
    safe = np.where(usable_row, np.maximum(margin - slack, 0.0), 0.0)
    radius = safe / (math.sqrt(2.0) * lipschitz) * _ROUND_DOWN
    rp: Array | None = None
    if pairwise is not None:
        p = np.asarray(pairwise, dtype=np.float64)
        if p.shape != (k, k):
            raise ValueError(f"pairwise must be ({k}, {k}), got {p.shape}")
        diff = np.maximum(top[:, None] - f - np.reshape(slack, (-1, 1)), 0.0)  # f_y - f_j
        lyj = p[pred]  # (B, K)
        usable = np.isfinite(lyj) & (lyj > 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(usable, diff / np.where(usable, lyj, 1.0), 0.0) * _ROUND_DOWN
        ratio[np.arange(b), pred] = np.inf
        rp = np.maximum(ratio.min(axis=1), 0.0)
        rp = np.where(safe > 0, rp, 0.0)
    correct = None
    if labels is not None:
        lab = np.asarray(labels).reshape(-1)
        if lab.shape[0] != b:
            raise ValueError(f"{lab.shape[0]} labels for {b} inputs")
        correct = pred == lab.astype(np.int64)
    return RadiusResult(pred, margin, radius, rp, correct, float(lipschitz))


def certified_accuracy(radii: Array, correct: np.ndarray, eps: Array | float) -> Array:
    """Fraction of inputs that are correct AND certified at radius > eps, for each eps."""
    r = np.asarray(radii, dtype=np.float64).reshape(-1)
    c = np.asarray(correct, dtype=bool).reshape(-1)
    e = np.atleast_1d(np.asarray(eps, dtype=np.float64))
    if r.size == 0:
        return np.zeros_like(e)
    return np.asarray(((r[None, :] > e[:, None]) & c[None, :]).mean(axis=1), dtype=np.float64)
