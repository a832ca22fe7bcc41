"""The bound task itself: load a network by id, certify a bound, return a JSON document.

Runs inside a dedicated solver process (see :mod:`service.jobs.process`), started with the
*spawn* method (a fresh interpreter whose BLAS/OpenMP thread limits are in its environment
from the start; :func:`child_main` sets them again for entry points that do not).
Messages go back to the supervising process over a pipe::

    ("progress", {"phase": ..., "iteration": ..., "residual": ...})   any number of times
    ("result",   bound document)                                      once, on success
    ("error",    {"code": ..., "detail": ...})                        once, on failure

The bound document is :meth:`service.documents.StoredBound.to_json` (with the full
certificate: rho and the multipliers T as lists), so a stored bound can be re-checked later
without a solver (:func:`sdp.certificate.verify_on`).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

from service.documents import JobError, JsonValue, StoredBound, strict_json
from service.jobs.base import JobSpec
from service.malloc_tuning import keep_freed_memory
from service.storage import ModelNotFound, Storage

THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS")

ModelSource = tuple[Any, ...]
"""``("storage", data_dir, model_id)`` (local runner) or ``("bytes", sha256, data)`` (RQ)."""

SOLVER_TIME_SHARE = 0.8
"""Part of a job's ``timeout_s`` given to the solver itself; the rest is left for import,
certification and storing. The runner kills the process when the whole ``timeout_s`` is up."""


def load_network(source: ModelSource) -> Any:
    """The network a job refers to: from the data dir by model id, or from model bytes."""
    if source[0] == "storage":
        _, data_dir, model_id = source
        return Storage(data_dir).load_network(model_id)
    if source[0] == "bytes":
        import hashlib

        from sdp.importers import load_model

        _, sha256, data = source
        if hashlib.sha256(data).hexdigest() != sha256:
            raise ValueError("model bytes do not match their sha256")
        return load_model(data)
    raise ValueError(f"unknown model source {source[0]!r}")


def run_bound(
    source: ModelSource,
    spec: JobSpec,
    progress: Callable[[dict[str, Any]], None],
    device: str = "auto",
) -> StoredBound:
    """Load the model, run :func:`sdp.bounds.compute_bound` (the structured solver on
    ``device``) and return the bound (:meth:`StoredBound.from_result`)."""
    from sdp.bounds import compute_bound
    from service.solver_device import use_solver_device

    use_solver_device(device)
    progress({"phase": "load"})
    net = load_network(source)
    solver_timeout = None if spec.timeout_s is None else SOLVER_TIME_SHARE * spec.timeout_s
    result = compute_bound(
        net,
        spec.method,
        pairwise=spec.pairwise,
        solver=spec.solver,
        timeout_s=solver_timeout,
        progress=progress,
    )
    return StoredBound.from_result(result, net.content_hash(), spec.to_dict())


def run_job(
    source: ModelSource,
    spec: JobSpec,
    progress: Callable[[dict[str, Any]], None],
    device: str = "auto",
    threads: int = 1,
) -> JsonValue:
    """The JSON answer of a job: a bound's document (:func:`run_bound`) or, for
    ``kind="certification"``, the summary of a batch's local certification
    (:func:`service.jobs.certify.run_certification`)."""
    if spec.kind == "certification":
        from service.jobs.certify import JobProcess, run_certification

        proc = JobProcess(load_network, THREAD_ENV, die_with_parent)
        return strict_json(run_certification(source, spec, progress, threads, device, proc))
    return run_bound(source, spec, progress, device).to_json()


def error_document(exc: BaseException) -> JobError:
    """The job error of a failure: sdp error codes kept, anything else ``internal-error``."""
    from sdp.errors import LipcertError

    if isinstance(exc, LipcertError):
        return JobError(exc.code, exc.detail)
    if isinstance(exc, ModelNotFound):  # only the store's own miss, not any KeyError
        return JobError("model-not-found", f"model {exc} is not stored")
    return JobError("internal-error", f"{type(exc).__name__}: {exc}")


def die_with_parent() -> None:
    """Linux: ask the kernel to SIGKILL this process when its parent dies (PR_SET_PDEATHSIG)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)
    except OSError:
        pass


def child_main(
    conn: Any, source: ModelSource, spec: dict[str, Any], threads: int, device: str = "auto"
) -> None:
    """Entry point of a solver process (spawned): limit threads, solve, report, exit."""
    for name in THREAD_ENV:
        os.environ[name] = str(threads)
    keep_freed_memory()  # the solver's n x n temporaries reused, not page-faulted in again
    die_with_parent()
    job = JobSpec.from_dict(spec)

    def progress(info: dict[str, Any]) -> None:
        conn.send(("progress", strict_json(info)))

    try:
        doc = run_job(source, job, progress, device, threads)
    except BaseException as exc:
        conn.send(("error", error_document(exc).to_json()))
    else:
        conn.send(("result", doc))
    finally:
        conn.close()
