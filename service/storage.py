r"""Content-addressed model store and bound results: SQLite (WAL) metadata + files under data_dir.

Layout::

    data_dir/lipcert.sqlite3          tables ``models`` and ``bounds``
    data_dir/models/<sha256>.bin      the uploaded bytes, exactly as received

A model's ``id`` is the first 16 hex digits of the sha256 of its bytes, so uploading the
same file twice gives the same id (:meth:`Storage.save_model` returns the existing record
with ``created=False``). ``input_shape`` is the shape of one input *as the file takes it*
(what clients send); for an ONNX file whose raw input goes straight into a Transpose the
network's IR input is that permuted (``ir_input_shape``, ``input_permutation``: the
:class:`sdp.ir.InputLayout`, stored as JSON in ``models.input_layout``; SQL NULL only on rows
written before that column existed, which :class:`Storage` fills in when it opens the
database). Bound results are :class:`service.documents.StoredBound`\ s, kept as their JSON documents
(``StoredBound.to_json``) indexed by model, method and value.
Only results with ``verified`` true are ever returned by :meth:`Storage.best_bound`.

Models recorded by another importer version are re-imported by
:meth:`Storage.reimport_stale_models` (the app runs it at start-up through its upload
checker); a file that no longer imports is marked ``unimportable`` with the reason.

Faults: a full disk raises :class:`~service.diskspace.StorageFull` (nothing half-written: a
model file is written to a temp name, fsynced and renamed, and removed again when its record
cannot be inserted); deleting still works on a full disk (a reserve file is given up for
it); a store opened on a full disk opens its tables at the first use once space is freed.

One SQLite connection per thread (reused) keeps this safe to use from threads and processes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import sqlite3
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

from sdp.errors import LipcertError
from sdp.importers import IMPORTER_VERSION, detect_format, load_model
from sdp.ir import InputLayout, Network
from service.diskspace import Reserve, StorageFull, free_bytes, full_detail, is_disk_full
from service.documents import StoredBound

log = logging.getLogger("lipcert.storage")

ID_LENGTH = 16
WAL_SIZE_LIMIT = 1 << 20
"""Bytes the WAL file is truncated to after a checkpoint (``PRAGMA journal_size_limit``)."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS models (
    id TEXT PRIMARY KEY,
    sha256 TEXT NOT NULL UNIQUE,
    filename TEXT NOT NULL,
    format TEXT NOT NULL,
    kind TEXT NOT NULL,
    input_shape TEXT NOT NULL,
    output_shape TEXT NOT NULL,
    layers INTEGER NOT NULL,
    parameters INTEGER NOT NULL,
    size_bytes INTEGER NOT NULL,
    created_at TEXT NOT NULL,
    input_layout TEXT,
    network_hash TEXT,
    importer_version INTEGER,
    problem TEXT
);
CREATE TABLE IF NOT EXISTS bounds (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    model_id TEXT NOT NULL,
    job_id TEXT,
    method TEXT NOT NULL,
    value REAL NOT NULL,
    verified INTEGER NOT NULL,
    created_at TEXT NOT NULL,
    result TEXT NOT NULL,
    network_hash TEXT
);
CREATE INDEX IF NOT EXISTS bounds_by_model ON bounds (model_id, verified, value);
CREATE INDEX IF NOT EXISTS bounds_by_job ON bounds (job_id);
"""

#: (table, column, type) added after the first release; :class:`Storage` adds them on open.
_ADDED_COLUMNS = (
    ("models", "input_layout", "TEXT"),
    ("models", "network_hash", "TEXT"),
    ("models", "importer_version", "INTEGER"),
    ("models", "problem", "TEXT"),
    ("bounds", "network_hash", "TEXT"),
)


class ModelNotFound(KeyError):
    """No stored model (or no stored file) with this id (code ``model-not-found``)."""


class ModelIdCollision(Exception):
    """Different bytes whose sha256 shares its first 16 hex digits (the id) with a stored
    model: refused (HTTP 409 ``model-id-collision``) instead of answering with the other
    model's record."""

    code = "model-id-collision"


#: What :meth:`Storage.save_job_bound` did: stored (and the job ended succeeded), nothing
#: because the job had already ended or is owned by another runner, or because the model
#: was deleted.
JobBoundOutcome = Literal["stored", "job-ended", "model-deleted"]


