"""The bound-job contract shared by every runner: :class:`JobSpec`, :class:`JobRecord`,
:class:`JobRunner`.

A job asks for one certified bound of one stored model::

    JobSpec(model_id, method, pairwise, solver, timeout_s)

and moves through ``queued -> running -> succeeded | failed | cancelled``. Two requests
with the same :meth:`JobSpec.dedupe_key` (model, method, pairwise, solver) share a job:
the runner returns the succeeded job, or an in-flight one with the same time limit
(:meth:`JobSpec.can_join`), instead of solving again. A failed or cancelled job is never
reused.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from service.documents import CANCELLED, JobError, StoredBound

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
TERMINAL: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
ACTIVE: frozenset[str] = frozenset({"queued", "running"})


def now_iso() -> str:
    """UTC time as ISO 8601 with milliseconds, e.g. ``2026-11-25T15:42:58.123Z``."""
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


JobKind = Literal["bound", "certification"]


@dataclass(frozen=True)
class JobSpec:
    """What to compute: a bound of ``model_id`` by ``method`` (validated before queuing), or
    with ``kind="certification"`` the per-input local certification of an uploaded batch by
    the local ``method``; ``certify`` then holds its options
    (:class:`service.jobs.certify.CertifyOptions` as a dict)."""

    model_id: str
    method: str = "auto"
    pairwise: bool = False
    solver: str | None = None
    timeout_s: float | None = None
    kind: JobKind = "bound"
    certify: dict[str, Any] | None = None

    def dedupe_key(self) -> str:
        """sha256 of (model, method, pairwise, solver): equal keys share one job. A
        certification job is keyed by its own batch (a fresh id): never shared."""
        ident = json.dumps([self.model_id, self.method, self.pairwise, self.solver])
        if self.kind != "bound":
            ident = json.dumps([self.kind, ident, self.certify], sort_keys=True)
        return hashlib.sha256(ident.encode()).hexdigest()

    def can_join(self, running: JobRecord) -> bool:
        """Whether this request may share ``running``'s (unfinished) job: the same time limit,
        so a request neither times out earlier nor waits longer than it asked for."""
        return running.spec.timeout_s == self.timeout_s

    def reuses(self, previous: JobRecord, bound_stored: Callable[[JobRecord], bool]) -> bool:
        """Whether an identical request's ``previous`` job answers this one: succeeded with
        its bound still stored, or unfinished and joinable."""
        if previous.status == "succeeded":
            return bound_stored(previous)
        return previous.status in ACTIVE and self.can_join(previous)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> JobSpec:
        timeout = d.get("timeout_s")
        return cls(
            model_id=str(d["model_id"]),
            method=str(d.get("method", "auto")),
            pairwise=bool(d.get("pairwise", False)),
            solver=None if d.get("solver") is None else str(d["solver"]),
            timeout_s=None if timeout is None else float(timeout),
            kind="certification" if d.get("kind") == "certification" else "bound",
            certify=dict(d["certify"]) if isinstance(d.get("certify"), dict) else None,
        )


@dataclass
class JobRecord:
    """The state of one job, as ``GET /v1/jobs/{id}`` returns it.

    ``progress`` holds the solver's last report (``phase``, ``iteration``, ``residual``, ...;
    ``phase`` is ``done`` once the job succeeded, while a failed or cancelled job keeps the
    phase it ended in);
    ``result`` the stored bound document (``StoredBound.to_json``; a batch's summary for a
    certification job) when ``succeeded``; ``error`` (:class:`~service.documents.JobError`)
    when ``failed`` (``code`` is ``timeout``, ``server-restarted``, ``worker-lost``, an
    :mod:`sdp.errors` code, ...) or ``cancelled``.
    """

    id: str
    spec: JobSpec
    status: JobStatus = "queued"
    progress: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] | None = None
    error: JobError | None = None
    created_at: str = field(default_factory=now_iso)
    started_at: str | None = None
    finished_at: str | None = None
    reused: bool = False
    worker: dict[str, Any] = field(default_factory=dict)

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    def to_dict(self) -> dict[str, Any]:
        """JSON body of the job resource."""
        return {
            "id": self.id,
            "job_id": self.id,
            "kind": self.spec.kind,
            "model_id": self.spec.model_id,
            "method": self.spec.method,
            "pairwise": self.spec.pairwise,
            "solver": self.spec.solver,
            "timeout_s": self.spec.timeout_s,
            "status": self.status,
            "progress": {**self.progress, "phase": "done"}
            if self.status == "succeeded"
            else self.progress,
            "result": self.result,
            "error": None if self.error is None else self.error.to_json(),
            "created_at": self.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "reused": self.reused,
            "worker": self.worker,
        }


def observe_solve_time(bound: StoredBound) -> None:
    """Record a succeeded job's wall time in the ``lipcert_bound_solve_seconds`` histogram."""
    try:
        # imported here: solver processes import service.jobs.base and never record metrics,
        # so they need not load prometheus_client
        from service.metrics import SOLVE_SECONDS

        seconds = bound.timings.get("total_s", bound.solve_time_s)
        if isinstance(seconds, int | float):
            SOLVE_SECONDS.labels(bound.method or "?").observe(float(seconds))
    except Exception:  # metrics never break a job
        pass


@runtime_checkable
class JobRunner(Protocol):
    """Runs bound jobs somewhere (a local process pool, RQ workers) and tracks their state.

    ``submit`` returns the job (new, or a reused one with ``reused=True``); ``cancel`` kills a
    running solve for real and returns the job afterwards; both return ``None`` / raise
    nothing for unknown ids except where noted.
    """

    name: str

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def submit(self, spec: JobSpec) -> JobRecord: ...

    def get(self, job_id: str) -> JobRecord | None: ...

    def cancel(self, job_id: str, error: JobError = CANCELLED) -> JobRecord | None: ...

    def cancel_model(self, model_id: str) -> list[str]:
        """Cancel the unfinished jobs of a deleted model (error ``model-deleted``); their ids."""
        ...

    def status_counts(self) -> dict[str, int]: ...

    def active_jobs(self, limit: int = 100) -> list[JobRecord]:
        """The queued and running jobs, oldest first (at most ``limit``)."""
        ...
