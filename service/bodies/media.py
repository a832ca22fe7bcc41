"""Media types of request and response bodies.

Requests: :func:`body_media_type` reads a request's ``Content-Type`` (lower case, parameters
dropped); JSON is ``application/json``, any ``+json`` type or no content type
(:func:`is_json_media`); ``.npy`` bodies are :data:`NPY_MEDIA_TYPES`, ``.npz`` bodies
:data:`NPZ_MEDIA_TYPE`. Which decoder takes which type is the table of
:mod:`service.bodies.certify`.

Responses of ``POST /v1/models/{id}/certify``: per-row JSON or a columnar .npz. Content
negotiation (RFC 9110 §12.5.1) on the ``Accept`` header:

* ``application/json`` (the default, also for no ``Accept``, ``*/*`` or media types we do not
  produce): ``{..., "results": [{"prediction", "margin", "radius", ...}, ...]}``, one object
  per input (rendered with orjson by the route).
* ``application/x-npz``: a NumPy ``.npz`` archive (uncompressed zip of ``.npy`` members, read
  with ``numpy.load(..., allow_pickle=False)``) holding the same fields as columns: one array of
  length B per per-input field (``prediction`` int64, ``margin``, ``radius``,
  ``radius_pairwise`` float64, ``label`` int64, ``certified`` bool, ``logits`` (B, K) float64)
  and one 0-d array per summary field (``lipschitz_bound``, ``epsilon``, ``accuracy``,
  ``certified_accuracy`` float64; ``model_id``, ``method``, ``precision``, ``bound_job_id``
  unicode). Fields that are null in JSON are left out; a non-finite margin (null in JSON)
  keeps its IEEE value. Chosen when the client names ``application/x-npz`` with a q-value
  > 0 that is at least that of ``application/json``.

Errors are ``application/problem+json`` whatever the ``Accept`` header says.
"""

from __future__ import annotations

import io
import zipfile
from typing import Any

import numpy as np
from starlette.types import Scope

NPZ_MEDIA_TYPE = "application/x-npz"
JSON_MEDIA_TYPE = "application/json"
NPY_MEDIA_TYPES = ("application/x-npy", "application/octet-stream")


def header(scope: Scope, name: bytes) -> str | None:
    """The first value of request header ``name`` (lower case), or None."""
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return str(value.decode("latin-1"))
    return None


def body_media_type(scope: Scope) -> str:
    """The request body's media type: lower case, parameters dropped, '' when not given."""
    return (header(scope, b"content-type") or "").split(";")[0].strip().lower()


def is_json_media(media: str) -> bool:
    """A JSON body: application/json, any ``+json`` type, or no content type (read as JSON)."""
    return media in ("application/json", "") or media.endswith("+json")


def _accept_ranges(accept: str) -> list[tuple[str, float]]:
    """(media range, q) pairs of an Accept header; malformed q-values count as 0."""
    out = []
    for part in accept.split(","):
        fields = [f.strip() for f in part.split(";")]
        media = fields[0].lower()
        if not media:
            continue
        q = 1.0
        for param in fields[1:]:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(value.strip())
                except ValueError:
                    q = 0.0
                if not 0.0 <= q <= 1.0:
                    q = 0.0
        out.append((media, q))
    return out


def _quality(ranges: list[tuple[str, float]], media: str) -> tuple[float, bool]:
    """q of ``media`` from its most specific matching range, and whether it was named exactly."""
    kind = media.split("/")[0] + "/*"
    best: dict[str, float] = {}
    for rng, q in ranges:
        if rng in (media, kind, "*/*"):
            best[rng] = max(q, best.get(rng, 0.0))
    for rng in (media, kind, "*/*"):
        if rng in best:
            return best[rng], rng == media
    return 0.0, False


def prefers_npz(accept: str | None) -> bool:
    """True when the Accept header asks for ``application/x-npz`` over JSON."""
    if not accept:
        return False
    ranges = _accept_ranges(accept)
    q_npz, named = _quality(ranges, NPZ_MEDIA_TYPE)
    q_json, _ = _quality(ranges, JSON_MEDIA_TYPE)
    return named and q_npz > 0 and q_npz >= q_json


def npz_bytes(columns: dict[str, np.ndarray], summary: dict[str, Any]) -> bytes:
    """The .npz body: the ``columns`` as they are and the ``summary`` values as 0-d arrays
    (None values left out)."""
    arrays: dict[str, np.ndarray] = dict(columns)
    for name, value in summary.items():
        if value is None:
            continue
        if isinstance(value, bool | int | float):
            arrays[name] = np.array(value, dtype=np.float64)
        else:
            arrays[name] = np.array(str(value))
    buf = io.BytesIO()  # what np.savez writes, with pickling refused for every member
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as archive:
        for name, arr in arrays.items():
            with archive.open(name + ".npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(arr), allow_pickle=False)
    return buf.getvalue()
