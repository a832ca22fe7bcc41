"""Golden-section search of a scalar function on an interval (a heuristic minimiser).

The bound searches use it on log-scales of multipliers, where the estimated (or certified)
rho is roughly unimodal in the scale: each step shrinks the bracket [lo, hi] by the golden
ratio g = (sqrt 5 - 1) / 2 around the better of the two inner probes a = hi - g (hi - lo),
b = lo + g (hi - lo) (Kiefer, "Sequential minimax search for a maximum", Proc. AMS 1953).
Only a heuristic: a caller certifies whatever it takes from it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

GOLDEN = (math.sqrt(5) - 1) / 2


def golden_section(
    f: Callable[[float], float], lo: float, hi: float, steps: int
) -> tuple[float, float]:
    """The best probe (x, f(x)) of ``steps`` golden-section steps of ``f`` on [lo, hi].

    ``f`` is called 2 + ``steps`` times, in the order of the search (a caller may track its
    own best from those calls); ties keep the earlier probe.
    """
    a, b = hi - GOLDEN * (hi - lo), lo + GOLDEN * (hi - lo)
    fa, fb = f(a), f(b)
    best = (a, fa) if fa <= fb else (b, fb)
    for _ in range(steps):
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - GOLDEN * (hi - lo)
            fa = f(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + GOLDEN * (hi - lo)
            fb = f(b)
        for x, fx in ((a, fa), (b, fb)):
            if fx < best[1]:
                best = (x, fx)
    return best
