"""Keep freed heap memory mapped in the server process (glibc only).

A big certify body arrives as ~50-200 chunks of ~64-256 KiB that uvicorn copies a few times
and the .npy reader keeps until its rows are cast (service.bodies.npy_stream). With glibc's defaults
the freed memory goes back to the kernel after each request (heap trimming above 2x the
dynamic mmap threshold), so the next request page-faults every page in again: ~2 000 minor
faults and ~4 ms of event-loop CPU per 12.8 MB body (measured with /proc per-thread CPU,
docs/benchmarks.md). ``mallopt`` with a fixed mmap threshold of 32 MiB (the dynamic
threshold's own ceiling on 64-bit) and a trim threshold of 128 MiB (two bodies at the default
64 MB cap) keeps that memory mapped for reuse; the cost is that the process keeps up to that
much freed memory resident after a burst.

Explicit ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` environment settings win (they
are left alone), and on other C libraries this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

#: mallopt parameter numbers (glibc malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 << 20
TRIM_THRESHOLD_BYTES = 128 << 20


def keep_freed_memory() -> bool:
    """Apply the thresholds above; True when glibc accepted both."""
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") or os.environ.get("MALLOC_TRIM_THRESHOLD_"):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018  (only glibc has it: mallopt numbers differ)
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
    return bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1 and ok)
