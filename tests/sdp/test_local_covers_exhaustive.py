"""The branch-and-bound coverage checks never accept leaves that miss part of the ball.

``verify_local`` trusts a beta-crown / bab certificate's leaves only if they cover every sign
pattern of the split neurons (:func:`sdp.local.beta_crown.covers`,
:func:`sdp.local.bab._covers`): a false "covers" would let a tampered certificate drop the
leaf where the margin is negative. Checked here against exhaustive enumeration of the sign
patterns on random small leaf sets (a point with z_i = 0 lies on both sides, so covering the
+-1 patterns is covering the ball).
"""

from __future__ import annotations

import itertools

import numpy as np

from sdp.local import bab
from sdp.local.beta_crown import covers


def _truth(rows: np.ndarray, n: int) -> bool:
    """Every pattern v in {-1, 1}^n matches a row (0: either side)."""
    return all(
        any(all(s == 0 or s == v for s, v in zip(row, vec, strict=True)) for row in rows)
        for vec in itertools.product((-1, 1), repeat=n)
    )


def test_beta_crown_covers_matches_enumeration() -> None:
    rng = np.random.default_rng(0)
    seen = {True: 0, False: 0}
    for _ in range(1200):
        n, leaves = int(rng.integers(1, 5)), int(rng.integers(1, 9))
        p0 = rng.uniform(0.1, 0.8)
        rows = rng.choice([-1, 0, 1], size=(leaves, n), p=[(1 - p0) / 2, p0, (1 - p0) / 2])
        want = _truth(rows, n)
        seen[want] += 1
        assert covers(rows.astype(np.int8)) == want, rows.tolist()
    assert min(seen.values()) > 100  # both answers exercised


def test_bab_covers_never_accepts_a_gap() -> None:
    rng = np.random.default_rng(1)
    accepted = 0
    for _ in range(1200):
        n, leaves = int(rng.integers(1, 5)), int(rng.integers(1, 7))
        splits = []
        for _ in range(leaves):
            k = int(rng.integers(0, n + 1))
            idx = rng.choice(n, size=k, replace=False)
            splits.append(tuple((int(i), int(rng.choice([-1, 1]))) for i in idx))
        rows = np.zeros((leaves, n), dtype=int)
        for r, sp in enumerate(splits):
            for i, s in sp:
                rows[r, i] = s
        if bab._covers(splits):
            accepted += 1
            assert _truth(rows, n), splits
    assert accepted > 30
