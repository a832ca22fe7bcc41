"""The bound task itself: load a network by id, certify a bound, return a JSON document.

Runs inside a dedicated solver process (see :mod:`service.jobs.process`), started with the
*spawn* method (a fresh interpreter whose BLAS/OpenMP thread limits are in its environment
from the start; :func:`child_main` sets them again for entry points that do not).
Messages go back to the supervising process over a pipe::

    ("progress", {"phase": ..., "iteration": ..., "residual": ...})   any number of times
    ("result",   bound document)                                      once, on success
    ("error",    {"code": ..., "detail": ...})                        once, on failure

The bound document is ``BoundResult.summary()`` with ``certificate`` replaced by the full
certificate (``Certificate.to_json()``: rho and the multipliers T as lists), so a stored
bound can be re-checked later without a solver (:func:`sdp.certificate.verify_certificate`).
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

from service.jobs.base import JobSpec
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


def bound_document(
    result: Any, network_hash: str, request: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The document stored for a bound: ``result.summary()`` + the full certificate(s) + the
    content hash of the network that was bounded (a stored bound is only used while its model
    imports to that network: :class:`service.storage.Storage`) + the request that asked for it
    (a job's spec; None for the closed form checked at upload)."""
    doc: dict[str, Any] = result.summary()
    doc["network_hash"] = network_hash
    if result.certificate is not None:
        doc["certificate"] = json.loads(result.certificate.to_json())
    if result.pairwise_certificates:
        doc["pairwise_certificates"] = [
            json.loads(c.to_json()) for c in result.pairwise_certificates
        ]
    if request is not None:
        doc["request"] = request
    return doc


def run_bound(
    source: ModelSource,
    spec: JobSpec,
    progress: Callable[[dict[str, Any]], None],
    device: str = "auto",
) -> dict[str, Any]:
    """Load the model, run :func:`sdp.bounds.compute_bound` (the structured solver on
    ``device``) and return the bound document."""
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
    return bound_document(result, net.content_hash(), spec.to_dict())


def run_job(
    source: ModelSource,
    spec: JobSpec,
    progress: Callable[[dict[str, Any]], None],
    device: str = "auto",
    threads: int = 1,
) -> dict[str, Any]:
    """A bound (:func:`run_bound`) or, for ``kind="certification"``, the local certification
    of a batch (:func:`service.jobs.certify.run_certification`)."""
    if spec.kind == "certification":
        from service.jobs.certify import JobProcess, run_certification

        proc = JobProcess(load_network, THREAD_ENV, die_with_parent)
        return run_certification(source, spec, progress, threads, device, proc)
    return run_bound(source, spec, progress, device)


def json_safe(obj: Any) -> Any:
    """Plain JSON values only (numpy scalars -> float/int, non-finite -> None)."""
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, int):
        return obj
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "tolist"):  # numpy scalars and arrays
        return json_safe(obj.tolist())
    try:
        x = float(obj)
    except (TypeError, ValueError):
        return str(obj)
    return x if math.isfinite(x) else None


def error_document(exc: BaseException) -> dict[str, str]:
    """``{code, detail}`` for a failure: sdp error codes kept, anything else ``internal-error``."""
    from sdp.errors import LipcertError

    if isinstance(exc, LipcertError):
        return {"code": exc.code, "detail": exc.detail}
    if isinstance(exc, ModelNotFound):  # only the store's own miss, not any KeyError
        return {"code": "model-not-found", "detail": f"model {exc} is not stored"}
    return {"code": "internal-error", "detail": f"{type(exc).__name__}: {exc}"}


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
    die_with_parent()
    job = JobSpec.from_dict(spec)

    def progress(info: dict[str, Any]) -> None:
        conn.send(("progress", json_safe(dict(info))))

    try:
        doc = run_job(source, job, progress, device, threads)
    except BaseException as exc:
        conn.send(("error", error_document(exc)))
    else:
        conn.send(("result", json_safe(doc)))
    finally:
        conn.close()
