"""Deterministic float64 results from BLAS/LAPACK: one thread while a network is derived.

Multi-threaded BLAS splits sums (dot products behind norms, GEMM, LU) differently per thread
count, so the same parameters give networks that differ in the last bits between processes
with other thread settings. A network's content hash names the exact function certificates
are about, so everything that derives a network from a file runs under :func:`one_thread`.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

from threadpoolctl import threadpool_limits


def one_thread() -> AbstractContextManager[Any]:
    """Context: BLAS (numpy's and scipy's OpenBLAS/MKL) on one thread inside it."""
    return threadpool_limits(limits=1, user_api="blas")
