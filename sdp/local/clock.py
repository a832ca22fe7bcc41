"""The one clock of every local-certification time budget.

``CLOCK`` is the wall clock (``time.perf_counter``). A benchmark on a shared, loaded machine
may set it to ``time.process_time`` so that budgets are counted in this process's CPU seconds;
the radius search of :func:`sdp.local.certify_local` and beta-crown's own budgets then read the
same clock (two clocks would let a loaded machine's wall time eat the later inputs' budgets).
"""

from __future__ import annotations

import time
from collections.abc import Callable

CLOCK: Callable[[], float] = time.perf_counter


def now() -> float:
    """Seconds on :data:`CLOCK`."""
    return CLOCK()
