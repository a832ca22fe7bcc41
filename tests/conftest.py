"""Shared fixtures: the read-only reference networks and data in ../shared/fixtures."""

from __future__ import annotations

import os
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
