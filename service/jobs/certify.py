"""Certification jobs: the local certification of a large batch, in chunks (issue 12).

A job (``JobSpec(kind="certification", certify=CertifyOptions(...).to_dict())``) certifies
the rows of one uploaded batch with :func:`service.local_certify.certify_rows`, in chunks of
``chunk_rows`` inputs that run in parallel:

- local runner: the job's process (:func:`run_certification`, spawned like a bound solve)
  hands the chunks to a pool of ``workers`` spawned processes;
- RQ runner: every ``lipcert worker`` that picks up the job or one of its helper jobs takes
  chunks from a Redis list until none are left (:mod:`service.jobs.certify_rq`).

So N processes or N workers certify a batch about N times faster than one. Files, under the
API's ``data_dir/certifications/<batch_id>/``: ``inputs.npz`` (``x`` (B, n0) float64 in the
model file's layout, optional ``labels`` (B,) int64 and ``epsilon`` (B,) float64), written by
the route before the job is queued, and ``result.npz`` (the per-input columns of
:func:`service.local_certify.local_columns`), written when the job succeeds. The job's
``result`` is the summary (:func:`service.local_certify.local_summary`) plus ``inputs``,
``chunks`` and ``wall_s``.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from service.documents import StoredBound
from service.jobs.base import JobSpec
from service.jobs.certify_check import certificate_arrays
from service.local_certify import (
    LocalOptions,
    device_optimizer,
    local_columns,
    local_summary,
    run_local,
    verified_global_bound,
)


@dataclass(frozen=True)
class CertifyOptions:
    """What a certification job certifies (JSON-safe; travels in ``JobSpec.certify``).

    ``epsilon``: the common eps, None for a radius search or when ``per_input_epsilon`` (the
    eps are then a column of the inputs file). ``lipschitz``: the verified global bound that
    floors the radii (None without one).
    """

    batch_id: str
    rows: int
    chunk_rows: int
    workers: int
    method: str
    time_budget_s: float
    epsilon: float | None = None
    per_input_epsilon: bool = False
    lipschitz: float | None = None
    bound_job_id: str | None = None

    @classmethod
    def new(cls, **fields: Any) -> CertifyOptions:
        """Options for a fresh batch (a new random ``batch_id``)."""
        return cls(batch_id=uuid.uuid4().hex, **fields)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CertifyOptions:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    def chunks(self) -> list[tuple[int, int]]:
        """(start, stop) row ranges of the chunks, in order."""
        step = max(1, self.chunk_rows)
        return [(a, min(a + step, self.rows)) for a in range(0, self.rows, step)]

    def bound(self) -> StoredBound | None:
        """The floor bound as :func:`service.local_certify.certify_rows` takes it."""
        if self.lipschitz is None:
            return None
        return StoredBound(self.lipschitz, verified=True, job_id=self.bound_job_id)


def options_of(spec: JobSpec) -> CertifyOptions:
    if spec.kind != "certification" or spec.certify is None:
        raise ValueError("not a certification job")
    return CertifyOptions.from_dict(spec.certify)


def batch_dir(data_dir: str | Path, batch_id: str) -> Path:
    """``data_dir/certifications/<batch_id>`` (``batch_id`` is a hex uuid: no path tricks)."""
    if not (len(batch_id) == 32 and all(c in "0123456789abcdef" for c in batch_id)):
        raise ValueError(f"bad batch id {batch_id!r}")
    return Path(data_dir) / "certifications" / batch_id


def npz(arrays: dict[str, np.ndarray]) -> bytes:
    """An .npz archive (no pickles) of ``arrays``."""
    buf = io.BytesIO()
    np.savez(buf, allow_pickle=False, **{k: np.asanyarray(v) for k, v in arrays.items()})
    return buf.getvalue()


def read_npz(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def inputs_npz(x: np.ndarray, labels: np.ndarray | None, epsilon: np.ndarray | None) -> bytes:
    arrays = {"x": np.ascontiguousarray(x, dtype=np.float64)}
    if labels is not None:
        arrays["labels"] = np.asarray(labels, dtype=np.int64)
    if epsilon is not None:
        arrays["epsilon"] = np.asarray(epsilon, dtype=np.float64)
    return npz(arrays)


def certify_chunk(
    net: Any,
    inputs: dict[str, np.ndarray],
    opts: CertifyOptions,
    start: int,
    stop: int,
    optimizer: Any = None,
    *,
    certificates: bool = False,
) -> dict[str, np.ndarray]:
    """The columns of rows [start, stop) plus ``seconds`` (a 0-d array); with
    ``certificates``, each input's certificate too (for the API to re-check, see
    :mod:`service.jobs.certify_check`)."""
    eps: Any = opts.epsilon
    if "epsilon" in inputs:
        eps = inputs["epsilon"][start:stop]
    labels = inputs["labels"][start:stop] if "labels" in inputs else None
    options = LocalOptions(opts.method, eps, opts.time_budget_s)
    lip = verified_global_bound(opts.bound())
    t0 = time.perf_counter()
    res = run_local(net, inputs["x"][start:stop], labels, options, lip, optimizer)
    cols = {**local_columns(res, labels), "seconds": np.array(time.perf_counter() - t0)}
    if certificates:
        cols.update(certificate_arrays(res.certificates))
    return cols


def join_chunks(
    parts: list[dict[str, np.ndarray]], opts: CertifyOptions, wall_s: float
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(columns of the whole batch, the job's result document) from the chunks in order."""
    seconds = float(sum(float(p["seconds"]) for p in parts))
    names = [n for n in parts[0] if n not in ("seconds", "worker")]
    by_worker: dict[str, int] = {}
    for p in parts:
        if "worker" in p:
            by_worker[str(p["worker"])] = by_worker.get(str(p["worker"]), 0) + 1
    columns = {n: np.concatenate([p[n] for p in parts]) for n in names}
    summary = local_summary(
        columns,
        method=opts.method,
        lipschitz=opts.lipschitz,
        bound_job_id=opts.bound_job_id,
        seconds=seconds,
    )
    doc = {
        "kind": "certification",
        **summary,
        "inputs": len(columns["prediction"]),
        "chunks": len(parts),
        "wall_s": wall_s,
        "seconds_per_input": seconds / max(1, len(columns["prediction"])),
    }
    if by_worker:  # how many chunks each process (host:pid) certified
        doc["chunks_by_worker"] = by_worker
    return columns, doc


