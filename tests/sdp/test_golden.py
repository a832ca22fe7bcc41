"""sdp.bounds.golden: the golden-section helper of the residual and ECLipsE scale searches."""

from __future__ import annotations

import math

from sdp.bounds.golden import golden_section


def test_golden_section_finds_the_minimum_and_returns_its_best_probe() -> None:
    calls: list[float] = []

    def f(x: float) -> float:
        calls.append(x)
        return (x - 0.3) ** 2 + 1.0

    x, fx = golden_section(f, -2.0, 2.0, 30)
    assert len(calls) == 32
    assert abs(x - 0.3) < 1e-5 and fx == f(x)
    assert fx == min(f(c) for c in calls[:32])


def test_infinite_values_never_win() -> None:
    x, fx = golden_section(lambda x: math.inf if x < 1.0 else x, 0.0, 3.0, 12)
    assert 1.0 <= x < 1.01 and fx == x
