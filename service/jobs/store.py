"""Job state of the local runner in SQLite (``data_dir/jobs.sqlite``, WAL).

Every state change is one short transaction on a fresh connection, so the store is safe to
use from the runner's supervising threads and the request handlers at the same time.
Terminal transitions are conditional (``WHERE status IN ('queued', 'running')``): the first
of "solver finished", "cancelled" and "timed out" wins, later ones change nothing.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from service.jobs.base import JobRecord, JobSpec, now_iso

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
"""

_ACTIVE_SQL = "status IN ('queued', 'running')"


class JobStore:
    """CRUD for :class:`~service.jobs.base.JobRecord` rows."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30.0)
        db.row_factory = sqlite3.Row
        try:
            with db:
                yield db
        finally:
            db.close()

    def insert(self, rec: JobRecord) -> None:
        with self._connect() as db:
            db.execute(
                "INSERT INTO jobs (id, model_id, dedupe_key, spec, status, created_at)"
                " VALUES (?,?,?,?,?,?)",
                (
                    rec.id,
                    rec.spec.model_id,
                    rec.spec.dedupe_key(),
                    json.dumps(rec.spec.to_dict()),
                    rec.status,
                    rec.created_at,
                ),
            )

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
        result: dict[str, Any] | None = None,
        error: dict[str, Any] | None = None,
    ) -> bool:
        """Active -> ``status``; False when the job had already ended."""
        with self._connect() as db:
            cur = db.execute(
                "UPDATE jobs SET status = ?, result = ?, error = ?, finished_at = ?"
                f" WHERE id = ? AND {_ACTIVE_SQL}",
                (
                    status,
                    None if result is None else json.dumps(result),
                    None if error is None else json.dumps(error),
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

    def fail_active(self, code: str, detail: str) -> int:
        """Mark every queued/running job failed (after a restart); returns how many."""
        with self._connect() as db:
            cur = db.execute(
                "UPDATE jobs SET status = 'failed', error = ?, finished_at = ?"
                f" WHERE {_ACTIVE_SQL}",
                (json.dumps({"code": code, "detail": detail}), now_iso()),
            )
        return cur.rowcount


def _record(row: sqlite3.Row) -> JobRecord:
    return JobRecord(
        id=row["id"],
        spec=JobSpec.from_dict(json.loads(row["spec"])),
        status=row["status"],
        progress=json.loads(row["progress"] or "{}"),
        result=None if row["result"] is None else json.loads(row["result"]),
        error=None if row["error"] is None else json.loads(row["error"]),
        created_at=row["created_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        worker=json.loads(row["worker"] or "{}"),
    )
