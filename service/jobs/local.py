"""The embedded runner (default, ``LIPCERT_QUEUE_URL`` empty): a bounded local process pool.

``max_concurrent`` supervising threads take job ids from an in-memory queue; each job runs
in its own spawned solver process (:class:`~service.jobs.process.SolveProcess`) with
``threads`` BLAS/OpenMP threads. Job state lives in SQLite (:class:`~service.jobs.store.
JobStore`), so it survives a restart: jobs that were queued or running when the previous
server stopped are marked ``failed`` with code ``server-restarted`` (their solver processes
died with that server), never silently lost. A succeeded job's bound document is saved with
``Storage.save_bound`` before the job is marked succeeded.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from sdp.errors import LipcertError
from service.jobs.base import (
    CANCELLED,
    MODEL_DELETED,
    JobRecord,
    JobSpec,
    observe_solve_time,
)
from service.jobs.process import SolveProcess, supervise
from service.jobs.recheck import adopt_document
from service.jobs.store import JobStore

log = logging.getLogger("lipcert.jobs")

PROGRESS_WRITE_S = 0.3
"""Least time between two progress writes of one job (phase changes are written at once)."""


class LocalRunner:
    """Bound jobs in local solver processes; see the module docstring."""

    name = "local"

    def __init__(
        self,
        storage: Any,
        data_dir: str | Path,
        *,
        max_concurrent: int = 1,
        threads: int = 1,
        device: str = "auto",
        default_timeout_s: float | None = None,
    ) -> None:
        self.storage = storage
        self.data_dir = Path(data_dir)
        self.store = JobStore(self.data_dir / "jobs.sqlite")
        self.max_concurrent = max(1, int(max_concurrent))
        self.threads = max(1, int(threads))
        self.device = device
        self.default_timeout_s = default_timeout_s
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._lock = threading.Lock()
        self._procs: dict[str, SolveProcess] = {}
        self._cancelled: set[str] = set()
        self._threads: list[threading.Thread] = []
        self._stopping = False

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Fail what a previous server left unfinished, then start the supervising threads."""
        stale = self.store.fail_active(
            "server-restarted", "server restarted before the job finished"
        )
        if stale:
            log.warning("marked %d unfinished job(s) failed: server restarted", stale)
        for i in range(self.max_concurrent):
            t = threading.Thread(target=self._work, name=f"lipcert-jobs-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        """Kill running solves (their jobs fail with ``server-stopped``) and join the threads."""
        with self._lock:
            self._stopping = True
            procs = list(self._procs.items())
        for job_id, proc in procs:
            proc.terminate()  # the supervising thread closes its pipe
            self.store.finish(
                job_id,
                "failed",
                error={"code": "server-stopped", "detail": "server stopped during the solve"},
            )
        for _ in self._threads:
            self._queue.put(None)
        for t in self._threads:
            t.join(timeout=15)
        self._threads.clear()
        self.store.fail_active("server-stopped", "server stopped before the job started")

    # -- API ------------------------------------------------------------------------------------

    def submit(self, spec: JobSpec) -> JobRecord:
        """A new queued job, or the in-flight / succeeded job of an identical request."""
        with self._lock:
            for rec in self.store.find_reusable(spec.dedupe_key()):
                if spec.reuses(rec, self._bound_still_stored):
                    rec.reused = True
                    return rec
            rec = JobRecord(id=uuid.uuid4().hex, spec=spec)
            self.store.insert(rec)
        self._queue.put(rec.id)
        return rec

    def get(self, job_id: str) -> JobRecord | None:
        return self.store.get(job_id)

    def cancel(self, job_id: str, error: dict[str, str] = CANCELLED) -> JobRecord | None:
        """Cancel: a queued job never starts; a running job's solver process is killed now."""
        with self._lock:
            rec = self.store.get(job_id)
            if rec is None or rec.terminal:
                return rec
            self._cancelled.add(job_id)
            proc = self._procs.get(job_id)
        if proc is not None:
            proc.terminate()  # the supervising thread closes its pipe
        self.store.finish(job_id, "cancelled", error=error)
        return self.store.get(job_id)

    def cancel_model(self, model_id: str) -> list[str]:
        ids = self.store.active_ids(model_id)
        for job_id in ids:
            self.cancel(job_id, MODEL_DELETED)
        return ids

    def status_counts(self) -> dict[str, int]:
        return self.store.status_counts()

    # -- supervising threads ---------------------------------------------------------------------

    def _bound_still_stored(self, rec: JobRecord) -> bool:
        finder = getattr(self.storage, "bound_for_job", None)
        return True if finder is None else finder(rec.spec.model_id, rec.id) is not None

    def _work(self) -> None:
        while True:
            job_id = self._queue.get()
            if job_id is None:
                return
            try:
                self._run(job_id)
            except Exception as exc:  # keep the pool alive; the job records why
                log.exception("job %s crashed the runner", job_id)
                self.store.finish(
                    job_id, "failed", error={"code": "internal-error", "detail": repr(exc)}
                )

    def _run(self, job_id: str) -> None:
        rec = self.store.get(job_id)
        if rec is None or rec.status != "queued":
            return
        spec = rec.spec
        with self._lock:
            if self._stopping or job_id in self._cancelled:
                return
            proc = SolveProcess(
                ("storage", str(self.data_dir), spec.model_id),
                spec,
                threads=self.threads,
                device=self.device,
            )
            self._procs[job_id] = proc
        try:
            self.store.mark_running(job_id, {"runner": self.name, "pid": proc.pid})
            reporter = _ProgressWriter(self.store, job_id)
            outcome = supervise(
                proc,
                timeout_s=spec.timeout_s or self.default_timeout_s,
                on_progress=reporter.update,
                on_tick=reporter.flush,
                cancelled=lambda: job_id in self._cancelled or self._stopping,
            )
            reporter.flush(force=True)
        finally:
            with self._lock:
                self._procs.pop(job_id, None)
        if outcome.status == "succeeded" and outcome.result is not None:
            doc = dict(outcome.result, job_id=job_id, model_id=spec.model_id)
            error = None
            try:
                # the solver process imported the file itself: a bound of another float64
                # network (e.g. other BLAS settings) is re-proven on the one the API serves
                doc = adopt_document(self.storage.load_network(spec.model_id), doc, trusted=True)
            except KeyError:
                error = MODEL_DELETED
            except LipcertError as exc:
                error = {"code": "unverified-result", "detail": f"result rejected: {exc}"}
            with self._lock:
                if job_id in self._cancelled or self._stopping:
                    return
                if error is not None:
                    self.store.finish(job_id, "failed", error=error)
                    return
                try:
                    stored = self.storage.save_bound(spec.model_id, doc)
                except Exception as exc:
                    self.store.finish(
                        job_id, "failed", error={"code": "storage-error", "detail": str(exc)}
                    )
                    return
                if not stored:
                    self.store.finish(job_id, "failed", error=MODEL_DELETED)
                    return
                self.store.finish(job_id, "succeeded", result=doc)
            observe_solve_time(doc)
        elif outcome.status == "failed":
            self.store.finish(job_id, "failed", error=outcome.error)
        # "cancelled" was recorded by cancel()/stop()


class _ProgressWriter:
    """Keeps a job's latest progress and writes it to the store at a bounded rate."""

    def __init__(self, store: JobStore, job_id: str) -> None:
        self.store = store
        self.job_id = job_id
        self.latest: dict[str, Any] = {}
        self.dirty = False
        self.last_write = 0.0

    def update(self, info: dict[str, Any]) -> None:
        phase_changed = info.get("phase") != self.latest.get("phase")
        self.latest = dict(info, updated_at=time.time())
        self.dirty = True
        if phase_changed:
            self.flush(force=True)

    def flush(self, force: bool = False) -> None:
        if self.dirty and (force or time.monotonic() - self.last_write >= PROGRESS_WRITE_S):
            self.store.set_progress(self.job_id, self.latest)
            self.dirty = False
            self.last_write = time.monotonic()
