"""The RQ job function, run by ``lipcert worker`` in RQ's work horse.

It takes only the job id: the spec and the model's sha256 are in the job hash, the model
bytes under ``lipcert:model:<sha256>`` (:mod:`service.jobs.redis_state`). The solve runs in
a spawned solver process (same as the local runner) while the horse

- writes progress and a heartbeat (every second) into the job hash,
- kills the solver when the job is cancelled (the API sets ``cancelled``; RQ's
  ``send_stop_job_command`` additionally kills the horse's whole process group),
- kills it at the job's wall-clock limit (``failed`` / ``timeout``),
- kills it and fails the job (``worker-died``) if its worker process disappears.

A worker machine that dies outright stops the heartbeat; the API then fails the job with
``worker-lost`` (:class:`service.jobs.rq.RqRunner`).

A Redis outage does not stop a solve: progress and heartbeats that cannot be written are
skipped (the latest progress is kept), a cancel check that cannot read the status keeps
going, and the outcome is written once Redis answers again (retried for up to
``LIPCERT_QUEUE_OUTAGE_S`` seconds, default 900). If it never does, the job stays
``running`` until the API fails it as ``worker-lost``: clear, and retryable.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service.documents import JobError
from service.jobs.base import JobSpec, now_iso
from service.jobs.process import SolveProcess, supervise
from service.jobs.redis_state import RedisJobs, model_key

log = logging.getLogger("lipcert.jobs")

HEARTBEAT_S = 1.0
PROGRESS_WRITE_S = 0.3
OUTAGE = (RedisConnectionError, RedisTimeoutError)
"""What an unreachable Redis raises."""
OUTCOME_RETRY_S = 1.0


def outage_wait_s() -> float:
    """How long a finished solve waits for Redis to write its outcome
    (``LIPCERT_QUEUE_OUTAGE_S``, default 900 s)."""
    try:
        return max(0.0, float(os.environ.get("LIPCERT_QUEUE_OUTAGE_S", "900")))
    except ValueError:
        return 900.0


def write_when_reachable(write: Any, what: str, wait_s: float | None = None) -> bool:
    """Call ``write()`` until Redis answers (at most ``wait_s`` seconds); True when done."""
    deadline = time.monotonic() + (outage_wait_s() if wait_s is None else wait_s)
    while True:
        try:
            write()
            return True
        except OUTAGE as exc:
            if time.monotonic() >= deadline:
                log.error("gave up writing %s: Redis unreachable (%s)", what, exc)
                return False
            log.warning("Redis unreachable, %s waits: %s", what, exc)
            time.sleep(OUTCOME_RETRY_S)


def solver_threads() -> int:
    """BLAS/OpenMP threads per solve on this worker (``LIPCERT_SOLVER_THREADS``, default 1).

    The same variable as ``Settings.solver_threads``; read directly so that a worker needs no
    other API settings.
    """
    try:
        return max(1, int(os.environ.get("LIPCERT_SOLVER_THREADS", "1")))
    except ValueError:
        return 1


def run_bound_job(job_id: str) -> dict[str, Any]:
    """Solve job ``job_id``; the outcome goes into the job hash (and is returned to RQ)."""
    from rq import get_current_job

    current = get_current_job()
    if current is None:
        raise RuntimeError("run_bound_job must run inside an RQ worker")
    conn = current.connection
    jobs = RedisJobs(conn)
    raw = jobs.raw(job_id)
    if not raw or raw.get("status") != "queued":
        return {"status": raw.get("status", "missing")}
    spec = JobSpec.from_dict(json.loads(raw["spec"]))
    if spec.kind == "certification":  # chunks shared with helper jobs, certified in the horse
        from service.jobs.certify_rq import run_certification_job

        return run_certification_job(job_id, conn, current.id)
    sha = raw["model_sha256"]
    timeout_s = float(raw["timeout_s"]) if raw.get("timeout_s") else spec.timeout_s
    data = conn.get(model_key(sha))
    if data is None:
        missing = JobError("model-missing", f"model bytes {sha[:16]} not in Redis")
        jobs.finish(job_id, "failed", error=missing, finished_at=now_iso())
        return {"status": "failed"}

    parent = os.getppid()
    device = os.environ.get("LIPCERT_DEVICE", "auto")
    proc = SolveProcess(("bytes", sha, data), spec, threads=solver_threads(), device=device)
    if not jobs.start(job_id, pid=proc.pid):
        proc.kill()
        return {"status": jobs.raw(job_id).get("status", "missing")}

    state = _HorseState(jobs, job_id, parent)
    outcome = supervise(
        proc,
        timeout_s=timeout_s,
        on_progress=state.progress,
        on_tick=state.tick,
        cancelled=state.should_stop,
    )
    result: dict[str, object] | None = None
    error: JobError | None = None
    if state.orphaned:
        error = JobError("worker-died", "the worker process died during the solve")
        status = "failed"
    elif outcome.status == "succeeded" and isinstance(outcome.result, dict):
        status, result = "succeeded", dict(outcome.result, job_id=job_id, model_id=spec.model_id)
    elif outcome.status == "failed":
        status, error = "failed", outcome.error
    else:
        return {"status": outcome.status}  # cancelled: the API recorded it

    def write() -> None:
        state.tick(force=True)
        jobs.finish(job_id, status, result=result, error=error, finished_at=now_iso())

    write_when_reachable(write, f"the outcome of job {job_id}")
    return {"status": outcome.status}


class _HorseState:
    """Progress buffering, heartbeat, and the stop conditions of one supervised solve."""

    def __init__(self, jobs: RedisJobs, job_id: str, parent_pid: int) -> None:
        self.jobs = jobs
        self.job_id = job_id
        self.parent_pid = parent_pid
        self.latest: dict[str, Any] | None = None
        self.last_progress = 0.0
        self.last_beat = 0.0
        self.orphaned = False

    def progress(self, info: dict[str, Any]) -> None:
        phase_changed = self.latest is None or info.get("phase") != self.latest.get("phase")
        self.latest = dict(info, updated_at=time.time())
        if phase_changed:
            self._write_progress()

    def _write_progress(self) -> None:
        self.last_progress = time.monotonic()
        if self.latest is not None:
            try:
                self.jobs.transition(self.job_id, ("running",), progress=self.latest)
            except OUTAGE:
                return  # kept: written once Redis is back
            self.latest = None

    def tick(self, force: bool = False) -> None:
        """Write buffered progress and the heartbeat when due; an outage skips them (a
        forced tick, for the outcome, lets it raise)."""
        now = time.monotonic()
        if self.latest is not None and (force or now - self.last_progress >= PROGRESS_WRITE_S):
            self._write_progress()
        if force or now - self.last_beat >= HEARTBEAT_S:
            self.last_beat = now
            try:
                self.jobs.heartbeat(self.job_id)
            except OUTAGE:
                if force:
                    raise

    def should_stop(self) -> bool:
        if os.getppid() != self.parent_pid:
            self.orphaned = True
            return True
        try:
            return self.jobs.status(self.job_id) != "running"
        except OUTAGE:
            return False  # Redis down: keep solving, the outcome waits for it
