"""Certification jobs on RQ: every worker that helps takes chunks from one Redis list.

Keys (next to the job hash of :mod:`service.jobs.redis_state`)::

    lipcert:cert:<id>:inputs     the batch (inputs.npz bytes, see service.jobs.certify)
    lipcert:cert:<id>:todo       list of chunk indices not yet taken
    lipcert:cert:<id>:claims     hash chunk index -> RQ job id of whoever certifies it
    lipcert:cert:<id>:chunk:<k>  the columns of chunk k (npz bytes)
    lipcert:cert:<id>:done       number of chunks finished
    lipcert:cert:<id>:result     the columns of the whole batch, once the job succeeded

The API (:func:`submit`) stores the batch, fills ``todo`` and enqueues the job itself plus
helper jobs (:func:`help_certification`), one per further worker. The job's own work horse
(:func:`run_certification_job`, called by :func:`service.jobs.rq_task.run_bound_job`) marks
it running, heartbeats, takes chunks like every helper, then waits for the chunks taken by
others, puts a chunk whose helper's RQ job ended without it back into ``todo`` (a helper
that died), joins the chunks and finishes the job. Cancelling the job stops its horse;
helpers stop after their current chunk. The API copies the result into its data dir when
it sees the job succeeded (:func:`persist_result`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import socket
import threading
import time
from typing import Any

import numpy as np

from service.documents import strict_json_object
from service.jobs.base import ACTIVE, JobRecord, JobSpec, now_iso
from service.jobs.certify import (
    CertifyOptions,
    batch_dir,
    certify_chunk,
    join_chunks,
    npz,
    options_of,
    read_npz,
    write_result,
)
from service.jobs.certify_check import recheck_batch
from service.jobs.redis_state import PREFIX, RedisJobs, model_key
from service.jobs.tasks import error_document, load_network
from service.local_certify import device_optimizer

log = logging.getLogger("lipcert.jobs")

HELPER_TASK = "service.jobs.certify_rq.help_certification"
KEEP_S = 7 * 24 * 3600
POLL_S = 0.2
HEARTBEAT_S = 1.0


def key(job_id: str, what: str) -> str:
    return f"{PREFIX}cert:{job_id}:{what}"


def submit(
    redis: Any, queue: Any, rec: JobRecord, inputs: bytes, timeout: int, workers: int
) -> None:
    """Store the batch and the chunk list of a just-created job, enqueue the helpers.

    Helpers: one fewer than ``max(options.workers, registered workers)``, at most one per
    further chunk (the job's own horse certifies too)."""
    from rq import Worker

    opts = options_of(rec.spec)
    chunks = len(opts.chunks())
    with redis.pipeline() as p:
        p.set(key(rec.id, "inputs"), inputs, ex=KEEP_S)
        p.delete(key(rec.id, "todo"))
        p.rpush(key(rec.id, "todo"), *range(chunks))
        p.expire(key(rec.id, "todo"), KEEP_S)
        p.execute()
    registered = len(Worker.all(queue=queue))
    helpers = min(chunks - 1, max(opts.workers, registered, workers) - 1)
    for i in range(max(0, helpers)):
        queue.enqueue_call(
            func=HELPER_TASK,
            args=(rec.id,),
            job_id=f"{rec.id}-help-{i}",
            timeout=timeout,
            result_ttl=3600,
            failure_ttl=KEEP_S,
            description=f"lipcert certification {rec.id} helper {i}",
        )


class _Chunks:
    """Takes chunks from the job's list and certifies them (network and batch loaded once)."""

    def __init__(self, conn: Any, jobs: RedisJobs, job_id: str, me: str) -> None:
        self.conn = conn
        self.jobs = jobs
        self.job_id = job_id
        self.me = me
        raw = jobs.raw(job_id)
        self.spec = JobSpec.from_dict(json.loads(raw["spec"]))
        self.opts: CertifyOptions = options_of(self.spec)
        self.sha = raw["model_sha256"]
        self._net: Any = None
        self._inputs: dict[str, np.ndarray] | None = None
        self._optimizer = device_optimizer(os.environ.get("LIPCERT_DEVICE", "auto"))

    def _load(self) -> tuple[Any, dict[str, np.ndarray]]:
        if self._net is None or self._inputs is None:
            data = self.conn.get(model_key(self.sha))
            batch = self.conn.get(key(self.job_id, "inputs"))
            if data is None or batch is None:
                raise RuntimeError("the model or the batch is no longer in Redis")
            self._net = load_network(("bytes", self.sha, data))
            self._inputs = read_npz(batch)
        return self._net, self._inputs

    def work(self) -> int:
        """Certify chunks until none are left or the job ended; how many this call did."""
        done = 0
        spans = self.opts.chunks()
        while self.jobs.status(self.job_id) in ACTIVE:
            raw = self.conn.lpop(key(self.job_id, "todo"))
            if raw is None:
                return done
            k = int(raw)
            self.conn.hset(key(self.job_id, "claims"), str(k), self.me)
            net, inputs = self._load()
            cols = certify_chunk(
                net, inputs, self.opts, *spans[k], self._optimizer, certificates=True
            )
            cols["worker"] = np.array(f"{socket.gethostname()}:{os.getppid()}")  # the worker
            with self.conn.pipeline() as p:  # MULTI: the chunk, its release and the count
                p.set(key(self.job_id, f"chunk:{k}"), npz(cols), ex=KEEP_S)
                p.hdel(key(self.job_id, "claims"), str(k))
                p.incr(key(self.job_id, "done"))
                p.expire(key(self.job_id, "done"), KEEP_S)
                p.execute()
            done += 1
        return done

    def done(self) -> int:
        return int(self.conn.get(key(self.job_id, "done")) or 0)

    def requeue_lost(self) -> None:
        """Put back the chunks whose helper's RQ job ended without finishing them."""
        from rq.exceptions import NoSuchJobError
        from rq.job import Job

        for k, owner in self.conn.hgetall(key(self.job_id, "claims")).items():
            owner_id = owner.decode() if isinstance(owner, bytes) else str(owner)
            if owner_id == self.me:
                continue
            try:
                status = str(Job.fetch(owner_id, connection=self.conn).get_status().value)
            except NoSuchJobError:
                status = "missing"
            ended = status in ("failed", "stopped", "canceled", "finished", "missing")
            if ended and self.conn.hdel(key(self.job_id, "claims"), k):
                log.warning("certification %s: chunk %s of %s requeued", self.job_id, k, owner_id)
                self.conn.rpush(key(self.job_id, "todo"), k)


def _fail(jobs: RedisJobs, job_id: str, exc: BaseException) -> None:
    jobs.finish(job_id, "failed", error=error_document(exc), finished_at=now_iso())


def help_certification(job_id: str) -> dict[str, Any]:
    """RQ task of a helper: certify chunks of job ``job_id`` while there are any."""
    from rq import get_current_job

    current = get_current_job()
    if current is None:
        raise RuntimeError("help_certification must run inside an RQ worker")
    jobs = RedisJobs(current.connection)
    if jobs.status(job_id) not in ACTIVE:
        return {"chunks": 0}
    try:
        done = _Chunks(current.connection, jobs, job_id, current.id).work()
    except Exception as exc:
        _fail(jobs, job_id, exc)
        raise
    return {"chunks": done}


def _progress(opts: CertifyOptions, done: int, start: float) -> dict[str, Any]:
    chunks = len(opts.chunks())
    rows = min(opts.rows, done * opts.chunk_rows)
    return {
        "phase": "certify",
        "chunks_done": done,
        "chunks": chunks,
        "inputs_done": rows,
        "inputs": opts.rows,
        "fraction": rows / opts.rows if opts.rows else 1.0,
        "elapsed_s": time.perf_counter() - start,
        "updated_at": time.time(),
    }


def run_certification_job(job_id: str, conn: Any, rq_job_id: str) -> dict[str, Any]:
    """The job's own horse: certify, wait for the helpers' chunks, join, finish."""
    jobs = RedisJobs(conn)
    if not jobs.start(job_id):
        return {"status": jobs.status(job_id) or "missing"}
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_S):
            jobs.heartbeat(job_id)

    beater = threading.Thread(target=beat, name="lipcert-cert-heartbeat", daemon=True)
    beater.start()
    start = time.perf_counter()
    try:
        chunks = _Chunks(conn, jobs, job_id, rq_job_id)
        total = len(chunks.opts.chunks())
        while jobs.status(job_id) == "running":
            chunks.work()
            done = chunks.done()
            jobs.transition(job_id, ("running",), progress=_progress(chunks.opts, done, start))
            if done >= total:
                break
            chunks.requeue_lost()
            time.sleep(POLL_S)
        if jobs.status(job_id) != "running":
            return {"status": jobs.status(job_id)}
        bundle: dict[str, np.ndarray] = {}
        for k in range(total):
            data = conn.get(key(job_id, f"chunk:{k}"))
            if data is None:
                raise RuntimeError(f"chunk {k} of the batch is missing from Redis")
            bundle.update({f"c{k}/{name}": arr for name, arr in read_npz(data).items()})
        conn.set(key(job_id, "result"), npz(bundle), ex=KEEP_S)
        # the summary is the API's, from the certificates it re-checks (persist_result)
        pending = {
            "kind": "certification",
            "rechecked": False,
            "wall_s": time.perf_counter() - start,
        }
        jobs.finish(job_id, "succeeded", result=pending, finished_at=now_iso())
        conn.delete(key(job_id, "inputs"), *[key(job_id, f"chunk:{k}") for k in range(total)])
        return {"status": "succeeded"}
    except Exception as exc:
        _fail(jobs, job_id, exc)
        return {"status": "failed"}
    finally:
        stop.set()
        beater.join(timeout=5)


