"""Job state of the local runner in SQLite (``data_dir/jobs.sqlite``, WAL).

Every state change is one short transaction on a fresh connection, so the store is safe to
use from the runner's supervising threads and the request handlers at the same time.
Terminal transitions are conditional (``WHERE status IN ('queued', 'running')``): the first
of "solver finished", "cancelled" and "timed out" wins, later ones change nothing.

Several servers may share one data dir. Each runner registers as an **owner** (table
``owners``: host, boot id, pid and process start time, heartbeat) and owns the jobs it
queued (``jobs.owner``; its queue is in its memory). An owner is dead when, on this host,
its process is gone, or, anywhere, its heartbeat is older than the lease
(:meth:`JobStore.dead_owners`); only the unfinished jobs of dead owners (and of rows from
before owners) are failed by :meth:`JobStore.fail_orphaned`. A succeeded job's bound is
stored in the same transaction as its transition, conditional on the job still being
running and owned (:meth:`JobStore.success_guard`).
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.diskspace import StorageFull, full_detail, is_disk_full
from service.documents import JobError, JsonObject
from service.jobs.base import JobRecord, JobSpec, now_iso
from service.storage import JobGuard

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    model_id TEXT NOT NULL,
    dedupe_key TEXT NOT NULL,
    spec TEXT NOT NULL,
    status TEXT NOT NULL,
    progress TEXT NOT NULL DEFAULT '{}',
    result TEXT,
    error TEXT,
    worker TEXT NOT NULL DEFAULT '{}',
    created_at TEXT NOT NULL,
    started_at TEXT,
    finished_at TEXT
);
CREATE INDEX IF NOT EXISTS jobs_by_key ON jobs (dedupe_key, status);
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status);
CREATE TABLE IF NOT EXISTS owners (
    id TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    boot_id TEXT NOT NULL,
    pid INTEGER NOT NULL,
    pid_start TEXT NOT NULL,
    heartbeat REAL NOT NULL
);
"""


