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
"""

from __future__ import annotations

import sys
import threading
from contextlib import AbstractContextManager
from typing import Any

from threadpoolctl import ThreadpoolController

_lock = threading.Lock()
_controller: ThreadpoolController | None = None
_scanned_at_modules = -1  # len(sys.modules) when _controller scanned the loaded libraries


def _blas_controller() -> ThreadpoolController:
    """The controller of the loaded libraries; rescans when modules were imported since."""
    global _controller, _scanned_at_modules
    n_modules = len(sys.modules)
    with _lock:
        if _controller is None or n_modules != _scanned_at_modules:
            _controller = ThreadpoolController()
            _scanned_at_modules = n_modules
        return _controller


def one_thread() -> AbstractContextManager[Any]:
    """Context: BLAS (numpy's and scipy's OpenBLAS/MKL) on one thread inside it.

    Like ``threadpool_limits(limits=1, user_api="blas")`` (each library's previous thread
    count is restored on exit, so it nests), without rescanning the loaded libraries.
    """
    return _blas_controller().limit(limits=1, user_api="blas")
