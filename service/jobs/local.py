"""The embedded runner (default, ``LIPCERT_QUEUE_URL`` empty): a bounded local process pool.

``max_concurrent`` supervising threads take job ids from an in-memory queue; each job runs
in its own spawned solver process (:class:`~service.jobs.process.SolveProcess`) with
``threads`` BLAS/OpenMP threads. Job state lives in SQLite (:class:`~service.jobs.store.
JobStore`), so it survives a restart: jobs that were queued or running when the previous
server stopped are marked ``failed`` with code ``server-restarted`` (their solver processes
died with that server), never silently lost.

Several servers may share the data dir: each runner is an owner with a heartbeat
(``job_lease_s``), and only jobs of owners that are gone (process ended on this host, or
heartbeat older than the lease) are failed, at start and by every heartbeat. A succeeded
job's bound is stored in the same transaction as its ``succeeded`` transition, and only
while the job is still running and this runner's (``Storage.save_job_bound``): a job that
ended failed or cancelled - e.g. cancelled through another server - never stores a bound.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sdp.errors import LipcertError
from service.diskspace import StorageFull
from service.documents import CANCELLED, MODEL_DELETED, STORAGE_FULL, JobError, StoredBound
from service.jobs.adopt import adopt_bound
from service.jobs.base import (
    JobRecord,
    JobSpec,
    JobStatus,
    observe_solve_time,
)
from service.jobs.process import SolveProcess, supervise
from service.jobs.store import JobStore, Owner
from service.storage import ModelNotFound

log = logging.getLogger("lipcert.jobs")

PROGRESS_WRITE_S = 0.3
"""Least time between two progress writes of one job (phase changes are written at once)."""

STATUS_CHECK_S = 1.0
"""How often a supervising thread re-reads its job's status (a cancel by another server)."""


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
        lease_s: float = 30.0,
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
        #: ids in this runner's queue, and those of them cancelled (both shrink as jobs end)
        self._pending: set[str] = set()
        self._cancelled: set[str] = set()
        self._threads: list[threading.Thread] = []
        self._stopping = False
        self.lease_s = float(lease_s)
        self.owner = Owner.this_process(uuid.uuid4().hex)
        self._beat_stop = threading.Event()
        self._registered = False
        #: jobs of this runner that ended while the job store was full: their final state
        #: (failed, with this error) is written by the heartbeat once there is room again,
        #: else they would stay ``running`` for good (and be reused by identical requests)
        #: job id -> (final status, error) of jobs that ended while the job store was full
        self._unfinished: dict[str, tuple[JobStatus, JobError]] = {}

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Register as an owner, fail what dead servers left unfinished, then start the
        supervising threads and the heartbeat (which retries both on a full disk)."""
        self._keep_lease()
        for i in range(self.max_concurrent):
            t = threading.Thread(target=self._work, name=f"lipcert-jobs-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        beat = threading.Thread(target=self._heartbeat, name="lipcert-jobs-lease", daemon=True)
        beat.start()
        self._threads.append(beat)

    def _keep_lease(self) -> None:
        """Register (once) or renew this runner's lease, and fail the jobs of dead owners."""
        try:
            if not (self._registered and self.store.beat(self.owner.id)):
                # first time, or another server judged us dead (lease expired while this
                # process was frozen): register again so that new jobs have a live owner
                self.store.register(self.owner)
                self._registered = True
            self._finish_unfinished()
            stale = self.store.fail_orphaned(
                self.lease_s,
                "server-restarted",
                "the server running the job stopped (restarted or died) before it finished",
            )
        except StorageFull as exc:
            log.warning("job store: %s", exc.detail)
            return
        if stale:
            log.warning("marked %d job(s) of stopped servers failed", stale)

    def _heartbeat(self) -> None:
        while not self._beat_stop.wait(self.lease_s / 3):
            try:
                self._keep_lease()
            except Exception:  # the lease thread must outlive any hiccup
                log.exception("renewing the job lease failed")

    def stop(self) -> None:
        """Kill running solves (their jobs fail with ``server-stopped``) and join the threads.

        On a full disk the job rows cannot be updated: they stay with this (then dead) owner
        and the next server to start fails them (``server-restarted``)."""
        with self._lock:
            self._stopping = True
            procs = list(self._procs.items())
        stopped = JobError("server-stopped", "server stopped during the solve")
        for job_id, proc in procs:
            proc.terminate()  # the supervising thread closes its pipe
            self._record(functools.partial(self.store.finish, job_id, "failed", error=stopped))
        self._beat_stop.set()
        for _ in range(self.max_concurrent):
            self._queue.put(None)
        for t in self._threads:
            t.join(timeout=15)
        self._threads.clear()
        self._record(
            lambda: self.store.fail_owned(
                self.owner.id, "server-stopped", "server stopped before the job started"
            )
        )
        self._record(lambda: self.store.unregister(self.owner.id))
        self.store.close()

    def _finish_unfinished(self) -> None:
        """Write the final state of jobs that ended while the store was full (StorageFull
        propagates while it still is; a job cancelled meanwhile keeps its status)."""
        with self._lock:
            pending = list(self._unfinished.items())
        for job_id, (status, error) in pending:
            self.store.finish(job_id, status, error=error)
            with self._lock:
                self._unfinished.pop(job_id, None)

    @staticmethod
    def _record(write: Callable[[], object]) -> None:
        """A job-store write that must not take its thread down (at stop, after a crash)."""
        try:
            write()
        except StorageFull as exc:
            log.warning("job store not updated: %s", exc.detail)
        except Exception:
            log.exception("job store not updated")

    # -- API ------------------------------------------------------------------------------------

    def submit(self, spec: JobSpec) -> JobRecord:
        """A new queued job, or the in-flight / succeeded job of an identical request."""
        with self._lock:
            for rec in self.store.find_reusable(spec.dedupe_key()):
                if spec.reuses(rec, self._bound_still_stored):
                    rec.reused = True
                    return rec
            rec = JobRecord(id=uuid.uuid4().hex, spec=spec)
            self.store.insert(rec, owner=self.owner.id)
            self._pending.add(rec.id)
        self._queue.put(rec.id)
        return rec

    def get(self, job_id: str) -> JobRecord | None:
        rec = self.store.get(job_id)
        with self._lock:
            ended = self._unfinished.get(job_id)
        if rec is None or rec.terminal or ended is None:
            return rec
        status, error = ended  # not written yet (full disk): answered as it ended
        return dataclasses.replace(rec, status=status, error=error)

    def cancel(self, job_id: str, error: JobError = CANCELLED) -> JobRecord | None:
        """Cancel: a queued job never starts; a running job's solver process is killed now."""
        with self._lock:
            rec = self.store.get(job_id)
            if rec is None or rec.terminal:
                return rec
            if job_id in self._pending:  # ours (else its owner sees the status change)
                self._cancelled.add(job_id)
            proc = self._procs.get(job_id)
        if proc is not None:
            proc.terminate()  # the supervising thread closes its pipe
        try:
            self._finish_on_full_disk(job_id, "cancelled", error)
        except StorageFull as exc:  # cancelled all the same; written once there is room
            log.warning("job %s cancelled; recorded when there is room: %s", job_id, exc.detail)
            with self._lock:
                self._unfinished[job_id] = ("cancelled", error)
        return self.get(job_id)

    def _finish_on_full_disk(self, job_id: str, status: JobStatus, error: JobError) -> None:
        """End a job in the store; on a full disk the storage's reserve file is given up for
        the write (as for deleting a model). Raises StorageFull when that is not enough."""
        try:
            self.store.finish(job_id, status, error=error)
        except StorageFull:
            reserve = getattr(self.storage, "reserve", None)
            if reserve is None or not reserve.release():
                raise
            log.warning("disk full: released the reserve to end job %s", job_id)
            self.store.finish(job_id, status, error=error)

    def cancel_model(self, model_id: str) -> list[str]:
        ids = self.store.active_ids(model_id)
        for job_id in ids:
            self.cancel(job_id, MODEL_DELETED)
        return ids

    def status_counts(self) -> dict[str, int]:
        return self.store.status_counts()

    def active_jobs(self, limit: int = 100) -> list[JobRecord]:
        return self.store.active(limit)

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
                if isinstance(exc, StorageFull):  # e.g. it could not be marked running
                    log.warning("job %s: %s", job_id, exc.detail)
                    error = STORAGE_FULL.with_detail(exc.detail)
                else:
                    log.exception("job %s crashed the runner", job_id)
                    error = JobError("internal-error", repr(exc))
                try:
                    self.store.finish(job_id, "failed", error=error)
                except StorageFull:  # still full: the heartbeat writes it when there is room
                    with self._lock:
                        self._unfinished[job_id] = ("failed", error)
                except Exception:
                    log.exception("job store not updated")

    def _run(self, job_id: str) -> None:
        try:
            self._solve(job_id)
        finally:
            with self._lock:
                self._pending.discard(job_id)
                self._cancelled.discard(job_id)

    def _solve(self, job_id: str) -> None:
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
                cancelled=self._stop_check(job_id),
            )
            reporter.flush(force=True)
        finally:
            proc.kill()  # already gone after supervise(); not when marking running failed
            with self._lock:
                self._procs.pop(job_id, None)
        if outcome.status == "succeeded" and isinstance(outcome.result, dict):
            if spec.kind == "certification":  # per-input results: a file, not a bound
                summary = dict(outcome.result, job_id=job_id, model_id=spec.model_id)
                self.store.finish(job_id, "succeeded", result=summary)
                return
            bound = StoredBound.from_json(outcome.result).for_job(job_id, spec.model_id)
            try:
                # the solver process imported the file itself: a bound of another float64
                # network (e.g. other BLAS settings) is re-proven on the one the API serves
                net = self.storage.load_network(spec.model_id)
                bound = adopt_bound(bound, net, trusted=True)
            except ModelNotFound:
                self.store.finish(job_id, "failed", error=MODEL_DELETED)
                return
            except LipcertError as exc:
                error = JobError("unverified-result", f"result rejected: {exc}")
                self.store.finish(job_id, "failed", error=error)
                return
            guard = self.store.success_guard(job_id, self.owner.id, bound.to_json())
            try:
                stored = self.storage.save_job_bound(spec.model_id, bound, guard)
            except StorageFull as exc:
                self.store.finish(job_id, "failed", error=STORAGE_FULL.with_detail(exc.detail))
                return
            except Exception as exc:
                log.exception("storing the bound of job %s failed", job_id)
                self.store.finish(job_id, "failed", error=JobError("storage-error", str(exc)))
                return
            if stored == "model-deleted":
                self.store.finish(job_id, "failed", error=MODEL_DELETED)
            elif stored == "stored":
                observe_solve_time(bound)
            # "job-ended": cancelled or failed meanwhile (here or by another server): no bound
        elif outcome.status == "failed":
            self.store.finish(job_id, "failed", error=outcome.error)
        # "cancelled" was recorded by cancel()/stop()

    def _stop_check(self, job_id: str) -> Callable[[], bool]:
        """``cancelled()`` for :func:`supervise`: cancelled here, stopping, or the job no
        longer running in the store (cancelled through another server), read at most every
        :data:`STATUS_CHECK_S` seconds."""
        last = [time.monotonic()]

        def stop() -> bool:
            if job_id in self._cancelled or self._stopping:
                return True
            if time.monotonic() - last[0] < STATUS_CHECK_S:
                return False
            last[0] = time.monotonic()
            try:
                return self.store.status(job_id) != "running"
            except Exception:  # a busy or full store never stops a solve by itself
                return False

        return stop


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
        """Write when due; on a full disk progress is skipped (the solve goes on)."""
        if self.dirty and (force or time.monotonic() - self.last_write >= PROGRESS_WRITE_S):
            self.last_write = time.monotonic()
            try:
                self.store.set_progress(self.job_id, self.latest)
            except StorageFull:
                return
            self.dirty = False