def split_chunks(data: bytes | None, chunks: int) -> list[dict[str, np.ndarray] | None]:
    """The per-chunk arrays of a worker's result bundle (``c<k>/<name>``); None for a chunk
    that is missing, and for all of them when the bundle is not a readable npz."""
    parts: list[dict[str, np.ndarray] | None] = [None] * chunks
    try:
        arrays = read_npz(data) if data is not None else {}
    except Exception as exc:  # a worker's bytes: anything unreadable is no result
        log.warning("unreadable certification result from a worker: %s", exc)
        return parts
    for name, arr in arrays.items():
        head, _, rest = name.partition("/")
        if head[:1] == "c" and head[1:].isdigit() and rest and int(head[1:]) < chunks:
            k = int(head[1:])
            parts[k] = parts[k] or {}
            parts[k][rest] = arr  # type: ignore[index]
    return parts


def trusted_floor(storage: Any, model_id: str, opts: CertifyOptions) -> CertifyOptions:
    """``opts`` with the floor bound L taken from the API's own storage (the bound that job
    ``bound_job_id`` stored for this model), not from the spec in Redis; no floor when that
    bound is gone (sound: radii only shrink)."""
    if opts.lipschitz is None:
        return opts
    stored = None
    finder = getattr(storage, "bound_for_job", None)
    if opts.bound_job_id is not None and finder is not None:
        stored = finder(model_id, opts.bound_job_id)
    lip = None if stored is None else stored.usable_lipschitz
    if lip != opts.lipschitz:
        log.warning("certification floor L %s replaced by the stored %s", opts.lipschitz, lip)
    return dataclasses.replace(opts, lipschitz=lip)


