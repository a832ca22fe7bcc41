"""``lipcert worker``: an RQ worker that runs bound jobs from LIPCERT_QUEUE_URL."""

from __future__ import annotations

from service.cli._common import fail


def worker() -> None:
    """Run a solver worker for the Redis queue (LIPCERT_QUEUE_URL=redis://...)."""
    fail("worker is not implemented yet")
