"""Print the machine, date, versions and thread settings as Markdown for docs/benchmarks.md.

    .venv/bin/python bench/machine_info.py

Paste the output at the top of a new results section, so every number in the file says where
and how it was measured.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from datetime import UTC, datetime
from pathlib import Path

PACKAGES = ("numpy", "scipy", "cvxpy", "scs", "clarabel", "torch", "onnxruntime", "lipcert")
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else platform.processor()."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def memory_gib() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 2**20:.0f} GiB"
    except OSError:
        pass
    return "unknown"


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def run_line() -> str:
    """One line for a benchmark's output: commit, machine, load average and thread settings
    (the :func:`main` header is for docs/benchmarks.md; this goes above each run's numbers)."""
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    threads = ", ".join(f"{v}={os.environ.get(v, 'unset')}" for v in THREAD_VARS)
    return f"commit {git_commit()}, {platform.machine()}, load average {load}, {threads}"


def main() -> None:
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    lines = [
        f"- date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}, commit {git_commit()}",
        f"- machine: {cpu_model()}, {usable} usable cores of {os.cpu_count()}, {memory_gib()}",
        f"- system: {platform.platform()}, Python {platform.python_version()}",
        "- versions: " + ", ".join(f"{p} {version(p)}" for p in PACKAGES),
        "- threads: " + ", ".join(f"{v}={os.environ.get(v, 'unset')}" for v in THREAD_VARS),
    ]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
