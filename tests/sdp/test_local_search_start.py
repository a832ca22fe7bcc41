"""Where the radius search's bisection methods start (:func:`sdp.local.certify._first_probe`).

A later method of ``auto`` (crown after beta-crown's own search) used to start at 1e-12 when
nothing was certified yet, and grows at most 4x per probe: ~20 probes to reach a typical
radius, so under a short budget ``auto`` reported 1e-12 where ``crown`` alone certified 0.5.
"""

from __future__ import annotations

import numpy as np

from sdp.local.certify import _first_probe


def test_nothing_certified_starts_at_the_guess_for_every_method() -> None:
    guess = np.array([0.8, 0.02, 3.0])
    lo = np.zeros(3)
    for first in (True, False):
        np.testing.assert_array_equal(_first_probe(guess, lo, first), 0.5 * guess)


def test_above_a_certified_radius() -> None:
    guess = np.array([0.8, 0.8, 0.8])
    lo = np.array([0.1, 0.5, 1e-300])
    np.testing.assert_array_equal(_first_probe(guess, lo, True), [0.4, 1.0, 0.4])
    # a later method goes on from the earlier ones' radius (1.25 x), at least 1e-12
    np.testing.assert_array_equal(_first_probe(guess, lo, False), [0.125, 0.625, 1e-12])


def test_a_probe_is_always_positive() -> None:
    got = _first_probe(np.array([0.0, 1.0]), np.zeros(2), False)
    assert (got > 0).all()
