"""Bound jobs: one protocol, two runners (design.md §1.6).

- ``local`` (``LIPCERT_QUEUE_URL`` empty): :class:`~service.jobs.local.LocalRunner`, solver
  processes on this machine, job state in ``data_dir/jobs.sqlite``.
- ``rq`` (``LIPCERT_QUEUE_URL=redis://...``): :class:`~service.jobs.rq.RqRunner`, jobs on an
  RQ queue served by ``lipcert worker`` processes on any number of machines.

Runner imports are lazy: every spawned solver process imports this package, and should
pay only for what the solve itself needs.
"""

from __future__ import annotations

from typing import Any

from service.jobs.base import JobRecord, JobRunner, JobSpec


def create_runner(settings: Any, storage: Any) -> JobRunner:
    """The runner ``settings`` ask for (``settings.queue_url`` empty -> local, else RQ)."""
    threads = int(getattr(settings, "solver_threads", 1) or 1)
    timeout = getattr(settings, "job_timeout_s", None)
    if getattr(settings, "queue_url", ""):
        from service.jobs.rq import RqRunner

        return RqRunner(
            storage,
            settings.queue_url,
            default_timeout_s=timeout,
            heartbeat_timeout_s=float(getattr(settings, "worker_heartbeat_timeout_s", 30.0)),
            recheck_workers=int(getattr(settings, "recheck_workers", 2)),
            persist_lease_s=float(getattr(settings, "persist_lease_s", 30.0)),
        )
    from service.jobs.local import LocalRunner

    return LocalRunner(
        storage,
        settings.data_dir,
        max_concurrent=int(getattr(settings, "max_concurrent_jobs", 1)),
        threads=threads,
        device=str(getattr(settings, "device", "auto")),
        default_timeout_s=timeout,
        lease_s=float(getattr(settings, "job_lease_s", 30.0)),
    )


__all__ = ["JobRecord", "JobRunner", "JobSpec", "create_runner"]