@dataclass(frozen=True)
class JobGuard:
    """A condition on another SQLite file (the job store), applied in the same transaction
    as a bound insert: ``sql`` (an UPDATE on schema ``guard``) must change exactly one row,
    else nothing is written."""

    db_path: Path
    sql: str
    params: tuple[Any, ...]


@dataclass(frozen=True)
class ModelRecord:
    """Metadata of one stored model (the JSON body of ``GET /v1/models/{id}``)."""

    id: str
    sha256: str
    filename: str
    format: str
    kind: str
    input_shape: list[int]
    output_shape: list[int]
    layers: int
    parameters: int
    size_bytes: int
    created_at: str
    #: the IR's input shape and the axis permutation of ``input_shape`` giving it, for a model
    #: whose file input is transposed on entry (:class:`sdp.ir.InputLayout`); else None
    ir_input_shape: list[int] | None = None
    input_permutation: list[int] | None = None
    #: ``ok``, or ``unimportable`` when the file no longer imports under the current
    #: importer (``problem`` says why, ``{code, detail}``); its bounds are not used
    status: str = "ok"
    problem: dict[str, str] | None = None
    created: bool = True

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("created")
        return d


def sniff_format(data: bytes) -> str:
    """onnx | safetensors | mat, from the content (``sdp.importers.detect_format``)."""
    return detect_format(data)


