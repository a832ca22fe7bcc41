"""Deterministic float64 results from BLAS/LAPACK: one thread while a network is derived.

Multi-threaded BLAS splits sums (dot products behind norms, GEMM, LU) differently per thread
count, so the same parameters give networks that differ in the last bits between processes
with other thread settings. A network's content hash names the exact function certificates
are about, so everything that derives a network from a file runs under :func:`one_thread`.

Finding the loaded BLAS libraries (threadpoolctl reads ``/proc/self/maps`` and opens every
shared object it lists) costs milliseconds, as much as a CROWN pass on a small network, so
the scan is kept in one :class:`threadpoolctl.ThreadpoolController` and redone only when the
set of imported modules has changed size since the last scan. Native libraries enter a
Python process through imports of extension modules (which pull in their BLAS), so a
library loaded since the last scan comes with a larger ``sys.modules``; the per-call cost is
then that of reading and setting each library's thread count (tens of microseconds).

Threads overlap (request threads, the service's re-check pool, beta-crown's per-leaf passes),
and the BLAS thread counts are process-wide: if each context restored the count it saw on
entry, a thread leaving would give the library its threads back while another thread is
still deriving a network inside its own context. So the contexts are counted: the first
entrant saves the counts and sets one thread, the last one to leave restores them. And
threadpoolctl lets only one "controlling" thread set the count of a pthreads OpenBLAS (the
first that set it; the calls of any other are silently ignored while it lives), so each
change here first hands that control to the calling thread (under the lock).
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

from threadpoolctl import ThreadpoolController

_lock = threading.Lock()
_controller: ThreadpoolController | None = None
_scanned_at_modules = -1  # len(sys.modules) when _controller scanned the loaded libraries
_depth = 0  # contexts of one_thread open now, all threads together
_saved: Any = None  # the limiter of the first entrant (its restore gives the counts back)


def _blas_controller() -> ThreadpoolController:
    """The controller of the loaded libraries; rescans when modules were imported since."""
    with _lock:
        return _controller_locked()


def _controller_locked() -> ThreadpoolController:
    global _controller, _scanned_at_modules
    n_modules = len(sys.modules)
    if _controller is None or n_modules != _scanned_at_modules:
        _controller = ThreadpoolController()
        _scanned_at_modules = n_modules
    return _controller


def one_thread() -> AbstractContextManager[Any]:
    """Context: BLAS (numpy's and scipy's OpenBLAS/MKL) on one thread inside it.

    Like ``threadpool_limits(limits=1, user_api="blas")`` (each library's previous thread
    count is restored when the last open context, of any thread, is left; so it nests and
    overlaps), without rescanning the loaded libraries.
    """
    return _one_thread()


def _take_control(controller: ThreadpoolController) -> None:
    """Let the calling thread set the libraries' counts (threadpoolctl's OpenBLAS controller
    ignores any thread but the one that first set a count)."""
    for lib in controller.lib_controllers:
        clear = getattr(lib, "clear_controlling_thread", None)
        if clear is not None:
            clear(force=True)


@contextmanager
def _one_thread() -> Iterator[None]:
    global _depth, _saved
    with _lock:
        # every entrant sets one thread (libraries scanned since the first are covered too);
        # only the first one's saved counts are the ones to give back
        controller = _controller_locked()
        _take_control(controller)
        limiter = controller.limit(limits=1, user_api="blas")
        if _depth == 0:
            _saved = limiter
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                saved, _saved = _saved, None
                _take_control(_controller_locked())
                saved.restore_original_limits()
