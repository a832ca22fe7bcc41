"""``lipcert serve`` keeps freed heap memory mapped (service.malloc_tuning): a big body that
arrives as 256 KiB chunks, allocated and freed again and again, page-faults only the first
time, where glibc's defaults fault every page in on every request. Run in fresh interpreters
(mallopt is process-wide)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="glibc mallopt"
)

_SCRIPT = """
import resource, sys
from service.malloc_tuning import keep_freed_memory
tuned = keep_freed_memory() if sys.argv[1] == "tune" else False
faults = []
for _ in range(6):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    body = [b"\\x01" * (256 << 10) for _ in range(80)]  # a 20 MiB body in chunks
    del body
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(tuned, min(faults[1:]))
"""


def _run(mode: str, **env: str) -> tuple[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", _SCRIPT, mode],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **env},
    ).stdout.split()
    return out[0], int(out[1])


def test_freed_bodies_are_reused_without_page_faults() -> None:
    pages = (20 << 20) // os.sysconf("SC_PAGE_SIZE")
    tuned, faults = _run("tune")
    assert tuned == "True"
    assert faults < pages // 20, faults  # reused: (almost) no page faults
    untuned, faults_default = _run("plain")
    assert untuned == "False"
    assert faults_default > pages // 2, faults_default  # the defaults fault it all in again


def test_explicit_malloc_environment_wins() -> None:
    tuned, _ = _run("tune", MALLOC_TRIM_THRESHOLD_="131072")
    assert tuned == "False"
