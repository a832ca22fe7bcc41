"""The typed documents that cross the service's layers (design.md §1.5, §1.6).

* :class:`StoredBound`: one bound of one network, as the service stores, serves and re-checks
  it. Built in one place (:meth:`StoredBound.from_result`, from sdp's ``BoundResult``) or read
  back from its JSON form (:meth:`StoredBound.from_json`: a stored row, a job's answer, a Redis
  worker's answer); :meth:`StoredBound.to_json` gives the JSON document stored in
  ``bounds.result`` and answered over HTTP, always with the same keys in the same order;
* :class:`JobError`: why a job failed or was cancelled, ``{code, detail}`` in JSON;
* :func:`strict_json`: the one cleaner that turns numbers from numpy and non-finite floats
  into plain, strict JSON values (JSON has no inf or nan: they become null).

The stored document of a bound is ``BoundResult.summary()`` with ``certificate`` replaced by
the full certificate (``Certificate.to_json()``: rho and the multipliers T), so it can be
re-proven later without a solver, plus ``pairwise_certificates`` (pairwise bounds), the
``network_hash`` of the network that was bounded (a bound is served only while its model
imports to that network), the ``request`` (a job's spec), and where it came from (``job_id``,
``model_id``, ``source``, ``created_at``). Keys this version does not know (a newer worker's)
are kept in ``extra`` and written back unchanged.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, TypeAlias, cast

import numpy as np

if TYPE_CHECKING:
    from sdp.bounds.result import BoundResult

JsonValue: TypeAlias = "bool | int | float | str | list[JsonValue] | dict[str, JsonValue] | None"
JsonObject: TypeAlias = "dict[str, JsonValue]"


def strict_json(obj: object) -> JsonValue:
    """``obj`` as plain JSON values: numpy scalars and arrays as numbers and lists, tuples as
    lists, non-finite floats as None, mapping keys as strings, anything else as its string."""
    if obj is None or isinstance(obj, bool | str):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): strict_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [strict_json(v) for v in obj]
    if isinstance(obj, np.ndarray | np.generic):  # numpy scalars and arrays
        return strict_json(obj.tolist())
    try:
        x = float(obj)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return str(obj)
    return x if math.isfinite(x) else None


def strict_json_object(obj: Mapping[str, object]) -> JsonObject:
    """:func:`strict_json` of a mapping, typed as the JSON object it gives."""
    return {str(k): strict_json(v) for k, v in obj.items()}


def _object(value: JsonValue) -> JsonObject | None:
    return value if isinstance(value, dict) else None


def _text(value: JsonValue) -> str | None:
    return None if value is None else str(value)


def _number(value: JsonValue) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


@dataclass(frozen=True)
class JobError:
    """Why a job failed or was cancelled: a stable ``code`` (``timeout``,
    ``server-restarted``, ``worker-lost``, ``cancelled``, an :mod:`sdp.errors` code, ...) and
    a human ``detail``. JSON: ``{"code": ..., "detail": ...}``."""

    code: str
    detail: str

    def to_json(self) -> dict[str, str]:
        return {"code": self.code, "detail": self.detail}

    @classmethod
    def from_json(cls, doc: Mapping[str, object] | None) -> JobError | None:
        """The error of a stored job (None for none); a malformed one keeps what it says."""
        if doc is None:
            return None
        return cls(str(doc.get("code") or "internal-error"), str(doc.get("detail") or ""))

    def with_detail(self, detail: str) -> JobError:
        return replace(self, detail=detail)


#: The error of a job whose model was deleted before its bound could be stored.
MODEL_DELETED = JobError(
    "model-deleted", "the model was deleted while the job ran; its bound was not stored"
)
#: The error of a job cancelled through ``DELETE /v1/jobs/{id}``.
CANCELLED = JobError("cancelled", "cancelled by request")
#: The error of a job whose bound found no room in the data dir.
STORAGE_FULL = JobError("storage-full", "the data dir is full: the bound was not stored")


#: Keys written after the summary, in this order, only when they say something (not None;
#: ``job_id`` always: null for a bound stored outside any job).
_OPTIONAL_KEYS = (
    "network_hash",
    "pairwise_certificates",
    "request",
    "job_id",
    "model_id",
    "source",
    "created_at",
)


@dataclass(frozen=True)
class StoredBound:
    """One bound of one network as the service keeps it (see the module docstring).

    ``verified`` is the bound method's word; a document from elsewhere is re-proven by
    :func:`service.jobs.adopt.adopt_bound` before it is stored. ``certificate`` is the full
    certificate JSON (``lipcert-certificate/1``) when there is one (the summary
    ``{rho, layers}`` in documents that were never stored), ``pairwise`` the K x K matrix of
    bounds on Lip(f_y - f_j) (null entries: no bound), ``lipschitz_bound`` NaN in a document
    that carried none (refused by storage and by the re-check)."""

    lipschitz_bound: float
    method: str = ""
    requested_method: str = ""
    verified: bool = False
    solve_time_s: float = 0.0
    timings: JsonObject = field(default_factory=dict)
    lower_bound: float | None = None
    gap_ratio: float | None = None
    notes: tuple[str, ...] = ()
    solver: str | None = None
    pairwise: list[JsonValue] | None = None
    certificate: JsonObject | None = None
    network_hash: str | None = None
    pairwise_certificates: list[JsonValue] | None = None
    request: JsonObject | None = None
    job_id: str | None = None
    model_id: str | None = None
    source: str | None = None
    created_at: str | None = None
    extra: JsonObject = field(default_factory=dict)

    # -- the one place a bound document is built -------------------------------------------

    @classmethod
    def from_result(
        cls,
        result: BoundResult,
        network_hash: str,
        request: Mapping[str, object] | None = None,
        *,
        source: str | None = None,
    ) -> StoredBound:
        """The document of a bound computed here: ``result.summary()`` + the full
        certificate(s) + the content hash of the network that was bounded + the request
        that asked for it (a job's spec; None for the closed form checked at upload)."""
        doc: dict[str, object] = dict(result.summary())
        doc["network_hash"] = network_hash
        if result.certificate is not None:
            doc["certificate"] = json.loads(result.certificate.to_json())
        if result.pairwise_certificates:
            doc["pairwise_certificates"] = [
                json.loads(c.to_json()) for c in result.pairwise_certificates
            ]
        if request is not None:
            doc["request"] = dict(request)
        if source is not None:
            doc["source"] = source
        return cls.from_json(doc)

    @classmethod
    def from_json(cls, doc: Mapping[str, object], *, clean: bool = True) -> StoredBound:
        """The bound a JSON document describes, cleaned by :func:`strict_json` first unless
        ``clean`` is False (a document this module wrote, e.g. a stored row: already strict,
        and its certificate can hold many numbers).
        Lenient: a missing or malformed entry reads as absent; the re-check
        (:func:`sdp.bounds.recheck.recheck_document`) and storage refuse a document without a
        verified finite bound."""
        d: JsonObject = strict_json_object(doc) if clean else cast("JsonObject", dict(doc))
        known = {f.name for f in fields(cls)} - {"extra"}
        value = _number(d.get("lipschitz_bound"))
        method = str(d.get("method") or "")
        notes = d.get("notes")
        pairwise = d.get("pairwise")
        pair_certs = d.get("pairwise_certificates")
        return cls(
            lipschitz_bound=math.nan if value is None else value,
            method=method,
            requested_method=str(d.get("requested_method") or method),
            verified=d.get("verified") is True,
            solve_time_s=_number(d.get("solve_time_s")) or 0.0,
            timings=_object(d.get("timings")) or {},
            lower_bound=_number(d.get("lower_bound")),
            gap_ratio=_number(d.get("gap_ratio")),
            notes=tuple(str(n) for n in notes) if isinstance(notes, list) else (),
            solver=_text(d.get("solver")),
            pairwise=pairwise if isinstance(pairwise, list) else None,
            certificate=_object(d.get("certificate")),
            network_hash=_text(d.get("network_hash")),
            pairwise_certificates=pair_certs if isinstance(pair_certs, list) else None,
            request=_object(d.get("request")),
            job_id=_text(d.get("job_id")),
            model_id=_text(d.get("model_id")),
            source=_text(d.get("source")),
            created_at=_text(d.get("created_at")),
            extra={k: v for k, v in d.items() if k not in known},
        )

    def to_json(self) -> JsonObject:
        """The strict-JSON document (stored in ``bounds.result``, answered over HTTP)."""
        doc: JsonObject = {
            "lipschitz_bound": self.lipschitz_bound
            if math.isfinite(self.lipschitz_bound)
            else None,
            "method": self.method,
            "requested_method": self.requested_method or self.method,
            "verified": self.verified,
            "solve_time_s": self.solve_time_s,
            "timings": dict(self.timings),
            "lower_bound": self.lower_bound,
            "gap_ratio": self.gap_ratio,
            "notes": list(self.notes),
            "solver": self.solver,
            "pairwise": self.pairwise,
            "certificate": self.certificate,
        }
        for key in _OPTIONAL_KEYS:
            value = getattr(self, key)
            if value is not None or key == "job_id":  # null: stored outside any job (upload)
                doc[key] = value
        doc.update(self.extra)
        return strict_json_object(doc)

    # -- what the service asks of a bound ---------------------------------------------------

    @property
    def recorded_hash(self) -> str | None:
        """The network this bound says it was computed on (None: not recorded)."""
        cert_hash = None if self.certificate is None else self.certificate.get("network_hash")
        return self.network_hash or (cert_hash if isinstance(cert_hash, str) else None) or None

    @property
    def usable_lipschitz(self) -> float | None:
        """L when this is a verified, finite, positive bound (radii can use it), else None."""
        value = self.lipschitz_bound
        if self.verified and math.isfinite(value) and value > 0:
            return value
        return None

    def pairwise_matrix(self, classes: int) -> np.ndarray | None:
        """The (classes, classes) float64 matrix of pairwise bounds (null entries NaN:
        they certify nothing), or None without one or when it is malformed (the scalar bound
        still holds)."""
        if self.pairwise is None:
            return None
        rows = [row if isinstance(row, list) else [row] for row in self.pairwise]
        try:
            mat = np.asarray(
                [[math.nan if v is None else v for v in row] for row in rows], dtype=np.float64
            )
        except (TypeError, ValueError):
            return None
        return mat if mat.shape == (classes, classes) else None

    def summarised(self) -> JsonObject:
        """The document with its certificate shortened to format, rho, layer count and
        network hash, and its pairwise certificates to their number (``GET .../bounds``)."""
        doc = self.to_json()
        cert = self.certificate
        if cert is not None and "multipliers" in cert:
            layers = cert.get("multipliers")
            doc["certificate"] = {
                "format": cert.get("format"),
                "rho": cert.get("rho"),
                "layers": len(layers) if isinstance(layers, list) else 0,
                "network_hash": cert.get("network_hash"),
            }
        if "pairwise_certificates" in doc:
            doc["pairwise_certificates"] = len(self.pairwise_certificates or [])
        return doc

    def for_job(self, job_id: str, model_id: str) -> StoredBound:
        return replace(self, job_id=job_id, model_id=model_id)


__all__ = [
    "CANCELLED",
    "MODEL_DELETED",
    "STORAGE_FULL",
    "JobError",
    "JsonObject",
    "JsonValue",
    "StoredBound",
    "strict_json",
    "strict_json_object",
]
