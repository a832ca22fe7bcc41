"""``one_thread``: every loaded BLAS runs on one thread inside it, the previous counts after."""

from __future__ import annotations

import sys
import types

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

from sdp import _blas
from sdp._blas import one_thread


def _blas_threads() -> list[int]:
    return [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]


def test_one_thread_limits_and_restores_every_blas():
    assert _blas_threads(), "numpy's BLAS should be visible"
    with threadpool_limits(limits=2, user_api="blas"):
        before = _blas_threads()
        for _ in range(3):  # the cached controller must behave like a fresh scan each time
            with one_thread():
                assert _blas_threads() == [1] * len(before)
                with one_thread():  # nests
                    assert _blas_threads() == [1] * len(before)
                assert _blas_threads() == [1] * len(before)
                np.linalg.norm(np.ones((64, 64)) @ np.ones((64, 64)))
            assert _blas_threads() == before


def test_libraries_are_rescanned_only_after_imports():
    with one_thread():
        pass
    first = _blas._blas_controller()
    assert _blas._blas_controller() is first
    name = "_lipcert_test_blas_rescan_marker"
    sys.modules[name] = types.ModuleType(name)  # what an import of an extension module does
    try:
        assert _blas._blas_controller() is not first
    finally:
        del sys.modules[name]
