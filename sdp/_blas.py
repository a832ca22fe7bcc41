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

:func:`numpy_pool_only` is the other setting kept here: numpy's and scipy's wheels each bundle
their own OpenBLAS, two thread pools whose idle threads spin for a while after every call. A
solver that alternates numpy products with scipy factorisations makes each pool's spinning
threads take the cores from the other's working ones: the structured LipSDP solve of
mnistfc-256x2 took 4.75 s wall (9.3 s CPU) with both pools at 2 threads on 2 cores, 1.86 s
with both at 1, and 1.33 s with numpy's at 2 and scipy's at 1 (docs/benchmarks.md). Inside
it, every BLAS pool but numpy's runs one thread. Both kinds of context share one state: while
any :func:`one_thread` is open every pool runs one thread, else while any
:func:`numpy_pool_only` is open the others do, and the last context to close restores the
counts the first one found.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import numpy as np
from threadpoolctl import ThreadpoolController

_lock = threading.Lock()
_controller: ThreadpoolController | None = None
_scanned_at_modules = -1  # len(sys.modules) when _controller scanned the loaded libraries
_one_depth = 0  # contexts of one_thread open now, all threads together
_numpy_depth = 0  # contexts of numpy_pool_only open now
_saved: dict[str, int] = {}  # filepath -> a pool's thread count before the first context


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
    return _counted("one")


def numpy_pool_only() -> AbstractContextManager[Any]:
    """Context: every BLAS pool but numpy's own on one thread (numpy's keeps its count).

    Where numpy's pool cannot be told apart (numpy and scipy on one system BLAS: one pool, no
    contention), nothing changes. Nests and overlaps like :func:`one_thread`, which wins.
    """
    return _counted("numpy")


@functools.cache
def _numpy_pool_dirs() -> tuple[str, ...]:
    """Folders a pool of numpy's own lives in: the package and a wheel's ``numpy.libs``."""
    package = os.path.dirname(os.path.realpath(np.__file__))
    return (package + os.sep, package + ".libs" + os.sep)


@functools.cache
def _real_path(path: str) -> str:
    """``os.path.realpath`` once per loaded library (a few syscalls on every context else)."""
    return os.path.realpath(path)


def _take_control(controller: ThreadpoolController) -> None:
    """Let the calling thread set the libraries' counts (threadpoolctl's OpenBLAS controller
    ignores any thread but the one that first set a count)."""
    for lib in controller.lib_controllers:
        clear = getattr(lib, "clear_controlling_thread", None)
        if clear is not None:
            clear(force=True)


def _apply_locked() -> None:
    """Set every BLAS pool's count for the contexts open now (under the lock)."""
    controller = _controller_locked()
    _take_control(controller)
    pools = [lib for lib in controller.lib_controllers if lib.user_api == "blas"]
    if _one_depth == 0 and _numpy_depth == 0:
        for lib in pools:
            if lib.filepath in _saved:
                lib.set_num_threads(_saved[lib.filepath])
        _saved.clear()
        return
    numpy_dirs = _numpy_pool_dirs()
    own = [_real_path(lib.filepath).startswith(numpy_dirs) for lib in pools]
    for lib, numpy_own in zip(pools, own, strict=True):
        # a pool first seen while a context is open has its original count now
        original = _saved.setdefault(lib.filepath, lib.num_threads)
        keep = _one_depth == 0 and (numpy_own or not any(own))
        lib.set_num_threads(original if keep else 1)


def _add_depth(kind: str, step: int) -> None:
    """Count a context of ``kind`` ("one" or "numpy") opening (+1) or closing (-1)."""
    global _one_depth, _numpy_depth
    if kind == "one":
        _one_depth += step
    else:
        _numpy_depth += step


@contextmanager
def _counted(kind: str) -> Iterator[None]:
    with _lock:
        # every entrant applies the counts (libraries scanned since the first are covered too)
        _add_depth(kind, 1)
        try:
            _apply_locked()
        except BaseException:
            # a context that failed to open is not open: it must not hold the counts forever
            _add_depth(kind, -1)
            with contextlib.suppress(Exception):
                _apply_locked()  # best effort: the counts of the contexts still open
            raise
    try:
        yield
    finally:
        with _lock:
            _add_depth(kind, -1)
            _apply_locked()
