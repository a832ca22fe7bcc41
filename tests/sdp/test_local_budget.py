"""The radius search of :func:`sdp.local.certify_local` keeps to its time budget.

Not a speed target: the budget is time_budget_s per input for the whole call (start-up, the
beta-crown CROWN start and every probe included), checked with a tolerance generous enough for
a loaded machine; a search that ignored the budget (a probe of at least 1 s, ten CROWN steps
whatever the budget) would still exceed it.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from sdp.local import certify_local
from tests.sdp._local_nets import dense_net

TOLERANCE_S = 0.5


@pytest.mark.parametrize("method", ["auto", "beta-crown", "alpha-crown"])
def test_radius_search_keeps_to_the_budget(method: str) -> None:
    net = dense_net(np.random.default_rng(0), [4, 16, 16, 3])
    x = np.random.default_rng(1).normal(size=(4, 4))
    budget = 0.05  # seconds per input: a few probes at most
    certify_local(net, x[:1], epsilon=0.01, method=method)  # imports and caches, untimed
    t = time.perf_counter()
    res = certify_local(net, x, method=method, time_budget_s=budget, global_bound=10.0)
    wall = time.perf_counter() - t
    assert wall <= budget * len(x) + TOLERANCE_S, wall
    assert (res.radius >= res.global_radius).all()
