"""Input arrays of certify and infer requests: shape, row-count and finiteness checks, and
nested JSON lists to float64 (:func:`as_array`). Every refusal is an
:class:`~service.errors.InvalidInput` (422 problem+json)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from service.errors import InvalidInput

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
