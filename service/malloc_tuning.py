"""Keep freed heap memory mapped in the server and solver processes (glibc only).

A big certify body arrives as ~50-200 chunks of ~64-256 KiB that uvicorn copies a few times
and the .npy reader keeps until its rows are cast (service.bodies.npy_stream). With glibc's defaults
the freed memory goes back to the kernel after each request (heap trimming above 2x the
dynamic mmap threshold), so the next request page-faults every page in again: ~2 000 minor
faults and ~4 ms of event-loop CPU per 12.8 MB body (measured with /proc per-thread CPU,
docs/benchmarks.md). ``mallopt`` with a fixed mmap threshold of 32 MiB (the dynamic
threshold's own ceiling on 64-bit) and a trim threshold of 128 MiB (two bodies at the default
64 MB cap) keeps that memory mapped for reuse; the cost is that the process keeps up to that
much freed memory resident after a burst, until the body budget hands it back once the burst
is over (:func:`release_freed_memory`, called by :mod:`service.bodies.budget`'s guard).

The solver processes of jobs (:func:`service.jobs.tasks.child_main`) and ``lipcert bound`` /
``certify`` set the same thresholds: the interior point allocates and frees n x n temporaries
(4.7 MB at n = 768) every iteration, and with glibc's defaults mnistfc-256x2's structured solve
faulted ~20 000 pages back in per solve, about 5-7 % of its CPU time (docs/benchmarks.md).

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


def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (mallopt numbers and malloc_trim are glibc's)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version  # noqa: B018  (only glibc has it)
        libc.malloc_trim  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


def keep_freed_memory() -> bool:
    """Apply the thresholds above; True when glibc accepted both."""
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") or os.environ.get("MALLOC_TRIM_THRESHOLD_"):
        return False
    libc = _glibc()
    if libc is None:
        return False
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
    return bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1 and ok)


def release_freed_memory() -> bool:
    """Hand the heap's free pages back to the kernel (glibc ``malloc_trim(0)``: every arena,
    free chunks inside the heap too, not only its top); True when glibc released some. Run it
    when a burst of big bodies is over: the thresholds above keep that memory mapped for the
    next request, which is right between back-to-back requests and wrong after the last."""
    libc = _glibc()
    if libc is None:
        return False
    trim = libc.malloc_trim
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return bool(trim(0) == 1)
