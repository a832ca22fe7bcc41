"""Turn logits and a stored bound into certified radii (DESIGN §4), and parse inputs.

For logits f(x), predicted class y and margin m = f_y - max_{j != y} f_j, every x' with
||x' - x||_2 < m / (sqrt(2) L) keeps class y. With pairwise bounds L_yj >= Lip(f_y - f_j):
r = min_{j != y} (f_y - f_j) / L_yj. The maths lives in :mod:`sdp.radius`; this module only
adapts it to the HTTP results.

Rounding: radii hold for the EXACT margin, so callers pass ``logit_error`` (a per-input bound
on ||computed - exact logits||_2, :meth:`service.worker.InferenceWorker.logit_error`) and every
margin is shrunk by sqrt(2) times it before dividing (:func:`sdp.radius.certified_radius`).
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from service.errors import InvalidInput

NPY_MAGIC = b"\x93NUMPY"


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


_NUMBER_TYPES = frozenset((int, float))


def _rows_of_numbers(values: Any) -> bool:
    """True for a non-empty list of lists holding only ints and floats (no bools, strings)."""
    if type(values) is not list or not values:
        return False
    seen: set[type] = set()
    for row in values:
        if type(row) is not list:
            return False
        seen.update(map(type, row))
    return seen <= _NUMBER_TYPES


def as_array(values: Any, what: str = "inputs") -> np.ndarray:
    """A float64 array from nested JSON lists of numbers only (no strings, bools, ragged)."""
    if _rows_of_numbers(values):  # fast path: a list of rows of numbers
        try:
            return check_finite(np.array(values, dtype=np.float64), what)
        except (ValueError, OverflowError):
            pass  # ragged or out of range: the general path below says which
    try:
        objs = np.array(values, dtype=object)
    except (ValueError, TypeError) as exc:
        raise InvalidInput(f"{what} must be a rectangular array of numbers ({exc})") from None
    flat = objs.ravel()
    if flat.size == 0 or not all(type(v) is float or type(v) is int for v in flat):
        raise InvalidInput(f"{what} must be a non-empty rectangular array of numbers")
    try:
        arr = objs.astype(np.float64)
    except (OverflowError, ValueError, TypeError):
        raise InvalidInput(f"{what} hold numbers outside the float64 range") from None
    return check_finite(arr, what)


def check_npy_version(major: int, minor: int) -> None:
    """The .npy format versions that exist: 1.0, 2.0 and 3.0 (InvalidInput otherwise)."""
    if (major, minor) not in ((1, 0), (2, 0), (3, 0)):
        raise InvalidInput(
            f".npy format version {major}.{minor} is not 1.0, 2.0 or 3.0", code="invalid-npy"
        )


def read_npy_header(head: bytes) -> tuple[tuple[int, ...], bool, np.dtype[Any], int]:
    """(shape, fortran_order, dtype, data offset) of a .npy body's header, parsed by numpy.

    Only plain integer/float dtypes of at most 8 bytes pass (object arrays would need pickle;
    a long double's values may not survive the cast to float64), and only shapes of plain
    non-negative ints (numpy's parser also lets ``True`` or ``-1`` through).
    """
    if not head.startswith(NPY_MAGIC):
        raise InvalidInput("the body is not a .npy file (bad magic)", code="invalid-npy")
    fmt = np.lib.format
    try:
        stream = io.BytesIO(head)
        version = fmt.read_magic(stream)
        check_npy_version(*version)
        if version == (1, 0):
            shape, fortran, dtype = fmt.read_array_header_1_0(stream)
        else:  # 2.0 and 3.0 (the same layout, a UTF-8 header)
            shape, fortran, dtype = fmt.read_array_header_2_0(stream)
    except InvalidInput:
        raise
    except Exception as exc:  # numpy raises ValueError/OSError/EOFError on bad headers
        raise InvalidInput(f"unreadable .npy header: {exc}", code="invalid-npy") from None
    if dtype.kind not in "iuf" or dtype.hasobject or dtype.itemsize > 8:
        raise InvalidInput(f".npy dtype {dtype} is not an integer or float type of <= 64 bits")
    if not all(type(d) is int and d >= 0 for d in shape):
        raise InvalidInput(f".npy header declares shape {shape!r}", code="invalid-npy")
    return tuple(shape), bool(fortran), dtype, stream.tell()


def load_npy(body: bytes | bytearray) -> np.ndarray:
    """Inputs from an ``application/x-npy`` body: header parsed by numpy, data viewed in place.

    Only plain integer/float arrays are read (object arrays would need pickle: refused).
    """
    # the header from a prefix (numpy refuses headers over 10 000 bytes): no copy of the body
    shape, fortran, dtype, offset = read_npy_header(bytes(memoryview(body)[: 1 << 17]))
    count = math.prod(shape)
    data = memoryview(body)[offset:]
    if count == 0 or len(data) != count * dtype.itemsize:
        raise InvalidInput(
            f".npy header declares {count} values of {dtype.itemsize} bytes but the body "
            f"carries {len(data)} bytes",
            code="invalid-npy",
        )
    arr = np.frombuffer(data, dtype=dtype, count=count)
    arr = arr.reshape(shape[::-1]).T if fortran else arr.reshape(shape)
    # a copy either way (torch wants writable arrays); checked after the cast, which is what
    # the network sees
    return check_finite(arr.astype(np.float64, order="C", copy=True), "inputs")


def check_finite(arr: np.ndarray, what: str, row0: int = 0) -> np.ndarray:
    """``arr`` itself; InvalidInput naming the first row (counted from ``row0``) that holds a
    NaN or an infinity. Float arrays are summed first: a finite sum means finite values (one
    pass, no temporary), and only a non-finite sum needs the elementwise test."""
    if arr.dtype.kind == "f" and arr.size:
        with np.errstate(over="ignore", invalid="ignore"):  # a finite sum may overflow
            if math.isfinite(float(arr.sum())):
                return arr
    if not np.isfinite(arr).all():
        bad = int(np.argwhere(~np.isfinite(arr.reshape(len(arr), -1)))[0][0]) if arr.ndim else 0
        raise InvalidInput(f"{what} contain NaN or infinity (first at row {bad + row0})")
    return arr


def check_input_shape(shape: tuple[int, ...], input_shape: list[int], max_inputs: int) -> None:
    """InvalidInput unless ``shape`` is (B, n0) or (B, *input_shape) with B <= max_inputs.

    ``input_shape`` is the model file's (``ModelRecord.input_shape``): inputs are taken in the
    layout onnxruntime takes; the inference worker maps them to the IR's layout when the
    importer absorbed an input Transpose (:class:`sdp.ir.InputLayout`)."""
    n0 = math.prod(input_shape)
    if len(shape) < 2 or tuple(shape[1:]) not in ((n0,), tuple(input_shape)):
        raise InvalidInput(
            f"inputs have shape {list(shape)}; expected [batch, {n0}] or "
            f"[batch, {', '.join(map(str, input_shape))}]",
            code="wrong-input-shape",
        )
    if shape[0] > max_inputs:
        raise InvalidInput(f"{shape[0]} inputs; at most {max_inputs} per request")


def check_label_count(labels: int, inputs: int) -> None:
    """One label per input (InvalidInput otherwise)."""
    if labels != inputs:
        raise InvalidInput(f"{labels} labels for {inputs} inputs")


def batch_inputs(arr: np.ndarray, input_shape: list[int], max_inputs: int) -> np.ndarray:
    """(B, n0): accepts rows that are flat (n0) or shaped like the model file's input; a flat
    row is the C-order flattening of one input of the file's ``input_shape``."""
    check_input_shape(arr.shape, input_shape, max_inputs)
    return np.ascontiguousarray(arr.reshape(len(arr), math.prod(input_shape)))


def radii(
    logits: np.ndarray,
    lipschitz: float,
    pairwise: Any = None,
    logit_error: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """(prediction, margin, radius, radius_pairwise) for logits (B, K), via sdp.radius.

    ``logit_error`` bounds ||logits - exact logits||_2 per row (shrinks the margins).
    """
    from sdp.radius import certified_radius

    if logits.ndim != 2 or logits.shape[1] < 2:
        raise InvalidInput(
            "the model has a single output; certified radii need at least two classes",
            code="not-a-classifier",
        )
    if not (math.isfinite(lipschitz) and lipschitz > 0):
        raise InvalidInput(f"the stored bound {lipschitz!r} cannot give radii", code="bad-bound")
    pw = None if pairwise is None else np.asarray(pairwise, dtype=np.float64)
    if pw is not None and pw.shape != (logits.shape[1],) * 2:
        pw = None  # a malformed pairwise matrix is ignored, the scalar bound still holds
    out = certified_radius(logits, lipschitz, pairwise=pw, logit_error=logit_error)
    rpw = None if pw is None else np.asarray(out.radius_pairwise, dtype=np.float64)
    return (
        np.asarray(out.prediction, dtype=np.int64),
        np.asarray(out.margin, dtype=np.float64),
        np.asarray(out.radius, dtype=np.float64),
        rpw,
    )


@dataclass(frozen=True)
class Certified:
    """One certify answer as columns: ``columns`` holds per-input arrays (length B, in input
    order): prediction (int64), margin, radius (float64), radius_pairwise (with pairwise
    bounds), label (int64), correct and certified (bool) (with labels), logits (B, K) (on
    request);
    ``summary`` holds lipschitz_bound, method, bound_job_id, certified_accuracy, accuracy and
    epsilon. Both response media types (per-row JSON, columnar .npz) are rendered from it."""

    columns: dict[str, np.ndarray]
    summary: dict[str, Any]


def certify_columns(
    logits: np.ndarray,
    bound: dict[str, Any],
    *,
    labels: list[int] | None,
    return_logits: bool,
    epsilon: float,
    logit_error: np.ndarray | None = None,
) -> Certified:
    """Predictions, margins and radii of a batch (see :func:`radii`) with the summary."""
    b, k = logits.shape
    y = None
    if labels is not None:
        check_label_count(len(labels), b)
        if any(not 0 <= int(v) < k for v in labels):
            raise InvalidInput(f"labels must be class indices in [0, {k})")
        y = np.asarray(labels, dtype=np.int64)
    lip = float(bound["lipschitz_bound"])
    pred, margin, radius, rpw = radii(logits, lip, bound.get("pairwise"), logit_error)
    columns: dict[str, np.ndarray] = {"prediction": pred, "margin": margin, "radius": radius}
    if rpw is not None:
        columns["radius_pairwise"] = rpw
    accuracy = certified_accuracy = None
    if y is not None:
        ok = y == pred
        best = np.maximum(radius, rpw) if rpw is not None else radius
        cert = ok & (best > epsilon)
        columns["label"] = y
        columns["correct"] = ok
        columns["certified"] = cert
        accuracy, certified_accuracy = int(ok.sum()) / b, int(cert.sum()) / b
    if return_logits:
        columns["logits"] = np.asarray(logits, dtype=np.float64)
    summary = {
        "lipschitz_bound": lip,
        "method": str(bound.get("method", "")),
        "bound_job_id": bound.get("job_id"),
        "certified_accuracy": certified_accuracy,
        "accuracy": accuracy,
        "epsilon": epsilon,
    }
    return Certified(columns, summary)


def rows_payload(cert: Certified) -> dict[str, Any]:
    """The default JSON answer: the summary with one result object per input.

    Non-finite floats (not JSON) become null.
    """
    columns: dict[str, list[Any]] = {}
    for name, col in cert.columns.items():
        if name == "logits":
            columns[name] = [_column(row) for row in col]
        elif col.dtype.kind == "f":
            columns[name] = _column(col)
        else:
            columns[name] = col.tolist()
    names = list(columns)
    results = [
        dict(zip(names, values, strict=True)) for values in zip(*columns.values(), strict=True)
    ]
    s = cert.summary
    return {
        "lipschitz_bound": s["lipschitz_bound"],
        "method": s["method"],
        "bound_job_id": s["bound_job_id"],
        "results": results,
        "certified_accuracy": s["certified_accuracy"],
        "accuracy": s["accuracy"],
        "epsilon": s["epsilon"],
    }


def _column(a: np.ndarray) -> list[float | None]:
    """Floats as a list; non-finite values (not JSON) as None."""
    if np.isfinite(a).all():
        return list(np.asarray(a, dtype=np.float64).tolist())
    return [_num(v) for v in a]


def _num(v: float) -> float | None:
    f = float(v)
    return f if math.isfinite(f) else None
