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
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any

from service.jobs.base import JobSpec, now_iso
from service.jobs.process import SolveProcess, supervise
from service.jobs.redis_state import RedisJobs, model_key

HEARTBEAT_S = 1.0
PROGRESS_WRITE_S = 0.3


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
    sha = raw["model_sha256"]
    timeout_s = float(raw["timeout_s"]) if raw.get("timeout_s") else spec.timeout_s
    data = conn.get(model_key(sha))
    if data is None:
        error = {"code": "model-missing", "detail": f"model bytes {sha[:16]} not in Redis"}
        jobs.finish(job_id, "failed", error=error, finished_at=now_iso())
        return {"status": "failed"}

    parent = os.getppid()
    device = os.environ.get("LIPCERT_DEVICE", "auto")
    proc = SolveProcess(("bytes", sha, data), spec, threads=solver_threads(), device=device)
    worker = {
        "runner": "rq",
        "host": socket.gethostname(),
        "worker": os.environ.get("RQ_WORKER_ID", ""),
        "horse_pid": os.getpid(),
        "pid": proc.pid,
    }
    started = jobs.transition(
        job_id,
        ("queued",),
        status="running",
        started_at=now_iso(),
        worker=worker,
        heartbeat=repr(time.time()),
    )
    if not started:
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
    state.tick(force=True)
    if state.orphaned:
        error = {"code": "worker-died", "detail": "the worker process died during the solve"}
        jobs.finish(job_id, "failed", error=error, finished_at=now_iso())
    elif outcome.status == "succeeded" and outcome.result is not None:
        doc = dict(outcome.result, job_id=job_id, model_id=spec.model_id)
        jobs.finish(job_id, "succeeded", result=doc, finished_at=now_iso())
    elif outcome.status == "failed":
        jobs.finish(job_id, "failed", error=outcome.error, finished_at=now_iso())
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
        if self.latest is not None:
            self.jobs.transition(self.job_id, ("running",), progress=self.latest)
            self.latest = None
        self.last_progress = time.monotonic()

    def tick(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.latest is not None and (force or now - self.last_progress >= PROGRESS_WRITE_S):
            self._write_progress()
        if force or now - self.last_beat >= HEARTBEAT_S:
            self.jobs.heartbeat(self.job_id)
            self.last_beat = now

    def should_stop(self) -> bool:
        if os.getppid() != self.parent_pid:
            self.orphaned = True
            return True
        return self.jobs.status(self.job_id) != "running"
