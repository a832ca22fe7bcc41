"""The one clock of every local-certification time budget.

``CLOCK`` is the wall clock (``time.perf_counter``). A benchmark on a shared, loaded machine
may set it to ``time.process_time`` so that budgets are counted in this process's CPU seconds;
the radius search of :func:`sdp.local.certify_local` and beta-crown's own budgets then read the
same clock (two clocks would let a loaded machine's wall time eat the later inputs' budgets).

Deadlines are :func:`now` times (None: no deadline). Every budgeted loop follows one rule
(:func:`fits`): a step is begun only when the last such step's measured time says it ends by
the deadline; the first step of a loop (which has no measured time yet) is always begun.
"""

from __future__ import annotations

import time
from collections.abc import Callable

CLOCK: Callable[[], float] = time.perf_counter


def now() -> float:
    """Seconds on :data:`CLOCK`."""
    return CLOCK()


def fits(deadline: float | None, step_s: float = 0.0) -> bool:
    """Whether a step of about ``step_s`` seconds (the last one's measured time), begun now,
    ends by ``deadline`` (a :func:`now` time; None: no deadline, always True)."""
    return deadline is None or now() + step_s <= deadline
