"""Service configuration from the environment (prefix ``LIPCERT_``), design.md §5.

Every field can be set as ``LIPCERT_<NAME>`` (case-insensitive), e.g.
``LIPCERT_DATA_DIR=/srv/lipcert LIPCERT_DEVICE=cuda lipcert serve``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

LOCAL_TIME_BUDGET_S = 5.0
"""Default seconds per input of a local certification (the radius search's budget, and at one
eps the deadline of alpha-crown's optimisation) in every service interface: the HTTP API's
``time_budget_s`` (the default of ``LIPCERT_LOCAL_TIME_BUDGET_S``, also its maximum there) and
the CLI's ``--time-budget``. 5 s keeps a 64-input local POST /certify within about 5 minutes.
Lower than ``certify_local``'s own default for library callers
(:data:`sdp.local.certify.TIME_BUDGET_S`, 10 s) on purpose: this one is bounded by the
service's request limits, which a library caller does not have."""


def default_data_dir() -> Path:
    """The platform's per-user data directory plus ``lipcert``.

    Linux/BSD: ``$XDG_DATA_HOME/lipcert`` or ``~/.local/share/lipcert``; macOS:
    ``~/Library/Application Support/lipcert``; Windows: ``%LOCALAPPDATA%\\lipcert``.
    """
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or str(Path.home() / "AppData" / "Local")
        return Path(base) / "lipcert"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "lipcert"
    xdg = os.environ.get("XDG_DATA_HOME")
    return Path(xdg if xdg else Path.home() / ".local" / "share") / "lipcert"


class Settings(BaseSettings):
    """Runtime settings of the API server, the inference worker and the job runners."""

    model_config = SettingsConfigDict(env_prefix="LIPCERT_", extra="ignore")

    data_dir: Path = Field(
        default_factory=default_data_dir,
        description="Where model files, bound results and the job database live.",
    )
    api_key: str | None = Field(
        default=None,
        description="When set, every route except health checks and docs needs X-API-Key.",
    )
    max_upload_mb: float = Field(default=64.0, gt=0, description="Largest accepted request body.")
    body_budget_mb: float = Field(
        default=256.0,
        gt=0,
        description="Memory for request bodies of 64 KiB or more and their decoding (JSON "
        "counted 16x), held at once across requests; a declared body is admitted once its size "
        "is reserved (one body up to the upload cap always gets in).",
    )
    body_wait_s: float = Field(
        default=30.0,
        ge=0,
        description="Longest a request whose declared body does not fit the body budget "
        "waits (in arrival order, reading nothing) for room before 503 + Retry-After.",
    )
    body_queue: int = Field(
        default=128,
        ge=0,
        description="Requests that may wait for room in the body budget at once; beyond, "
        "503 + Retry-After at once.",
    )
    body_timeout_s: float = Field(
        default=120.0,
        gt=0,
        description="Time limit for receiving one request body (then 408: a client that "
        "trickles its upload does not hold a buffer forever).",
    )
    queue_url: str = Field(
        default="",
        description="Empty: embedded local job runner; redis://...: RQ workers.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto",
        description="Device of the inference worker and of the structured LipSDP solver's "
        "matrices; auto = cuda when available.",
    )
    max_batch: int = Field(default=256, ge=1, description="Largest inference micro-batch (rows).")
    max_wait_ms: float = Field(
        default=0.0,
        ge=0,
        description="Extra wait for more requests before a forward pass (0: batch only what "
        "queued up while the previous pass ran).",
    )
    request_concurrency: int = Field(
        default=8,
        ge=1,
        description="Certify requests processed at once (decoding, inference, answer); more "
        "wait in arrival order, holding nothing, so the event loop stays responsive (health "
        "checks) under load.",
    )
    queue_size: int = Field(
        default=1024, ge=1, description="Pending inference requests before 503 + Retry-After."
    )
    model_cache_size: int = Field(default=4, ge=1, description="Models kept on the device (LRU).")
    parse_timeout_s: float = Field(
        default=60.0, gt=0, description="Time limit for parsing one uploaded model."
    )
    max_inputs: int = Field(default=65536, ge=1, description="Most inputs in one certify request.")
    max_local_inputs: int = Field(
        default=64,
        ge=1,
        description="Most inputs in one POST /certify with mode local (larger batches: the "
        "certification job route).",
    )
    local_time_budget_s: float = Field(
        default=LOCAL_TIME_BUDGET_S,
        gt=0,
        description="Largest (and default) local radius-search time per input.",
    )
    certify_chunk_rows: int = Field(
        default=64, ge=1, description="Inputs per chunk of a certification job."
    )
    certify_workers: int = Field(
        default=1,
        ge=1,
        description="Local runner: processes that certify the chunks of one certification job.",
    )
    recheck_workers: int = Field(
        default=2,
        ge=1,
        description="RQ runner: threads (shared by all jobs) that re-check the certificates of "
        "finished certification jobs.",
    )
    persist_lease_s: float = Field(
        default=30.0,
        gt=0,
        description="RQ runner: lease of the API replica that saves a finished job's result "
        "(re-checks a certification job's certificates), renewed every third of it; an API "
        "killed meanwhile is taken over by the next reader this long after its last renewal.",
    )
    torch_threads: int = Field(default=1, ge=1, description="torch.set_num_threads for inference.")
    cpu_dtype: Literal["float32", "float64"] = Field(
        default="float64", description="Inference dtype on CPU (CUDA always uses float64)."
    )
    max_concurrent_jobs: int = Field(default=1, ge=1, description="Local bound-solving workers.")
    job_timeout_s: float = Field(default=3600.0, gt=0, description="Default bound job time limit.")
    solver_threads: int = Field(default=1, ge=1, description="BLAS threads per solver process.")
    worker_heartbeat_timeout_s: float = Field(
        default=30.0, gt=0, description="RQ worker heartbeat after which a job counts as lost."
    )
    min_free_mb: float = Field(
        default=64.0,
        ge=0,
        description="Free space kept on the data dir's filesystem: uploads and bound jobs "
        "that would leave less answer 507 storage-full, and readiness is false below it.",
    )
    reserve_mb: float = Field(
        default=8.0,
        ge=0,
        description="Size of the preallocated reserve file in the data dir, given up when the "
        "disk is full so that deleting models (and starting) still works.",
    )
    job_lease_s: float = Field(
        default=30.0,
        gt=0,
        description="Local runner: a server's jobs are failed by another server on the same "
        "data dir only after its heartbeat is this old (or, on the same host, its process "
        "is gone).",
    )
    queue_outage_s: float = Field(
        default=900.0,
        ge=0,
        description="lipcert worker: how long a finished solve waits for an unreachable "
        "Redis to record its outcome (read by the worker from LIPCERT_QUEUE_OUTAGE_S).",
    )
    log_level: str = Field(default="info", description="Python logging level name.")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def min_free_bytes(self) -> int:
        return int(self.min_free_mb * 1024 * 1024)

    @property
    def reserve_bytes(self) -> int:
        return int(self.reserve_mb * 1024 * 1024)

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def db_path(self) -> Path:
        return self.data_dir / "lipcert.sqlite3"
