"""``lipcert worker``: an RQ worker that runs bound jobs from LIPCERT_QUEUE_URL.

Start any number of them, on any machines that reach the Redis server: the API stores each
model's bytes in Redis (content-addressed by sha256), so workers need no shared disk.
``LIPCERT_SOLVER_THREADS`` sets the BLAS/OpenMP threads of each solve (default 1).

A Redis outage does not end the worker: a running solve goes on (its horse writes the
outcome once Redis is back, :mod:`service.jobs.rq_task`), the worker's own heartbeats are
skipped meanwhile, and if RQ's loop gives up on the connection the worker waits for Redis
and starts a fresh loop under the same name. Only a stop request (SIGINT/SIGTERM) ends it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Any

import typer
from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from rq import Worker

from service.cli._common import fail
from service.jobs.redis_state import QUEUE_NAME

log = logging.getLogger("lipcert.worker")

OUTAGE = (RedisConnectionError, RedisTimeoutError)
RECONNECT_S = 1.0


class OutageTolerantWorker(Worker):
    """An RQ worker whose running job survives a Redis outage (see the module docstring)."""

    def maintain_heartbeats(self, job: Any, execution: Any) -> None:
        try:
            super().maintain_heartbeats(job, execution)
        except OUTAGE as exc:  # the horse keeps solving; beat again next time
            self.log.warning("Worker %s: heartbeat skipped, Redis unreachable: %s", self.name, exc)

    def execute_job(self, job: Any, queue: Any) -> None:
        try:
            super().execute_job(job, queue)
        except OUTAGE:
            # never leave a horse behind: wait for it before the loop goes on (or restarts)
            pid = getattr(self, "_horse_pid", 0)
            if pid:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)
                self._horse_pid = 0
            raise


def _wait_for_redis(conn: Redis) -> None:
    while True:
        try:
            conn.ping()
            return
        except RedisError:
            time.sleep(RECONNECT_S)


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
    logging.basicConfig(
        level=os.environ.get("LIPCERT_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    conn = Redis.from_url(url, socket_connect_timeout=5.0)
    try:
        conn.ping()
    except RedisError as exc:
        fail(f"cannot reach Redis at {url}: {exc}")
    while True:
        w = OutageTolerantWorker(
            [QUEUE_NAME], connection=conn, name=name or None, job_monitoring_interval=5
        )
        name = w.name  # the same name across restarts of the loop
        try:
            w.work(burst=burst, with_scheduler=False)
        except OUTAGE as exc:
            log.warning("worker %s: Redis unreachable (%s); waiting for it", name, exc)
        if burst or getattr(w, "_stop_requested", False):
            return
        _wait_for_redis(conn)
        with contextlib.suppress(RedisError):
            w.register_death()  # the loop that gave up never said so; its name is free again
        log.warning("worker %s: Redis is back, resuming", name)
