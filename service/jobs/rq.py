"""The distributed runner (``LIPCERT_QUEUE_URL=redis://...``): RQ on Redis.

Submitting stores the model bytes in Redis under their sha256 (content-addressed, so any
number of ``lipcert worker`` machines can solve without a shared disk), writes the job hash
(:mod:`service.jobs.redis_state`) and enqueues :func:`service.jobs.rq_task.run_bound_job`
with only the job id. Workers write progress, a heartbeat and the outcome into the hash.

The API side keeps the truth honest:

- a succeeded job's bound document (a certification job's re-checked columns) is saved
  into this server's storage once, by one API replica at a time under a lease that it
  renews while it works (:meth:`RedisJobs.claim_persist`); an API process killed meanwhile
  stops renewing, and once the lease expires (``persist_lease_s``) the next read, in any
  replica or the restarted one, takes the work over; ``persisted`` is set for good only
  with the saved result,
- a job RQ reports failed/stopped (e.g. "work-horse terminated unexpectedly") is failed or
  cancelled here with RQ's reason,
- a running job whose heartbeat is older than ``heartbeat_timeout_s`` is failed with
  ``worker-lost`` (the worker machine died; RQ itself notices only much later),

both when a job is read and from a background thread every ``reconcile_s`` seconds.

While Redis cannot be reached, every job request answers 503 ``queue-unavailable`` with
``Retry-After`` (:class:`service.errors.QueueUnavailable`) and readiness is false
(:meth:`RqRunner.unavailable_reason`, kept by the background thread's PING). Heartbeats
are judged only from the moment Redis is reachable again (a worker cannot beat while Redis
is down), so an outage alone never fails a job as ``worker-lost``.
Cancel marks the hash ``cancelled`` (the horse polls it and kills its solver) and sends
RQ's ``send_stop_job_command``, which SIGKILLs the horse's whole process group.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from rq import Queue

from sdp.errors import LipcertError
from service.diskspace import StorageFull
from service.documents import CANCELLED, MODEL_DELETED, STORAGE_FULL, JobError, StoredBound
from service.errors import QueueUnavailable
from service.jobs.adopt import adopt_bound
from service.jobs.base import (
    ACTIVE,
    JobRecord,
    JobSpec,
    now_iso,
    observe_solve_time,
)
from service.jobs.redis_state import (
    ACTIVE_SET,
    CLAIMED,
    DONE,
    QUEUE_NAME,
    RedisJobs,
    dedupe_key,
    job_key,
    model_key,
)

log = logging.getLogger("lipcert.jobs")

TASK = "service.jobs.rq_task.run_bound_job"
KEEP_S = 7 * 24 * 3600
"""How long RQ keeps finished job records, and Redis keeps model bytes after the last use."""


MISSING_GRACE_S = 30.0
"""A job hash younger than this may not have its RQ job yet (it is enqueued right after)."""

#: What an unreachable Redis raises (refused, reset, timed out, still loading after restart).
OUTAGE = (RedisConnectionError, RedisTimeoutError)


class RqRunner:
    """Bound jobs on an RQ queue; see the module docstring."""

    name = "rq"

    def __init__(
        self,
        storage: Any,
        queue_url: str,
        *,
        default_timeout_s: float | None = None,
        heartbeat_timeout_s: float = 30.0,
        reconcile_s: float = 1.0,
        recheck_workers: int = 2,
        persist_lease_s: float = 30.0,
    ) -> None:
        self.storage = storage
        # bounded waits: a request never hangs on a dead Redis, it answers 503
        self.redis = Redis.from_url(
            queue_url, socket_connect_timeout=2.0, socket_timeout=5.0, health_check_interval=10
        )
        self.queue = Queue(QUEUE_NAME, connection=self.redis)
        self.jobs = RedisJobs(self.redis)
        self.default_timeout_s = default_timeout_s
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.reconcile_s = reconcile_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._down: str | None = None
        self._reachable_since = time.time()
        self._rechecking: set[str] = set()
        self._rechecking_lock = threading.Lock()
        self.recheck_workers = max(1, int(recheck_workers))
        self.persist_lease_s = float(persist_lease_s)
        self._recheck_pool: ThreadPoolExecutor | None = None  # made on first use

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Start watching; a Redis that is down now only makes the server not ready."""
        self._check_redis()
        self._stop.clear()
        self._thread = threading.Thread(target=self._watch, name="lipcert-rq-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        with self._rechecking_lock:
            pool, self._recheck_pool = self._recheck_pool, None
        if pool is not None:  # queued re-checks are dropped (not begun: the next read retries)
            pool.shutdown(wait=False, cancel_futures=True)

    def _watch(self) -> None:
        while not self._stop.wait(self.reconcile_s):
            if not self._check_redis():
                continue
            try:
                for raw_id in self.redis.smembers(ACTIVE_SET):
                    self.get(raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id))
            except QueueUnavailable:
                pass  # recorded by _redis(); the next PING tells when it is back
            except Exception:  # Redis hiccups must not kill the watcher
                log.exception("reconciling RQ jobs failed")

    def _check_redis(self) -> bool:
        """PING Redis and record whether it answers (readiness); True when it does."""
        try:
            self.redis.ping()
        except OUTAGE as exc:
            self._mark_down(exc)
            return False
        if self._down is not None:
            log.warning("Redis is reachable again")
            self._down = None
            self._reachable_since = time.time()
        return True

    def _mark_down(self, exc: BaseException) -> None:
        if self._down is None:
            log.warning("Redis is unreachable: %s", exc)
        self._down = f"the job queue (Redis) is unreachable: {exc}"

    def unavailable_reason(self) -> str | None:
        """Why the queue cannot take work now (None: Redis answered the last PING)."""
        return self._down

    @contextlib.contextmanager
    def _redis(self) -> Iterator[None]:
        """Turn an unreachable Redis into :class:`QueueUnavailable` (503 + Retry-After)."""
        try:
            yield
        except OUTAGE as exc:
            self._mark_down(exc)
            raise QueueUnavailable(
                f"the job queue (Redis) is unreachable: {exc}; retry later"
            ) from exc

    # -- API ------------------------------------------------------------------------------------

    def submit(self, spec: JobSpec) -> JobRecord:
        """A new queued job, or the in-flight / succeeded job of an identical request."""
        with self._redis():
            return self._submit(spec)

    def _submit(self, spec: JobSpec) -> JobRecord:
        key = dedupe_key(spec.dedupe_key())
        with self.redis.lock(key + ":lock", timeout=30, blocking_timeout=30):
            previous = self.redis.get(key)
            if previous is not None:
                rec = self.get(previous.decode() if isinstance(previous, bytes) else previous)
                if rec is not None and spec.reuses(rec, self._stored):
                    rec.reused = True
                    return rec
            data = self.storage.model_bytes(spec.model_id)
            sha = hashlib.sha256(data).hexdigest()
            self.redis.set(model_key(sha), data, ex=KEEP_S)
            rec = JobRecord(id=uuid.uuid4().hex, spec=spec)
            timeout = spec.timeout_s or self.default_timeout_s
            self.jobs.create(rec, model_sha256=sha, timeout_s=timeout)
            self.redis.set(key, rec.id, ex=KEEP_S)
            if spec.kind == "certification":  # the batch, its chunks and the helper jobs
                from service.jobs import certify, certify_rq

                opts = certify.options_of(spec)
                folder = certify.batch_dir(self.storage.data_dir, opts.batch_id)
                inputs = (folder / "inputs.npz").read_bytes()
                limit = -1 if timeout is None else int(timeout) + 120
                certify_rq.submit(self.redis, self.queue, rec, inputs, limit, opts.workers)
        self.queue.enqueue_call(
            func=TASK,
            args=(rec.id,),
            job_id=rec.id,
            timeout=-1 if timeout is None else int(timeout) + 120,
            result_ttl=KEEP_S,
            failure_ttl=KEEP_S,
            description=f"lipcert bound {spec.model_id} {spec.method}",
        )
        return rec

    def get(self, job_id: str) -> JobRecord | None:
        with self._redis():
            return self._get(job_id)

    def _get(self, job_id: str) -> JobRecord | None:
        rec = self.jobs.get(job_id)
        if rec is None:
            return None
        if not rec.terminal:
            self._reconcile(rec)
            rec = self.jobs.get(job_id) or rec
        if rec.terminal:
            self._persist(rec)
            rec = self.jobs.get(job_id) or rec
        if rec.status == "succeeded" and (rec.result or {}).get("rechecked") is False:
            # a certification job whose workers' certificates the API has not re-checked
            # yet (another request is at it, or it failed and is retried on the next read)
            progress = dict(rec.progress, phase="recheck")
            return dataclasses.replace(rec, status="running", result=None, progress=progress)
        return rec

    def cancel(self, job_id: str, error: JobError = CANCELLED) -> JobRecord | None:
        """Mark cancelled, cancel the queued RQ job or stop (kill) the running one."""
        with self._redis():
            return self._cancel(job_id, error)

    def _cancel(self, job_id: str, error: JobError) -> JobRecord | None:
        from rq.command import send_stop_job_command
        from rq.exceptions import InvalidJobOperation, NoSuchJobError
        from rq.job import Job

        rec = self.jobs.get(job_id)
        if rec is None or rec.terminal:
            return rec
        self.jobs.finish(job_id, "cancelled", error=error, finished_at=now_iso())
        try:
            job = Job.fetch(job_id, connection=self.redis)
        except NoSuchJobError:
            return self.get(job_id)
        deadline = time.monotonic() + 10  # a dead worker never answers
        while time.monotonic() < deadline:
            status = job.get_status(refresh=True)
            if status in ("queued", "deferred", "scheduled", "created"):
                with contextlib.suppress(InvalidJobOperation):
                    job.cancel()
                break
            if status != "started":
                break
            # not yet picked up by a horse: it sees "cancelled" and exits by itself
            with contextlib.suppress(InvalidJobOperation, NoSuchJobError):
                send_stop_job_command(self.redis, job_id)
            time.sleep(0.2)
        return self.get(job_id)

    def cancel_model(self, model_id: str) -> list[str]:
        with self._redis():
            return self._cancel_model(model_id)

    def _cancel_model(self, model_id: str) -> list[str]:
        ids = []
        for raw_id in self.redis.smembers(ACTIVE_SET):
            rec = self.jobs.get(raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id))
            if rec is not None and not rec.terminal and rec.spec.model_id == model_id:
                self.cancel(rec.id, MODEL_DELETED)
                ids.append(rec.id)
        return ids

    def active_jobs(self, limit: int = 100) -> list[JobRecord]:
        """The queued and running jobs (from the active set), oldest first."""
        recs = []
        for raw_id in self.redis.smembers(ACTIVE_SET):
            rec = self.jobs.get(raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id))
            if rec is not None and not rec.terminal:
                recs.append(rec)
        recs.sort(key=lambda r: (r.created_at, r.id))
        return recs[: max(0, int(limit))]

    def status_counts(self) -> dict[str, int]:
        """Jobs per status, from the job hashes (one SCAN; fine for a metrics scrape)."""
        with self._redis():
            return self._status_counts()

    def _status_counts(self) -> dict[str, int]:
        counts = dict.fromkeys(("queued", "running", "succeeded", "failed", "cancelled"), 0)
        keys = list(self.redis.scan_iter(match=job_key("*"), count=1000))
        with self.redis.pipeline() as p:
            for key in keys:
                p.hget(key, "status")
            for status in p.execute():
                if status is not None:
                    name = status.decode() if isinstance(status, bytes) else str(status)
                    counts[name] = counts.get(name, 0) + 1
        return counts

    # -- reconciliation ------------------------------------------------------------------------

    def _stored(self, rec: JobRecord) -> bool:
        finder = getattr(self.storage, "bound_for_job", None)
        return True if finder is None else finder(rec.spec.model_id, rec.id) is not None

    def _persist(self, rec: JobRecord) -> None:
        """Save a succeeded job's result into storage once; drop ended jobs from the watch set."""
        result = rec.result if rec.status == "succeeded" else None
        if rec.spec.kind == "certification":
            result = None  # per-input results, not a bound: copied, not rechecked or saved
            if rec.status == "succeeded" and (rec.result or {}).get("rechecked") is False:
                self._recheck_in_background(rec)
                return
            if rec.status == "succeeded" and not self._copy_certification(rec):
                return
        if result is not None:
            owner = self._owner()
            claim = self.jobs.claim_persist(rec.id, owner, self.persist_lease_s)
            if claim != DONE and (claim != CLAIMED or not self._save_bound(rec, result, owner)):
                return  # another replica holds the lease, or saving failed: a read retries
        self.redis.srem(ACTIVE_SET, rec.id)

    def _save_bound(self, rec: JobRecord, result: dict[str, Any], owner: str) -> bool:
        """Save a succeeded job's bound under ``owner``'s lease; False when it failed."""
        with self._renewing(rec.id, owner):
            error: JobError | None = None
            model_id = rec.spec.model_id
            bound = StoredBound.from_json(result)
            try:
                if self.storage.get_model(model_id) is None:
                    error = MODEL_DELETED
                else:
                    bound = adopt_bound(bound, self.storage.load_network(model_id))
                    if not self.storage.save_bound(model_id, bound):
                        error = MODEL_DELETED
            except LipcertError as exc:  # a worker's word is not a certificate
                log.warning("job %s: worker result rejected: %s", rec.id, exc)
                error = JobError("unverified-result", f"worker result rejected: {exc}")
            except StorageFull as exc:  # as in the local runner: failed, retry when freed
                error = STORAGE_FULL.with_detail(exc.detail)
            except Exception:
                self.jobs.release_persist(rec.id, owner)
                log.exception("saving the result of job %s failed", rec.id)
                return False
        if error is not None:
            failed = {"status": "failed", "error": error.to_json(), "result": "null"}
            self.jobs.finish_persist(rec.id, owner, ("succeeded",), **failed)
        elif self.jobs.finish_persist(rec.id, owner):
            observe_solve_time(bound)
        return True

    def _owner(self) -> str:
        """A fresh claimant name for one lease (host, pid, and a unique tag)."""
        return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"

    @contextlib.contextmanager
    def _renewing(self, job_id: str, owner: str) -> Iterator[None]:
        """Renew ``owner``'s lease on ``job_id`` every third of ``persist_lease_s`` while
        the body runs (a thread: Python switches threads every few ms, and numpy releases
        the GIL, so a CPU-bound re-check does not starve it)."""
        stop = threading.Event()

        def renew() -> None:
            while not stop.wait(self.persist_lease_s / 3):
                try:
                    if not self.jobs.renew_persist(job_id, owner, self.persist_lease_s):
                        log.warning("job %s: the lease on saving its result was lost", job_id)
                        return
                except Exception:  # Redis away: the lease may lapse, a reader then retries
                    log.warning("job %s: renewing the lease failed", job_id, exc_info=True)

        thread = threading.Thread(target=renew, name="lipcert-persist-lease", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def _recheck_in_background(self, rec: JobRecord) -> None:
        """Re-check a certification job's certificates on the runner's re-check pool
        (``recheck_workers`` threads shared by all jobs; about one CROWN pass per input:
        minutes for a large job), so that no request waits for it; readers see the job
        running in phase ``recheck`` meanwhile, queued or at work."""
        with self._rechecking_lock:
            if rec.id in self._rechecking:
                return
            if self._recheck_pool is None:
                self._recheck_pool = ThreadPoolExecutor(
                    self.recheck_workers, thread_name_prefix="lipcert-recheck"
                )
            self._rechecking.add(rec.id)
            future = self._recheck_pool.submit(self._copy_certification, rec)

        def done(fut: Future[bool]) -> None:  # also when cancelled by stop(): a read retries it
            with self._rechecking_lock:
                self._rechecking.discard(rec.id)
            exc = None if fut.cancelled() else fut.exception()
            if exc is not None:  # e.g. Redis lost while claiming: a later read retries it
                log.error("re-checking certification job %s failed", rec.id, exc_info=exc)

        future.add_done_callback(done)

    def _copy_certification(self, rec: JobRecord) -> bool:
        """Re-check a succeeded certification job's certificates and copy its columns into
        the data dir once (under the saving lease, see the module docstring); False when it
        failed or another replica is at it (a later read tries again)."""
        from service.jobs import certify_rq

        owner = self._owner()
        claim = self.jobs.claim_persist(rec.id, owner, self.persist_lease_s)
        if claim != CLAIMED:
            return claim == DONE
        try:
            with self._renewing(rec.id, owner):
                if self.storage.get_model(rec.spec.model_id) is None:
                    failed = {"status": "failed", "error": MODEL_DELETED.to_json()}
                    self.jobs.finish_persist(rec.id, owner, ("succeeded",), **failed, result="null")
                    return True
                summary = certify_rq.persist_result(self.redis, self.storage, rec)
        except Exception:
            self.jobs.release_persist(rec.id, owner)
            log.exception("re-checking the result of certification job %s failed", rec.id)
            return False
        # False: the lease lapsed and another replica took over; it writes the same columns
        self.jobs.finish_persist(rec.id, owner, ("succeeded",), result=summary)
        return True

    def _reconcile(self, rec: JobRecord) -> None:
        """Fail/cancel an unfinished job whose RQ job ended or whose worker went silent."""
        from rq.exceptions import NoSuchJobError
        from rq.job import Job

        try:
            job = Job.fetch(rec.id, connection=self.redis)
            status = str(job.get_status(refresh=True).value)
        except NoSuchJobError:
            job, status = None, "missing"
            created = self.jobs.raw(rec.id).get("created_ts")
            if created and time.time() - float(created) < MISSING_GRACE_S:
                return  # submit() writes the hash just before it enqueues the RQ job
        if status in ("failed", "stopped", "canceled", "finished", "missing"):
            if self.jobs.status(rec.id) not in ACTIVE:
                return
            if status in ("stopped", "canceled"):
                err = JobError("cancelled", f"RQ job {status}")
                self.jobs.finish(rec.id, "cancelled", error=err, finished_at=now_iso())
            else:
                err = JobError("worker-failed", _rq_reason(job, status))
                self.jobs.finish(rec.id, "failed", error=err, finished_at=now_iso())
            return
        if rec.status == "running":
            beat = self.jobs.raw(rec.id).get("heartbeat")
            # a worker cannot beat while Redis is down: count from when it came back
            since = max(float(beat), self._reachable_since) if beat else self._reachable_since
            age = time.time() - since
            if age > self.heartbeat_timeout_s:
                err = JobError(
                    "worker-lost",
                    f"worker {rec.worker.get('worker') or '?'} on "
                    f"{rec.worker.get('host') or '?'} stopped sending heartbeats "
                    f"({age:.0f} s > {self.heartbeat_timeout_s:g} s): it died or lost Redis",
                )
                self.jobs.finish(rec.id, "failed", error=err, finished_at=now_iso())


def _rq_reason(job: Any, status: str) -> str:
    if job is None:
        return "the RQ job disappeared from Redis"
    try:
        result = job.latest_result()
        text = (getattr(result, "exc_string", None) or "").strip()
    except Exception:
        text = ""
    last = text.splitlines()[-1] if text else ""
    return f"RQ job {status}" + (f": {last}" if last else "")