def count_layers(net: Network) -> int:
    """Number of affine (Dense/Conv2d) layers, counting inside residual blocks."""
    from sdp.ir import Conv2d, Dense, Residual

    def walk(ops: tuple[Any, ...]) -> int:
        n = 0
        for op in ops:
            if isinstance(op, Dense | Conv2d):
                n += 1
            elif isinstance(op, Residual):
                n += walk(op.body) + walk(op.shortcut)
        return n

    return walk(net.ops)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class Storage:
    """Models and bound results under ``data_dir`` (see module docstring)."""

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        *,
        network_cache_size: int = 4,
        min_free_bytes: int = 0,
        reserve_bytes: int = 0,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.models_dir = self.data_dir / "models"
        self.models_dir.mkdir(parents=True, exist_ok=True)
        self.db_path = self.data_dir / "lipcert.sqlite3"
        self.min_free_bytes = max(0, int(min_free_bytes))
        self.reserve = Reserve(self.data_dir, reserve_bytes)
        self._cache: OrderedDict[str, Network] = OrderedDict()
        self._cache_size = network_cache_size
        self._lock = threading.Lock()
        self._local = threading.local()
        self._opened = False
        if free_bytes(self.data_dir) < self.reserve.size + self.min_free_bytes:
            self.reserve.release()  # a nearly full disk: opening creates the WAL files
        try:
            self._open()
        except StorageFull:  # start anyway: not ready, every write answers storage-full
            log.warning("data dir %s is full; storage opens when space is freed", self.data_dir)
        else:
            self.reserve.restore(self.min_free_bytes)

    def _open(self) -> None:
        """Create or upgrade the tables (once; retried by the next use after a full disk)."""
        with self._lock:
            if self._opened:
                return
            try:
                with self._transaction() as db:
                    db.execute("PRAGMA journal_mode=WAL")
                    db.executescript(_SCHEMA)
                self._add_columns()
            except StorageFull:
                self.reserve.release()  # the reserve is for exactly this: retry once
                with self._transaction() as db:
                    db.execute("PRAGMA journal_mode=WAL")
                    db.executescript(_SCHEMA)
                self._add_columns()
            self._opened = True
        self.sweep_orphan_files()

    def _add_columns(self) -> None:
        """Columns added since the first release (``ALTER TABLE``; idempotent)."""
        with self._transaction() as db:
            added = set()
            for table, column, kind in _ADDED_COLUMNS:
                cols = {r["name"] for r in db.execute(f"PRAGMA table_info({table})")}
                if column not in cols:
                    with contextlib.suppress(sqlite3.OperationalError):  # another process
                        db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
                        added.add((table, column))
            if ("bounds", "network_hash") in added:
                # bounds stored before the column: the network their certificate names, if any
                db.execute(
                    "UPDATE bounds SET network_hash = COALESCE("
                    "NULLIF(json_extract(result, '$.network_hash'), ''), "
                    "NULLIF(json_extract(result, '$.certificate.network_hash'), '')) "
                    "WHERE network_hash IS NULL"
                )

    def stale_models(self) -> list[str]:
        """Ids of the models recorded by another importer version (or before versions)."""
        with self._connect() as db:
            rows = db.execute(
                "SELECT id FROM models WHERE importer_version IS NOT ?", (IMPORTER_VERSION,)
            ).fetchall()
        return [str(r["id"]) for r in rows]

    def reimport_stale_models(self, parse: Callable[[bytes], Network]) -> dict[str, str]:
        """Re-import every model recorded by another importer version with ``parse`` (the
        app passes its upload checker's ``parse``: the same time and memory limits as an
        upload). Its input shape and layout and its ``network_hash`` become what the file
        imports to *now*; a bound whose network hash differs (e.g. from before an importer
        fix that changed what a file computes) is never used again.

        A file the importer now refuses (or that is gone or unreadable) is kept but marked:
        ``status`` ``unimportable`` with the refusal's ``{code, detail}`` in ``problem``, and
        no network hash, so none of its bounds is used.
        Returns ``{model id: "ok" | problem code}``."""
        outcome: dict[str, str] = {}
        for model_id in self.stale_models():
            rec = self.get_model(model_id)
            if rec is None:
                continue
            shape, layout, network_hash, problem = None, "null", None, None
            try:
                net = parse(self._path(rec.sha256).read_bytes())
                shape, layout = json.dumps(list(net.file_input_shape)), _layout_json(net)
                network_hash = net.content_hash()
            except FileNotFoundError:
                problem = {"code": "model-file-missing", "detail": "the stored file is gone"}
            except LipcertError as exc:
                problem = {"code": exc.code, "detail": exc.detail}
            except OSError as exc:  # unreadable (permissions, I/O error): marked, start goes on
                problem = {
                    "code": "model-file-unreadable",
                    "detail": f"{type(exc).__name__}: {exc}",
                }
            with self._connect() as db:
                db.execute(
                    "UPDATE models SET input_shape = COALESCE(?, input_shape), input_layout = ?,"
                    " network_hash = ?, importer_version = ?, problem = ? WHERE id = ?",
                    (
                        shape,
                        layout,
                        network_hash,
                        IMPORTER_VERSION,
                        None if problem is None else json.dumps(problem),
                        model_id,
                    ),
                )
            with self._lock:
                self._cache.pop(model_id, None)
            outcome[model_id] = "ok" if problem is None else problem["code"]
            if problem is not None:
                log.warning("model %s no longer imports: %s", model_id, problem["detail"])
        return outcome

    def sweep_orphan_files(self, min_age_s: float = 600.0) -> list[str]:
        """Delete upload temp files and model files no record refers to, older than
        ``min_age_s`` (younger ones may belong to an upload in progress); their names."""
        with self._connect() as db:
            known = {str(r["sha256"]) for r in db.execute("SELECT sha256 FROM models")}
        removed = []
        cutoff = time.time() - min_age_s
        for path in self.models_dir.iterdir():
            stray = path.name.startswith(".upload-") or (
                path.suffix == ".bin" and path.stem not in known
            )
            with contextlib.suppress(OSError):
                if stray and path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed.append(path.name)
        return removed

    # -- free space -------------------------------------------------------------------------

    def free_bytes(self) -> int:
        return free_bytes(self.data_dir)

    def space_problem(self) -> str | None:
        """Why the store cannot take writes now (None: it can): free space below
        ``min_free_bytes``, tables not yet created because the disk was full, or the
        reserve file given up (it is rebuilt here as soon as there is room for it)."""
        try:
            free = self.free_bytes()
        except OSError as exc:
            return f"the data dir is not usable: {exc}"
        if free < self.min_free_bytes:
            return (
                f"the data dir is full: {free / 2**20:.1f} MiB free, below the "
                f"{self.min_free_bytes / 2**20:.1f} MiB floor (LIPCERT_MIN_FREE_MB)"
            )
        if not self._opened:
            try:
                self._open()
            except StorageFull:
                return full_detail(self.data_dir)
        if not self.reserve.restore(self.min_free_bytes):
            return (
                f"the data dir is nearly full: {free / 2**20:.1f} MiB free, not enough to "
                f"rebuild the {self.reserve.size / 2**20:.1f} MiB reserve for deletions "
                "(LIPCERT_RESERVE_MB) above the floor"
            )
        return None

    def _require_space(self, nbytes: int) -> None:
        """Raise :class:`StorageFull` unless ``nbytes`` fit above ``min_free_bytes``."""
        free = self.free_bytes()
        if free - nbytes < self.min_free_bytes:
            raise StorageFull(
                f"no room for {nbytes / 2**20:.2f} MiB: {free / 2**20:.1f} MiB free and "
                f"{self.min_free_bytes / 2**20:.1f} MiB are kept free (LIPCERT_MIN_FREE_MB); "
                "delete models or add space"
            )

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """This thread's connection, inside a transaction; a full disk raises StorageFull."""
        if not self._opened:
            self._open()
        with self._transaction() as db:
            yield db

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        db = self._thread_db()
        try:
            with db:
                yield db
        except (sqlite3.Error, OSError) as exc:
            if is_disk_full(exc, self.data_dir, self.min_free_bytes):
                raise StorageFull(full_detail(self.data_dir)) from exc
            raise

    def _thread_db(self) -> sqlite3.Connection:
        """This thread's connection (opened once, reused; never across fork())."""
        db = getattr(self._local, "db", None)
        if db is None or self._local.pid != os.getpid():
            db = sqlite3.connect(self.db_path, timeout=30.0)
            db.row_factory = sqlite3.Row
            # after a checkpoint the WAL shrinks back to this (it would keep its largest size)
            db.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}")
            self._local.db, self._local.pid = db, os.getpid()
        return db

    def _path(self, sha256: str) -> Path:
        return self.models_dir / f"{sha256}.bin"

    # -- models -----------------------------------------------------------------------------

    def save_model(
        self, data: bytes, filename: str = "", *, network: Network | None = None
    ) -> ModelRecord:
        """Store ``data`` (parsed as ``network``, or parsed here with the importers).

        Returns the existing record (``created=False``) when the same bytes were stored before.
        Raises the importers' ``ModelRejected`` for a file they refuse,
        :class:`ModelIdCollision` for other bytes with a stored model's id, and
        :class:`~service.diskspace.StorageFull` when the data dir has no room (then nothing
        is left behind: no record, no file).
        """
        sha = hashlib.sha256(data).hexdigest()
        existing = self._existing(sha)
        if existing is not None:
            self._remember(existing.id, network)
            return existing
        if network is None:
            network = load_model(data)
        self._require_space(len(data))
        wrote = self._write_file(sha, data)
        rec = ModelRecord(
            id=sha[:ID_LENGTH],
            sha256=sha,
            filename=filename[:255],
            format=sniff_format(data),
            kind=network.kind,
            input_shape=list(network.file_input_shape),
            output_shape=[network.output_size],
            layers=count_layers(network),
            parameters=network.num_parameters,
            size_bytes=len(data),
            created_at=_now(),
            **_layout_fields(network.input_layout),
        )
        try:
            with self._connect() as db:
                db.execute(
                    "INSERT INTO models (id, sha256, filename, format, kind, input_shape,"
                    " output_shape, layers, parameters, size_bytes, created_at, input_layout,"
                    " network_hash, importer_version) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (
                        rec.id,
                        rec.sha256,
                        rec.filename,
                        rec.format,
                        rec.kind,
                        json.dumps(rec.input_shape),
                        json.dumps(rec.output_shape),
                        rec.layers,
                        rec.parameters,
                        rec.size_bytes,
                        rec.created_at,
                        _layout_json(network),
                        network.content_hash(),
                        IMPORTER_VERSION,
                    ),
                )
        except sqlite3.IntegrityError:  # the same id was inserted meanwhile
            existing = self._existing(sha)
            if existing is None:
                raise
            self._remember(existing.id, network)
            return existing
        except BaseException:
            if wrote:
                self._drop_unreferenced(sha)
            raise
        self._remember(rec.id, network)
        return rec

    def _drop_unreferenced(self, sha: str) -> None:
        """Remove the file of ``sha`` unless a record refers to it (no orphan file); when
        that cannot be read now, the file is left to :meth:`sweep_orphan_files`."""
        try:
            referenced = self._existing(sha, strict=False) is not None
        except Exception:
            return
        if not referenced:
            self._path(sha).unlink(missing_ok=True)

    def _existing(self, sha: str, *, strict: bool = True) -> ModelRecord | None:
        """The stored record of these bytes (``created=False``), None when there is none.
        Raises :class:`ModelIdCollision` when another file holds their id (``strict``)."""
        rec = self.get_model(sha[:ID_LENGTH])
        if rec is None:
            return None
        if rec.sha256 != sha:
            if not strict:
                return None
            raise ModelIdCollision(
                f"model id {rec.id} already belongs to a different file (sha256 "
                f"{rec.sha256}); this one's sha256 is {sha}"
            )
        return _replace_created(rec, False)

    def _write_file(self, sha: str, data: bytes) -> bool:
        """Write the model file durably (temp name, fsync, rename, fsync of the directory);
        False when it already existed. A failed write leaves nothing behind."""
        path = self._path(sha)
        if path.exists():
            return False
        fd, tmp = tempfile.mkstemp(dir=self.models_dir, prefix=".upload-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            _fsync_dir(self.models_dir)
        except BaseException as exc:
            Path(tmp).unlink(missing_ok=True)
            if isinstance(exc, OSError) and is_disk_full(exc, self.data_dir):
                raise StorageFull(full_detail(self.data_dir)) from exc
            raise
        return True

    def get_model(self, model_id: str) -> ModelRecord | None:
        with self._connect() as db:
            row = db.execute("SELECT * FROM models WHERE id = ?", (model_id,)).fetchone()
        return None if row is None else _record(row)

    def list_models(self) -> list[ModelRecord]:
        with self._connect() as db:
            rows = db.execute("SELECT * FROM models ORDER BY created_at, id").fetchall()
        return [_record(r) for r in rows]

    def delete_model(self, model_id: str) -> bool:
        """Remove the model, its file and its bounds; False when it did not exist.

        Works on a full disk: when SQLite has no room for the deletion, the reserve file is
        given up for it (and rebuilt later, once there is space)."""
        rec = self.get_model(model_id)
        if rec is None:
            return False
        try:
            self._delete_rows(model_id)
        except StorageFull:
            if not self.reserve.release():
                raise
            log.warning("disk full: released the reserve to delete model %s", model_id)
            self._delete_rows(model_id)
        self._path(rec.sha256).unlink(missing_ok=True)
        with self._lock:
            self._cache.pop(model_id, None)
        with contextlib.suppress(StorageFull, sqlite3.Error), self._connect() as db:
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # WAL pages back to the filesystem
        self.reserve.restore(self.min_free_bytes)
        return True

    def _delete_rows(self, model_id: str) -> None:
        with self._connect() as db:
            db.execute("DELETE FROM models WHERE id = ?", (model_id,))
            db.execute("DELETE FROM bounds WHERE model_id = ?", (model_id,))

    def model_bytes(self, model_id: str) -> bytes:
        """The stored file. Raises :class:`ModelNotFound` for an unknown id or a lost file."""
        rec = self.get_model(model_id)
        if rec is None:
            raise ModelNotFound(model_id)
        try:
            return self._path(rec.sha256).read_bytes()
        except FileNotFoundError as exc:
            raise ModelNotFound(model_id) from exc

    def load_network(self, model_id: str) -> Network:
        """The parsed network (LRU-cached). Raises :class:`ModelNotFound` for an unknown id."""
        with self._lock:
            net = self._cache.get(model_id)
            if net is not None:
                self._cache.move_to_end(model_id)
                return net
        net = load_model(self.model_bytes(model_id))
        self._remember(model_id, net)
        return net

    def _remember(self, model_id: str, net: Network | None) -> None:
        if net is None:
            return
        with self._lock:
            self._cache[model_id] = net
            self._cache.move_to_end(model_id)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)

    # -- bounds -----------------------------------------------------------------------------

    def save_bound(self, model_id: str, bound: StoredBound) -> bool:
        """Store one bound; False (nothing stored) when the model is gone, e.g. deleted while
        its job ran. Raises ValueError for a bound without a finite ``lipschitz_bound``.

        The bound is recorded for the network it was computed on (its ``network_hash``, or
        its certificate's), else the model's current one. Only bounds of the network the
        model imports to now are ever returned."""
        doc = _bound_doc(bound)
        with self._connect() as db:  # one statement: atomic with delete_model
            cur = db.execute(_INSERT_BOUND, _bound_params(model_id, doc))
        return cur.rowcount == 1

    def save_job_bound(self, model_id: str, bound: StoredBound, guard: JobGuard) -> JobBoundOutcome:
        """:meth:`save_bound` and the job's terminal transition in one transaction: the job
        store (``guard.db_path``) is attached and ``guard.sql`` must change exactly one row
        (the job is still running and still this runner's); otherwise nothing is stored, so
        a job that ended failed or cancelled never leaves a bound behind."""
        doc = _bound_doc(bound)
        if not self._opened:
            self._open()
        db = self._thread_db()
        db.execute("ATTACH DATABASE ? AS guard", (str(guard.db_path),))
        try:
            with self._transaction():
                db.execute("BEGIN IMMEDIATE")
                if db.execute(guard.sql, guard.params).rowcount != 1:
                    db.rollback()
                    return "job-ended"
                if db.execute(_INSERT_BOUND, _bound_params(model_id, doc)).rowcount != 1:
                    db.rollback()
                    return "model-deleted"
            return "stored"
        finally:
            db.execute("DETACH DATABASE guard")

    def list_bounds(self, model_id: str) -> list[StoredBound]:
        """All stored results of a model's current network, oldest first."""
        with self._connect() as db:
            rows = db.execute(
                f"SELECT result FROM bounds WHERE {_CURRENT} ORDER BY seq", (model_id,)
            ).fetchall()
        return [_stored(r["result"]) for r in rows]

    def best_bound(self, model_id: str) -> StoredBound | None:
        """The smallest verified bound of the model's current network, or None."""
        with self._connect() as db:
            row = db.execute(
                f"SELECT result FROM bounds WHERE {_CURRENT} AND verified = 1"
                " ORDER BY value, seq LIMIT 1",
                (model_id,),
            ).fetchone()
        return None if row is None else _stored(row["result"])

    def bound_for_job(self, model_id: str, job_id: str) -> StoredBound | None:
        """The result a given job stored for this model's current network, or None."""
        with self._connect() as db:
            row = db.execute(
                f"SELECT result FROM bounds WHERE {_CURRENT} AND job_id = ?"
                " ORDER BY seq DESC LIMIT 1",
                (model_id, job_id),
            ).fetchone()
        return None if row is None else _stored(row["result"])


