"""Constant folding with ONNX's types: Cast and integer Div as onnxruntime computes them.

Constants keep their ONNX numpy dtype (float16/32/64, the int types, bool) while they are
folded, so integer arithmetic wraps around and float16/float32 results round as in
onnxruntime. A constant becomes float64 (weights) or int64 (shapes, axes, indices) only when
a node that also reads the network input uses it (:func:`widen`).

onnxruntime's Cast, measured with onnxruntime 1.32 on the CPU provider (what
:func:`cast` reproduces, or refuses):

* int -> int: two's-complement wrap-around (int64 -1 -> uint8 255, 300 -> 44), as numpy;
* float -> int: truncation toward zero when the result fits the target type; out of range,
  NaN or inf give platform-dependent values (-1.7 -> uint8 255, 256.0 -> uint8 0, NaN -> int64
  min): refused;
* anything -> bool: ``x != 0`` (NaN -> true);
* -> float: rounded to float32; -> float16: rounded through float32 (double -> float -> half,
  so a float64 can round differently from a direct double -> half); inf results refused;
* other targets (bfloat16, float8, int4, string, complex): refused.

ONNX integer Div truncates toward zero (onnxruntime: 7/2 = 3, -7/2 = -3, 7/-2 = -3); a zero
divisor (undefined) and ``min / -1`` (overflow) are refused.
"""

from __future__ import annotations

import numpy as np

from sdp.errors import ModelRejected

#: ONNX TensorProto data types as numpy types (the ones lipcert reads).
ONNX_FLOATS: dict[int, type[np.floating]] = {1: np.float32, 10: np.float16, 11: np.float64}
ONNX_INTS: dict[int, type[np.integer]] = {
    2: np.uint8,
    3: np.int8,
    4: np.uint16,
    5: np.int16,
    6: np.int32,
    7: np.int64,
    12: np.uint32,
    13: np.uint64,
}
ONNX_BOOL = 9


def widen(where: str, v: np.ndarray) -> np.ndarray:
    """A folded constant as the importer's working type: float64 (finite) or int64."""
    if v.dtype.kind == "f":
        out = v.astype(np.float64)
        if not np.all(np.isfinite(out)):
            raise ModelRejected(f"{where}: a constant has NaN or inf entries", code="non-finite")
        return out
    if v.dtype == np.uint64 and v.size and int(v.max()) > np.iinfo(np.int64).max:
        raise ModelRejected(f"{where}: a uint64 constant exceeds int64", code="unsupported-dtype")
    return v.astype(np.int64)


def cast(where: str, x: np.ndarray, to: int) -> np.ndarray:
    """ONNX ``Cast(x, to)`` on a constant, as onnxruntime computes it (or refused)."""
    if to == ONNX_BOOL:
        return np.asarray(x != 0)
    if to in ONNX_FLOATS:
        src = x.astype(np.float32) if to == 10 else x  # onnxruntime: double -> float -> half
        with np.errstate(over="ignore"):
            out = src.astype(ONNX_FLOATS[to])
        if not np.all(np.isfinite(out)):
            raise ModelRejected(
                f"{where}: Cast to {np.dtype(ONNX_FLOATS[to]).name} overflows to inf",
                code="non-finite",
            )
        return out
    if to in ONNX_INTS:
        dtype = ONNX_INTS[to]
        if x.dtype.kind != "f":
            return x.astype(dtype)  # wrap-around, as onnxruntime
        info = np.iinfo(dtype)
        # float(max) + 1 is exactly 2^bits (unsigned) or 2^(bits-1) (signed): the bound
        lo, hi = float(info.min), float(info.max) + 1.0
        t = np.trunc(x.astype(np.float64))
        if not np.all(np.isfinite(t)) or np.any(t < lo) or np.any(t >= hi):
            raise ModelRejected(
                f"{where}: Cast of {x.dtype.name} values outside the range of "
                f"{np.dtype(dtype).name} (onnxruntime's result is platform-dependent)",
                code="unsupported-attribute",
            )
        return t.astype(dtype)
    raise ModelRejected(
        f"{where}: Cast to ONNX type {to} is not supported "
        "(float, double, float16, bool and the int types are)",
        code="unsupported-attribute",
    )


def int_divide(where: str, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """ONNX Div on integers: the quotient truncated toward zero, in the operands' type."""
    a, b = np.broadcast_arrays(a, b)
    if np.any(b == 0):
        raise ModelRejected(f"{where}: integer division by zero", code="non-finite")
    if a.dtype.kind == "i" and np.any((a == np.iinfo(a.dtype).min) & (b == -1)):
        raise ModelRejected(f"{where}: integer division overflows", code="non-finite")
    with np.errstate(all="ignore"):
        q = np.floor_divide(a, b)
        inexact = (a - q * b) != 0
    if a.dtype.kind == "u":
        return q
    return np.asarray(q + (inexact & ((a < 0) != (b < 0))).astype(q.dtype))