def persist_result(redis: Any, storage: Any, rec: JobRecord) -> dict[str, Any]:
    """API side: re-check the workers' certificates on the API's own network and inputs
    (:mod:`service.jobs.certify_check`), write the rebuilt columns into
    ``data_dir/certifications/<batch>/`` and return the job's summary (from those columns)."""
    opts = trusted_floor(storage, rec.spec.model_id, options_of(rec.spec))
    folder = batch_dir(storage.data_dir, opts.batch_id)
    inputs = read_npz((folder / "inputs.npz").read_bytes())
    net = storage.load_network(rec.spec.model_id)
    t0 = time.perf_counter()
    parts = split_chunks(redis.get(key(rec.id, "result")), len(opts.chunks()))
    checked, refused = recheck_batch(net, inputs, opts, parts)
    recheck_s = time.perf_counter() - t0
    wall = (rec.result or {}).get("wall_s")
    wall_s = float(wall) if isinstance(wall, int | float) and math.isfinite(wall) else 0.0
    columns, doc = join_chunks(checked, opts, wall_s)
    write_result(folder, columns)
    return strict_json_object(
        dict(
            doc,
            job_id=rec.id,
            model_id=rec.spec.model_id,
            rechecked=True,
            refused_certificates=refused,
            recheck_s=recheck_s,
        )
    )