@dataclass(frozen=True)
class Owner:
    """A runner process that owns jobs: where it runs, and how to tell it is still there."""

    id: str
    host: str
    boot_id: str
    pid: int
    pid_start: str

    @classmethod
    def this_process(cls, owner_id: str) -> Owner:
        pid = os.getpid()
        return cls(owner_id, socket.gethostname(), _boot_id(), pid, _pid_start(pid))

    def gone(self) -> bool | None:
        """True/False when this host can tell whether the process still runs; None when
        it runs on another host (then only its heartbeat can tell)."""
        if self.host != socket.gethostname() or self.boot_id != _boot_id():
            return None
        return _pid_start(self.pid) != self.pid_start


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _pid_start(pid: int) -> str:
    """The process's start time in clock ticks since boot ("" when it does not exist): a pid
    reused by another process has another start time."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return ""
        except PermissionError:
            pass
        return "?"  # alive, start time unknown (no /proc)
    fields = stat.rsplit(")", 1)[1].split()
    return "" if fields[0] in ("Z", "X") else fields[19]


_ACTIVE_SQL = "status IN ('queued', 'running')"


class JobStore:
    """CRUD for :class:`~service.jobs.base.JobRecord` rows."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._opened = False
        #: one connection kept open for the store's life: with it, the WAL index (``-shm``)
        #: stays in place between calls, so that reading a job needs no new disk space (a
        #: fresh connection after the last one closed must recreate it: 507 on a full disk)
        self._keeper: sqlite3.Connection | None = None
        self._keeper_lock = threading.Lock()
        self._closed = False
        with suppress(StorageFull):  # opened at the first use once there is room
            self._open()

    def close(self) -> None:
        """Close the kept connection (the last one to close checkpoints the WAL)."""
        with self._keeper_lock:
            keeper, self._keeper, self._closed = self._keeper, None, True
        if keeper is not None:
            keeper.close()

    def _open(self) -> None:
        if self._opened:
            return
        with self._connect(opening=True) as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)
            cols = {r["name"] for r in db.execute("PRAGMA table_info(jobs)")}
            if "owner" not in cols:
                with suppress(sqlite3.OperationalError):  # another process added it
                    db.execute("ALTER TABLE jobs ADD COLUMN owner TEXT")
        self._opened = True
        self._keep_open()

    def _keep_open(self) -> None:
        """Open the kept connection (best effort: on a full disk, again at the next use)."""
        with self._keeper_lock:
            if self._keeper is not None or self._closed:
                return
            keeper = sqlite3.connect(self.path, timeout=30.0, check_same_thread=False)
            try:
                keeper.execute("SELECT COUNT(*) FROM owners").fetchall()  # maps the WAL index
            except sqlite3.Error:
                keeper.close()
                return
            self._keeper = keeper

    @contextmanager
    def _connect(self, opening: bool = False) -> Iterator[sqlite3.Connection]:
        """A fresh connection inside a transaction; a full disk raises StorageFull."""
        if not opening:
            self._open()
            self._keep_open()
        db = sqlite3.connect(self.path, timeout=30.0)
        db.row_factory = sqlite3.Row
        try:
            with db:
                yield db
        except (sqlite3.Error, OSError) as exc:
            if is_disk_full(exc, self.path.parent):
                raise StorageFull(full_detail(self.path.parent)) from exc
            raise
        finally:
            db.close()

    # -- owners -----------------------------------------------------------------------------

    def register(self, owner: Owner) -> None:
        """Record ``owner`` (this runner) with a fresh heartbeat."""
        with self._connect() as db:
            db.execute(
                "INSERT OR REPLACE INTO owners VALUES (?,?,?,?,?,?)",
                (owner.id, owner.host, owner.boot_id, owner.pid, owner.pid_start, time.time()),
            )

    def beat(self, owner_id: str) -> bool:
        """Renew the heartbeat; False when the owner is not registered (any more)."""
        with self._connect() as db:
            cur = db.execute(
                "UPDATE owners SET heartbeat = ? WHERE id = ?", (time.time(), owner_id)
            )
        return cur.rowcount == 1

    def unregister(self, owner_id: str) -> None:
        with self._connect() as db:
            db.execute("DELETE FROM owners WHERE id = ?", (owner_id,))

    def dead_owners(self, lease_s: float) -> list[str]:
        """Owners whose process is gone (same host) or whose heartbeat is older than
        ``lease_s`` (a frozen or unreachable server counts as dead after its lease)."""
        with self._connect() as db:
            rows = db.execute("SELECT * FROM owners").fetchall()
        now = time.time()
        dead = []
        for r in rows:
            owner = Owner(r["id"], r["host"], r["boot_id"], int(r["pid"]), r["pid_start"])
            if owner.gone() or now - float(r["heartbeat"]) > lease_s:
                dead.append(owner.id)
        return dead

    def fail_orphaned(self, lease_s: float, code: str, detail: str) -> int:
        """Fail the unfinished jobs of dead owners and of no owner (rows written before
        owners existed); forget the dead owners. Returns how many jobs were failed."""
        dead = self.dead_owners(lease_s)
        marks = ",".join("?" * len(dead))
        owned_by_dead = f"owner IN ({marks})" if dead else "0"
        with self._connect() as db:
            cur = db.execute(
                "UPDATE jobs SET status = 'failed', error = ?, finished_at = ?"
                f" WHERE {_ACTIVE_SQL} AND (owner IS NULL OR {owned_by_dead})",
                (json.dumps(JobError(code, detail).to_json()), now_iso(), *dead),
            )
            if dead:
                db.execute(f"DELETE FROM owners WHERE id IN ({marks})", dead)
        return cur.rowcount

    def owned_active_ids(self, owner_id: str) -> list[str]:
        with self._connect() as db:
            rows = db.execute(
                f"SELECT id FROM jobs WHERE owner = ? AND {_ACTIVE_SQL}", (owner_id,)
            ).fetchall()
        return [str(r["id"]) for r in rows]

    def success_guard(self, job_id: str, owner_id: str, result: JsonObject) -> JobGuard:
        """The running -> succeeded transition of ``job_id``, only while ``owner_id`` owns
        it, for :meth:`service.storage.Storage.save_job_bound` (one transaction)."""
        return JobGuard(
            self.path,
            "UPDATE guard.jobs SET status = 'succeeded', result = ?, finished_at = ?"
            " WHERE id = ? AND status = 'running' AND owner = ?",
            (json.dumps(result), now_iso(), job_id, owner_id),
        )

    # -- jobs -------------------------------------------------------------------------------

    def insert(self, rec: JobRecord, owner: str | None = None) -> None:
        with self._connect() as db:
            db.execute(
                "INSERT INTO jobs (id, model_id, dedupe_key, spec, status, created_at, owner)"
                " VALUES (?,?,?,?,?,?,?)",
                (
                    rec.id,
                    rec.spec.model_id,
                    rec.spec.dedupe_key(),
                    json.dumps(rec.spec.to_dict()),
                    rec.status,
                    rec.created_at,
                    owner,
                ),
            )

    def status(self, job_id: str) -> str | None:
        with self._connect() as db:
            row = db.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else str(row["status"])

    def get(self, job_id: str) -> JobRecord | None:
        with self._connect() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else _record(row)

    def find_reusable(self, dedupe_key: str) -> list[JobRecord]:
        """Queued, running or succeeded jobs with this key, newest first."""
        with self._connect() as db:
            rows = db.execute(
                "SELECT * FROM jobs WHERE dedupe_key = ?"
                " AND status IN ('queued', 'running', 'succeeded') ORDER BY created_at DESC",
                (dedupe_key,),
            ).fetchall()
        return [_record(r) for r in rows]

    def mark_running(self, job_id: str, worker: dict[str, Any]) -> bool:
        """queued -> running; False when the job is no longer queued (e.g. cancelled)."""
        with self._connect() as db:
            cur = db.execute(
                "UPDATE jobs SET status = 'running', started_at = ?, worker = ?"
                " WHERE id = ? AND status = 'queued'",
                (now_iso(), json.dumps(worker), job_id),
            )
        return cur.rowcount == 1

    def set_progress(self, job_id: str, progress: dict[str, Any]) -> None:
        with self._connect() as db:
            db.execute(
                f"UPDATE jobs SET progress = ? WHERE id = ? AND {_ACTIVE_SQL}",
                (json.dumps(progress), job_id),
            )

    def finish(
        self,
        job_id: str,
        status: str,
        *,
        result: Mapping[str, object] | None = None,
        error: JobError | None = None,
    ) -> bool:
        """Active -> ``status``; False when the job had already ended."""
        with self._connect() as db:
            cur = db.execute(
                "UPDATE jobs SET status = ?, result = ?, error = ?, finished_at = ?"
                f" WHERE id = ? AND {_ACTIVE_SQL}",
                (
                    status,
                    None if result is None else json.dumps(dict(result)),
                    None if error is None else json.dumps(error.to_json()),
                    now_iso(),
                    job_id,
                ),
            )
        return cur.rowcount == 1

    def status_counts(self) -> dict[str, int]:
        """Number of jobs per status (every status present, zeros included)."""
        counts = dict.fromkeys(("queued", "running", "succeeded", "failed", "cancelled"), 0)
        with self._connect() as db:
            for row in db.execute("SELECT status, COUNT(*) AS n FROM jobs GROUP BY status"):
                counts[row["status"]] = int(row["n"])
        return counts

    def active_ids(self, model_id: str) -> list[str]:
        """Ids of the queued and running jobs of a model."""
        with self._connect() as db:
            rows = db.execute(
                f"SELECT id FROM jobs WHERE model_id = ? AND {_ACTIVE_SQL}", (model_id,)
            ).fetchall()
        return [str(r["id"]) for r in rows]

    def active(self, limit: int = 100) -> list[JobRecord]:
        """The queued and running jobs, oldest first (at most ``limit``)."""
        with self._connect() as db:
            rows = db.execute(
                f"SELECT * FROM jobs WHERE {_ACTIVE_SQL} ORDER BY created_at, id LIMIT ?",
                (int(limit),),
            ).fetchall()
        return [_record(r) for r in rows]

    def fail_owned(self, owner_id: str, code: str, detail: str) -> int:
        """Mark every queued/running job of ``owner_id`` failed (at stop); how many."""
        with self._connect() as db:
            cur = db.execute(
                "UPDATE jobs SET status = 'failed', error = ?, finished_at = ?"
                f" WHERE owner = ? AND {_ACTIVE_SQL}",
                (json.dumps(JobError(code, detail).to_json()), now_iso(), owner_id),
            )
        return cur.rowcount


def _record(row: sqlite3.Row) -> JobRecord:
    return JobRecord(
        id=row["id"],
        spec=JobSpec.from_dict(json.loads(row["spec"])),
        status=row["status"],
        progress=json.loads(row["progress"] or "{}"),
        result=None if row["result"] is None else json.loads(row["result"]),
        error=None if row["error"] is None else JobError.from_json(json.loads(row["error"])),
        created_at=row["created_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        worker=json.loads(row["worker"] or "{}"),
    )
