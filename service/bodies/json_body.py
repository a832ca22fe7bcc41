"""JSON request bodies: strict parsing (orjson, with ``json`` for its error messages)."""

from __future__ import annotations

import json
from typing import Any

import orjson

from service.errors import InvalidInput


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def loads_json(body: bytes) -> Any:
    """Strict JSON (NaN/Infinity tokens refused); InvalidInput on bad bytes.

    orjson parses (10x faster than ``json``); a body it refuses goes through ``json`` again, so
    errors and edge cases (1e400 -> inf -> 422 later, UTF-16 bodies) behave as with ``json``.
    """
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        pass
    try:
        return json.loads(body, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise InvalidInput(
            f"the body is not valid JSON: {exc}", code="malformed-json", status=400
        ) from None
