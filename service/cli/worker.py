"""``lipcert worker``: an RQ worker that runs bound jobs from LIPCERT_QUEUE_URL.

Start any number of them, on any machines that reach the Redis server: the API stores each
model's bytes in Redis (content-addressed by sha256), so workers need no shared disk.
``LIPCERT_SOLVER_THREADS`` sets the BLAS/OpenMP threads of each solve (default 1).
"""

from __future__ import annotations

import logging
import os

import typer

from service.cli._common import fail


def worker(
    queue_url: str = typer.Option(
        "", "--queue-url", help="Redis URL (default: LIPCERT_QUEUE_URL).", show_default=False
    ),
    name: str = typer.Option("", help="Worker name (default: RQ's host.pid name)."),
    burst: bool = typer.Option(False, help="Exit once the queue is empty."),
) -> None:
    """Run a solver worker for the Redis queue (LIPCERT_QUEUE_URL=redis://...)."""
    url = queue_url or os.environ.get("LIPCERT_QUEUE_URL", "")
    if not url.startswith(("redis://", "rediss://", "unix://")):
        fail("no Redis queue: set LIPCERT_QUEUE_URL=redis://HOST:PORT/DB or pass --queue-url")
    from redis import Redis
    from redis.exceptions import RedisError
    from rq import Worker

    from service.jobs.redis_state import QUEUE_NAME

    logging.basicConfig(
        level=os.environ.get("LIPCERT_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    conn = Redis.from_url(url)
    try:
        conn.ping()
    except RedisError as exc:
        fail(f"cannot reach Redis at {url}: {exc}")
    w = Worker([QUEUE_NAME], connection=conn, name=name or None, job_monitoring_interval=5)
    w.work(burst=burst, with_scheduler=False)
