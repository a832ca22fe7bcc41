"""Shared fixtures: the read-only reference networks and data in ../shared/fixtures."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(os.environ.get("LIPCERT_FIXTURES", ROOT.parent / "shared" / "fixtures"))


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """Path of ../shared/fixtures; skips (with the reason) only when it is truly absent."""
    if not (FIXTURES / "README.md").is_file():
        pytest.skip(f"reference fixtures not found at {FIXTURES} (set LIPCERT_FIXTURES)")
    return FIXTURES


@pytest.fixture(autouse=True)
def _torch_threads_kept() -> Iterator[None]:
    """torch's intra-op thread count after a test is the one before it: ``lipcert train`` run
    in-process (CliRunner) sets it to 2 for the rest of the process, and every later torch
    test then ran with 2 threads beside the suite's one-thread processes
    (test_mnistfc_256x2_same_iterations_and_bound: 10 s -> 73 s on a loaded 2-core box)."""
    torch = sys.modules.get("torch")
    before = None if torch is None else torch.get_num_threads()
    yield
    torch = sys.modules.get("torch")
    if torch is not None and before is not None and torch.get_num_threads() != before:
        torch.set_num_threads(before)