_INSERT_BOUND = (
    "INSERT INTO main.bounds (model_id, job_id, method, value, verified, created_at, result,"
    " network_hash) SELECT ?,?,?,?,?,?,?, COALESCE(?, network_hash) FROM main.models"
    " WHERE id = ?"
)


def _bound_doc(bound: StoredBound) -> StoredBound:
    """``bound`` with its storage time; ValueError without a finite bound."""
    value = bound.lipschitz_bound
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"bound result has no finite lipschitz_bound: {value!r}")
    return bound if bound.created_at is not None else replace(bound, created_at=_now())


def _bound_params(model_id: str, bound: StoredBound) -> tuple[object, ...]:
    return (
        model_id,
        bound.job_id,
        bound.method,
        bound.lipschitz_bound,
        1 if bound.verified else 0,
        bound.created_at,
        json.dumps(bound.to_json()),
        bound.recorded_hash,
        model_id,
    )


def _stored(text: str) -> StoredBound:
    """A ``bounds.result`` row as the bound it describes."""
    return StoredBound.from_json(json.loads(text), clean=False)  # written strict


def _fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (no-op where directories cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


#: Bounds of model ``?`` computed on the network its file imports to now.
_CURRENT = (
    "model_id = ? AND network_hash = (SELECT network_hash FROM models WHERE id = bounds.model_id)"
)


def _layout_json(net: Network) -> str:
    """``models.input_layout``: JSON null, or {"shape": file shape, "perm": axes}."""
    lay = net.input_layout
    return json.dumps(None if lay is None else {"shape": list(lay.shape), "perm": list(lay.perm)})


def _layout_fields(layout: InputLayout | None) -> dict[str, Any]:
    if layout is None:
        return {}
    return {"ir_input_shape": list(layout.ir_shape), "input_permutation": list(layout.perm)}


def _record(row: sqlite3.Row) -> ModelRecord:
    stored = row["input_layout"]
    lay = json.loads(stored) if stored else None
    layout = None if lay is None else InputLayout(lay["shape"], lay["perm"])
    problem = json.loads(row["problem"]) if row["problem"] else None
    return ModelRecord(
        id=row["id"],
        sha256=row["sha256"],
        filename=row["filename"],
        format=row["format"],
        kind=row["kind"],
        input_shape=json.loads(row["input_shape"]),
        output_shape=json.loads(row["output_shape"]),
        layers=row["layers"],
        parameters=row["parameters"],
        size_bytes=row["size_bytes"],
        created_at=row["created_at"],
        status="ok" if problem is None else "unimportable",
        problem=problem,
        created=False,
        **_layout_fields(layout),
    )


def _replace_created(rec: ModelRecord, created: bool) -> ModelRecord:
    d = asdict(rec)
    d["created"] = created
    return ModelRecord(**d)


__all__ = [
    "JobGuard",
    "ModelIdCollision",
    "ModelNotFound",
    "ModelRecord",
    "Storage",
    "StorageFull",
    "count_layers",
    "sniff_format",
]