# -- local runner: the job's process and its pool ------------------------------------------------

_POOL_STATE: dict[str, Any] = {}

ModelSource = tuple[Any, ...]
"""As :data:`service.jobs.tasks.ModelSource` (``("storage", data_dir, model_id)`` here)."""


@dataclass(frozen=True)
class JobProcess:
    """What the job process gives its pool (from :mod:`service.jobs.tasks`, which imports this
    module when it runs a certification: passed in, not imported back): how to load the
    network, the thread variables to set, and how to die with the parent."""

    load: Callable[[ModelSource], Any]
    thread_env: tuple[str, ...]
    die_with_parent: Callable[[], None]


def _pool_init(
    source: ModelSource,
    inputs_path: str,
    opts: dict[str, Any],
    threads: int,
    device: str,
    proc: JobProcess,
) -> None:
    """A pool process: thread limits, die with the job process, load network and inputs once."""
    for name in proc.thread_env:
        os.environ[name] = str(threads)
    proc.die_with_parent()
    _POOL_STATE["net"] = proc.load(source)
    _POOL_STATE["inputs"] = read_npz(Path(inputs_path).read_bytes())
    _POOL_STATE["opts"] = CertifyOptions.from_dict(opts)
    _POOL_STATE["optimizer"] = device_optimizer(device)


def _pool_chunk(span: tuple[int, int]) -> tuple[int, dict[str, np.ndarray]]:
    start, stop = span
    s = _POOL_STATE
    cols = certify_chunk(s["net"], s["inputs"], s["opts"], start, stop, s["optimizer"])
    return start, _tagged(cols)


def _tagged(cols: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``cols`` with the process that certified them (``host:pid``, for ``chunks_by_worker``)."""
    return {**cols, "worker": np.array(f"{socket.gethostname()}:{os.getpid()}")}


def _chunk_results(
    source: ModelSource,
    inputs_path: Path,
    opts: CertifyOptions,
    threads: int,
    device: str,
    proc: JobProcess,
) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """(start row, columns) of every chunk as it finishes: in this process for one worker,
    else on a spawned pool of ``opts.workers`` processes."""
    spans = opts.chunks()
    if opts.workers <= 1 or len(spans) <= 1:
        net = proc.load(source)
        inputs = read_npz(inputs_path.read_bytes())
        optimizer = device_optimizer(device)
        for a, b in spans:
            yield a, _tagged(certify_chunk(net, inputs, opts, a, b, optimizer))
        return
    # The job process is a daemon (it dies with its runner), and multiprocessing refuses
    # children of daemons; the pool's processes die with it anyway (_pool_init sets
    # PR_SET_PDEATHSIG, and the pool is terminated when this generator ends).
    mp.current_process().daemon = False
    ctx = mp.get_context("spawn")
    init = (source, str(inputs_path), opts.to_dict(), threads, device, proc)
    with ctx.Pool(min(opts.workers, len(spans)), initializer=_pool_init, initargs=init) as pool:
        yield from pool.imap_unordered(_pool_chunk, spans)


def run_certification(
    source: ModelSource,
    spec: JobSpec,
    progress: Callable[[dict[str, Any]], None],
    threads: int,
    device: str,
    proc: JobProcess,
) -> dict[str, Any]:
    """Certify the job's batch (local runner), write ``result.npz``, return the summary."""
    if source[0] != "storage":
        raise ValueError("a local certification job reads its batch from the data dir")
    opts = options_of(spec)
    folder = batch_dir(source[1], opts.batch_id)
    start_time = time.perf_counter()
    spans = opts.chunks()
    progress(_progress_info(0, len(spans), 0, opts.rows))
    parts: dict[int, dict[str, np.ndarray]] = {}
    done_rows = 0
    chunks = _chunk_results(source, folder / "inputs.npz", opts, threads, device, proc)
    for start, cols in chunks:
        parts[start] = cols
        done_rows += len(cols["prediction"])
        progress(_progress_info(len(parts), len(spans), done_rows, opts.rows))
    columns, doc = join_chunks([parts[a] for a, _ in spans], opts, time.perf_counter() - start_time)
    write_result(folder, columns)
    return doc


def write_result(folder: Path, columns: dict[str, np.ndarray]) -> None:
    """``result.npz`` written atomically (a reader never sees half a file)."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".result-{uuid.uuid4().hex}.npz"
    tmp.write_bytes(npz(columns))
    tmp.replace(folder / "result.npz")


def _progress_info(chunks_done: int, chunks: int, rows_done: int, rows: int) -> dict[str, Any]:
    return {
        "phase": "certify",
        "chunks_done": chunks_done,
        "chunks": chunks,
        "inputs_done": rows_done,
        "inputs": rows,
        "fraction": rows_done / rows if rows else 1.0,
    }
