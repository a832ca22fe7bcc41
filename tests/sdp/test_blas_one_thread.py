"""``one_thread``: every loaded BLAS runs on one thread inside it, the previous counts after."""

from __future__ import annotations

import os
import sys
import threading
import types

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

from sdp import _blas
from sdp._blas import numpy_pool_only, one_thread


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


def test_one_thread_holds_while_another_thread_leaves():
    """Threads overlap (request threads, the re-check pool): A enters, B enters, A leaves;
    B must still run on one thread (A restoring its saved count would give B's network
    derivation another BLAS split, so other last bits and another content hash)."""
    a_in, b_in, a_out, b_seen = (threading.Event() for _ in range(4))
    seen: list[list[int]] = []

    def a() -> None:
        with one_thread():
            a_in.set()
            b_in.wait(10)
        a_out.set()

    def b() -> None:
        a_in.wait(10)
        with one_thread():
            b_in.set()
            a_out.wait(10)
            seen.append(_blas_threads())
        b_seen.set()

    with threadpool_limits(limits=2, user_api="blas"):
        before = _blas_threads()
        ts = [threading.Thread(target=f) for f in (a, b)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(20)
        after = _blas_threads()
    assert b_seen.is_set() and seen == [[1] * len(before)]
    assert after == before


def _pools() -> dict[str, int]:
    return {
        lib["filepath"]: lib["num_threads"]
        for lib in threadpool_info()
        if lib["user_api"] == "blas"
    }


def _is_numpy_own(path: str) -> bool:
    return os.path.realpath(path).startswith(_blas._numpy_pool_dirs())


def test_numpy_pool_only_keeps_numpy_threads_and_gives_the_others_one():
    import scipy.linalg  # noqa: F401  (its wheel's own OpenBLAS, where it has one)

    with threadpool_limits(limits=2, user_api="blas"):
        before = _pools()
        own = {path: _is_numpy_own(path) for path in before}
        assert any(own.values()), "numpy's own BLAS pool should be found"
        with numpy_pool_only():
            inside = _pools()
            assert inside == {p: (2 if own[p] else 1) for p in before}
            with one_thread():  # one_thread wins while it is open
                assert _pools() == dict.fromkeys(before, 1)
            assert _pools() == inside
        assert _pools() == before
        with one_thread(), numpy_pool_only():
            assert _pools() == dict.fromkeys(before, 1)
        assert _pools() == before


def test_numpy_pool_only_holds_while_an_overlapping_one_thread_leaves():
    """A one_thread context that opens inside a solve's numpy_pool_only and leaves first must
    give back the solve's setting, not the counts from before the solve."""
    entered, left = threading.Event(), threading.Event()
    seen: list[dict[str, int]] = []

    def derive() -> None:
        with one_thread():
            entered.set()
        left.set()

    with threadpool_limits(limits=2, user_api="blas"):
        before = _pools()
        with numpy_pool_only():
            inside = _pools()
            t = threading.Thread(target=derive)
            t.start()
            assert entered.wait(10) and left.wait(10)
            t.join(10)
            seen.append(_pools())
        after = _pools()
    assert seen == [inside]
    assert after == before


def test_a_context_that_fails_to_open_is_not_counted(monkeypatch):
    """An error while a context sets the counts (here: finding numpy's pool) propagates and
    leaves no open context behind: before, the count stayed raised, so every BLAS pool of the
    process kept one thread and the saved counts were never given back."""
    with threadpool_limits(limits=2, user_api="blas"):
        before = _pools()

        def broken() -> tuple[str, ...]:
            raise OSError("no numpy package folder")

        with monkeypatch.context() as patch:
            patch.setattr(_blas, "_numpy_pool_dirs", broken)
            for context in (numpy_pool_only, one_thread):
                try:
                    with context():
                        raise AssertionError("the context should not have opened")
                except OSError:
                    pass
        assert (_blas._one_depth, _blas._numpy_depth) == (0, 0)
        with one_thread():
            assert set(_pools().values()) == {1}
        assert _pools() == before and not _blas._saved
