"""Content-addressed model store and bound results: SQLite (WAL) metadata + files under data_dir.

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
database). Bound results are JSON documents (``BoundResult.summary()`` plus
``job_id``/``certificate`` as the job runner chooses) indexed by model, method and value.
Only results with ``verified`` true are ever returned by :meth:`Storage.best_bound`.

One SQLite connection per thread (reused) keeps this safe to use from threads and processes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import sqlite3
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sdp.ir import InputLayout, Network

ID_LENGTH = 16

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
    importer_version INTEGER
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
    created: bool = True

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("created")
        return d


def sniff_format(data: bytes) -> str:
    """onnx | safetensors | mat, from the content (``sdp.importers.detect_format``)."""
    from sdp.importers import detect_format

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


def _clean_json(obj: Any) -> Any:
    """Replace non-finite floats by None so the stored JSON is strict."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean_json(v) for v in obj]
    return obj


class Storage:
    """Models and bound results under ``data_dir`` (see module docstring)."""

    def __init__(self, data_dir: str | os.PathLike[str], *, network_cache_size: int = 4) -> None:
        self.data_dir = Path(data_dir)
        self.models_dir = self.data_dir / "models"
        self.models_dir.mkdir(parents=True, exist_ok=True)
        self.db_path = self.data_dir / "lipcert.sqlite3"
        self._cache: OrderedDict[str, Network] = OrderedDict()
        self._cache_size = network_cache_size
        self._lock = threading.Lock()
        self._local = threading.local()
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)
        self._reimport_stale_models()

    def _reimport_stale_models(self) -> None:
        """Re-import every model recorded by another importer version (or by code from before
        the columns below): its input shape and layout and its ``network_hash`` are what the
        file imports to *now*. A bound whose network hash differs (e.g. from before an importer
        fix that changed what a file computes) is never used again; a file the importer now
        refuses gets no hash, so none of its bounds is used."""
        from sdp.importers import IMPORTER_VERSION, load_model

        with self._connect() as db:
            added = set()
            for table, column, kind in (
                ("models", "input_layout", "TEXT"),
                ("models", "network_hash", "TEXT"),
                ("models", "importer_version", "INTEGER"),
                ("bounds", "network_hash", "TEXT"),
            ):
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
            todo = db.execute(
                "SELECT id, sha256 FROM models WHERE importer_version IS NOT ?",
                (IMPORTER_VERSION,),
            ).fetchall()
        for row in todo:
            shape, layout, network_hash = None, "null", None
            try:
                net = load_model(self._path(row["sha256"]).read_bytes())
                shape, layout = json.dumps(list(net.file_input_shape)), _layout_json(net)
                network_hash = net.content_hash()
            except Exception:  # refused now (or the file is gone): it keeps its old shape
                pass
            with self._connect() as db:
                db.execute(
                    "UPDATE models SET input_shape = COALESCE(?, input_shape), input_layout = ?, "
                    "network_hash = ?, importer_version = ? WHERE id = ?",
                    (shape, layout, network_hash, IMPORTER_VERSION, row["id"]),
                )
            with self._lock:
                self._cache.pop(row["id"], None)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """This thread's connection (opened once, reused), inside a transaction."""
        db = getattr(self._local, "db", None)
        if db is None or self._local.pid != os.getpid():  # never reuse one across fork()
            db = sqlite3.connect(self.db_path, timeout=30.0)
            db.row_factory = sqlite3.Row
            self._local.db, self._local.pid = db, os.getpid()
        with db:
            yield db

    def _path(self, sha256: str) -> Path:
        return self.models_dir / f"{sha256}.bin"

    # -- models -----------------------------------------------------------------------------

    def save_model(
        self, data: bytes, filename: str = "", *, network: Network | None = None
    ) -> ModelRecord:
        """Store ``data`` (parsed as ``network``, or parsed here with the importers).

        Returns the existing record (``created=False``) when the same bytes were stored before.
        Raises the importers' ``ModelRejected`` for a file they refuse.
        """
        sha = hashlib.sha256(data).hexdigest()
        existing = self.get_model(sha[:ID_LENGTH])
        if existing is not None and existing.sha256 == sha:
            self._remember(existing.id, network)
            return _replace_created(existing, False)
        from sdp.importers import IMPORTER_VERSION, load_model

        if network is None:
            network = load_model(data)
        self._write_file(sha, data)
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
        with self._connect() as db:
            db.execute(
                "INSERT OR IGNORE INTO models VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
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
        self._remember(rec.id, network)
        return rec

    def _write_file(self, sha: str, data: bytes) -> None:
        path = self._path(sha)
        if path.exists():
            return
        fd, tmp = tempfile.mkstemp(dir=self.models_dir, prefix=".upload-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def get_model(self, model_id: str) -> ModelRecord | None:
        with self._connect() as db:
            row = db.execute("SELECT * FROM models WHERE id = ?", (model_id,)).fetchone()
        return None if row is None else _record(row)

    def list_models(self) -> list[ModelRecord]:
        with self._connect() as db:
            rows = db.execute("SELECT * FROM models ORDER BY created_at, id").fetchall()
        return [_record(r) for r in rows]

    def delete_model(self, model_id: str) -> bool:
        """Remove the model, its file and its bounds; False when it did not exist."""
        rec = self.get_model(model_id)
        if rec is None:
            return False
        with self._connect() as db:
            db.execute("DELETE FROM models WHERE id = ?", (model_id,))
            db.execute("DELETE FROM bounds WHERE model_id = ?", (model_id,))
        self._path(rec.sha256).unlink(missing_ok=True)
        with self._lock:
            self._cache.pop(model_id, None)
        return True

    def model_bytes(self, model_id: str) -> bytes:
        rec = self.get_model(model_id)
        if rec is None:
            raise KeyError(model_id)
        return self._path(rec.sha256).read_bytes()

    def load_network(self, model_id: str) -> Network:
        """The parsed network (LRU-cached). Raises KeyError for an unknown id."""
        with self._lock:
            net = self._cache.get(model_id)
            if net is not None:
                self._cache.move_to_end(model_id)
                return net
        from sdp.importers import load_model

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

    def save_bound(self, model_id: str, result: dict[str, Any]) -> bool:
        """Store one bound result (``BoundResult.summary()``-shaped dict, optional ``job_id``);
        False (nothing stored) when the model is gone, e.g. deleted while its job ran.

        The bound is recorded for the network it was computed on: ``result["network_hash"]``
        (or its certificate's), else the model's current one. Only bounds of the network the
        model imports to now are ever returned."""
        doc = _clean_json(dict(result))
        doc.setdefault("created_at", _now())
        value = doc.get("lipschitz_bound")
        if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
            raise ValueError(f"bound result has no finite lipschitz_bound: {value!r}")
        with self._connect() as db:  # one statement: atomic with delete_model
            cur = db.execute(
                "INSERT INTO bounds (model_id, job_id, method, value, verified, created_at,"
                " result, network_hash) SELECT ?,?,?,?,?,?,?, COALESCE(?, network_hash)"
                " FROM models WHERE id = ?",
                (
                    model_id,
                    doc.get("job_id"),
                    str(doc.get("method", "")),
                    float(value),
                    1 if doc.get("verified") is True else 0,
                    doc["created_at"],
                    json.dumps(doc),
                    _recorded_hash(doc),
                    model_id,
                ),
            )
        return cur.rowcount == 1

    def list_bounds(self, model_id: str) -> list[dict[str, Any]]:
        """All stored results of a model's current network, oldest first."""
        with self._connect() as db:
            rows = db.execute(
                f"SELECT result FROM bounds WHERE {_CURRENT} ORDER BY seq", (model_id,)
            ).fetchall()
        return [json.loads(r["result"]) for r in rows]

    def best_bound(self, model_id: str) -> dict[str, Any] | None:
        """The smallest verified bound of the model's current network, or None."""
        with self._connect() as db:
            row = db.execute(
                f"SELECT result FROM bounds WHERE {_CURRENT} AND verified = 1"
                " ORDER BY value, seq LIMIT 1",
                (model_id,),
            ).fetchone()
        return None if row is None else json.loads(row["result"])

    def bound_for_job(self, model_id: str, job_id: str) -> dict[str, Any] | None:
        """The result a given job stored for this model's current network, or None."""
        with self._connect() as db:
            row = db.execute(
                f"SELECT result FROM bounds WHERE {_CURRENT} AND job_id = ?"
                " ORDER BY seq DESC LIMIT 1",
                (model_id, job_id),
            ).fetchone()
        return None if row is None else json.loads(row["result"])


#: Bounds of model ``?`` computed on the network its file imports to now.
_CURRENT = (
    "model_id = ? AND network_hash = (SELECT network_hash FROM models WHERE id = bounds.model_id)"
)


def _recorded_hash(doc: dict[str, Any]) -> str | None:
    """The network a bound document says it was computed on (None: not recorded)."""
    cert = doc.get("certificate")
    cert_hash = cert.get("network_hash") if isinstance(cert, dict) else None
    return doc.get("network_hash") or cert_hash or None


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
        created=False,
        **_layout_fields(layout),
    )


def _replace_created(rec: ModelRecord, created: bool) -> ModelRecord:
    d = asdict(rec)
    d["created"] = created
    return ModelRecord(**d)


__all__ = ["ModelRecord", "Storage", "count_layers", "sniff_format"]
