"""LipSDP ``.mat`` weights: a MATLAB 5 cell array ``weights`` of (out, in) matrices, ReLU.

The LipSDP examples (Fazlyab et al., "Efficient and Accurate Estimation of Lipschitz Constants
for Deep Neural Networks", NeurIPS 2019; ``examples/saved_weights``) store
``weights = {W_0, ..., W_L}`` with no biases, and the network is
``x -> W_L relu(... relu(W_0 x))``. An optional cell ``biases`` of vectors is accepted too.

The file is read by the small pure-Python MAT5 reader below, not by ``scipy.io.loadmat``:
scipy's compiled reader can crash the process (segfault) on corrupted bytes, and MATLAB files
can hold objects, function handles, sparse and struct arrays. Only real numeric arrays and
cells of them are accepted; declared dimensions must match the bytes present, and compressed
elements are inflated under ``limits.max_bytes`` (no zlib bombs). The result equals
``scipy.io.loadmat(f)["weights"].ravel()`` on well-formed files (tested on the fixtures).
"""

from __future__ import annotations

import math
import struct
import zlib
from typing import Any

import numpy as np

from sdp.errors import ModelRejected
from sdp.importers.limits import Limits
from sdp.ir import Activation, Dense, Network, Op

MAT5_MAGIC = b"MATLAB 5.0 MAT-file"
_HEADER = 128
_MI_INT8, _MI_INT32, _MI_UINT32, _MI_MATRIX, _MI_COMPRESSED = 1, 5, 6, 14, 15
_MX_CELL = 1
_MX_NUMERIC = set(range(6, 16))  # double, single, int8 .. uint64
_MX_NAMES = {2: "struct", 3: "object", 4: "char", 5: "sparse", 16: "function", 17: "opaque"}
_MAX_NESTING = 4


def is_mat5(data: bytes) -> bool:
    return data[: len(MAT5_MAGIC)] == MAT5_MAGIC


def load_mat(data: bytes, limits: Limits, name: str = "") -> Network:
    """Network from LipSDP ``.mat`` bytes (ReLU between layers, zero biases unless given)."""
    mat, elements = read_mat5(data, limits)
    if "weights" not in mat:
        raise ModelRejected(
            f"MATLAB file has no 'weights' cell array (variables: {sorted(mat)})",
            code="malformed",
        )
    weights = _numeric_cells(mat["weights"], "weights", ndim=2)
    limits.check_nodes(max(elements, len(weights)), "MATLAB cells")
    if "biases" in mat:
        biases = [b.ravel() for b in _numeric_cells(mat["biases"], "biases", ndim=None)]
        if len(biases) != len(weights):
            raise ModelRejected(
                f"{len(biases)} biases for {len(weights)} weight matrices", code="shape-mismatch"
            )
    else:
        biases = [np.zeros(w.shape[0]) for w in weights]
    ops: list[Op] = []
    for k, (w, b) in enumerate(zip(weights, biases, strict=True)):
        if k and w.shape[1] != weights[k - 1].shape[0]:
            raise ModelRejected(
                f"weights{{{k + 1}}} has {w.shape[1]} inputs but the previous layer has "
                f"{weights[k - 1].shape[0]} outputs",
                code="shape-mismatch",
            )
        if b.shape != (w.shape[0],):
            raise ModelRejected(
                f"biases{{{k + 1}}} has shape {b.shape}, expected ({w.shape[0]},)",
                code="shape-mismatch",
            )
        limits.check_width(max(w.shape), f"weights{{{k + 1}}}")
        if k:
            ops.append(Activation("relu"))
        ops.append(Dense(w, b))
    net = Network((weights[0].shape[1],), tuple(ops), name=name)
    limits.check_network(net)
    return net


def _numeric_cells(value: Any, var: str, ndim: int | None) -> list[np.ndarray]:
    """The entries of a cell vector (the order of ``loadmat(...)[var].ravel()``)."""
    if not isinstance(value, np.ndarray) or value.dtype != object:
        raise ModelRejected(f"'{var}' must be a cell array of matrices", code="malformed")
    if sum(d > 1 for d in value.shape) > 1:
        raise ModelRejected(f"'{var}' must be a cell vector, not {value.shape}", code="malformed")
    cells = list(value.ravel())
    if not cells:
        raise ModelRejected(f"'{var}' is empty", code="malformed")
    out = []
    for i, c in enumerate(cells):
        if not isinstance(c, np.ndarray) or c.dtype == object:
            raise ModelRejected(f"{var}{{{i + 1}}} is not a numeric array", code="malformed")
        if ndim is not None and (c.ndim != ndim or 0 in c.shape):
            raise ModelRejected(
                f"{var}{{{i + 1}}} has shape {c.shape}; expected a non-empty matrix",
                code="malformed",
            )
        if not np.all(np.isfinite(c)):
            raise ModelRejected(f"{var}{{{i + 1}}} has non-finite entries", code="non-finite")
        out.append(c)
    return out


def read_mat5(data: bytes, limits: Limits) -> tuple[dict[str, np.ndarray], int]:
    """Variables of a MAT5 file (numeric arrays as float64, cells as object arrays).

    Returns (variables, number of arrays read). Raises ``malformed`` for a broken structure,
    ``unsupported-content`` for MATLAB classes other than real numeric and cell arrays,
    ``too-large`` for compressed data that would inflate beyond ``limits.max_bytes``.
    """
    if len(data) < _HEADER:
        raise ModelRejected("MATLAB file is shorter than its 128-byte header", code="malformed")
    endian = {b"IM": "<", b"MI": ">"}.get(data[126:128])
    if endian is None:
        raise ModelRejected("MATLAB header has no valid endian indicator", code="malformed")
    reader = _Reader(endian, limits)
    variables: dict[str, np.ndarray] = {}
    pos = _HEADER
    while pos < len(data):
        dtype, body, pos = _element(data, pos, endian)
        if dtype == _MI_COMPRESSED:
            inner = reader.inflate(body)
            dtype, body, end = _element(inner, 0, endian)
            if end < len(inner) - 7:
                raise ModelRejected("trailing bytes in a compressed element", code="malformed")
        if dtype != _MI_MATRIX:
            raise ModelRejected(f"unexpected top-level MATLAB element {dtype}", code="malformed")
        var, value = reader.matrix(body, depth=0)
        variables[var] = value
    return variables, reader.count


def _element(buf: bytes, pos: int, e: str) -> tuple[int, bytes, int]:
    """(type, payload, next position) of the data element at ``pos`` (small or normal form)."""
    if pos + 8 > len(buf):
        raise ModelRejected("MATLAB element tag is truncated", code="malformed")
    first, second = struct.unpack_from(e + "II", buf, pos)
    if first >> 16:  # small data element: 2-byte size, 2-byte type, 4 bytes of data
        dtype, n = first & 0xFFFF, first >> 16
        if n > 4:
            raise ModelRejected("bad small MATLAB element", code="malformed")
        return dtype, buf[pos + 4 : pos + 4 + n], pos + 8
    start, n = pos + 8, second
    if start + n > len(buf):
        raise ModelRejected(
            "MATLAB element is truncated (declares more bytes than present)", code="malformed"
        )
    nxt = start + n if first == _MI_COMPRESSED else start + n + (-n % 8)
    return first, buf[start : start + n], nxt


class _Reader:
    """Recursive miMATRIX reader with a decompression budget and an array count."""

    def __init__(self, endian: str, limits: Limits) -> None:
        self.e = endian
        self.limits = limits
        self.budget = limits.max_bytes
        self.count = 0

    def inflate(self, body: bytes) -> bytes:
        d = zlib.decompressobj()
        try:
            out = d.decompress(body, self.budget + 1)
        except zlib.error as exc:
            raise ModelRejected(f"corrupt compressed MATLAB data: {exc}", code="malformed") from exc
        if len(out) > self.budget or d.unconsumed_tail:
            raise ModelRejected(
                "compressed MATLAB data inflates beyond the size limit", code="too-large"
            )
        self.budget -= len(out)
        return out

    def matrix(self, body: bytes, depth: int) -> tuple[str, np.ndarray]:
        """(name, value) of one miMATRIX payload."""
        self.count += 1
        self.limits.check_nodes(self.count, "MATLAB arrays")
        if not body:  # empty cell entries are written as zero-length matrices
            return "", np.zeros((0, 0))
        if depth > _MAX_NESTING:
            raise ModelRejected("MATLAB cell arrays are nested too deeply", code="malformed")
        e = self.e
        t, flags, pos = _element(body, 0, e)
        if t != _MI_UINT32 or len(flags) < 4:
            raise ModelRejected("MATLAB array flags are missing", code="malformed")
        flag_word = struct.unpack_from(e + "I", flags)[0]
        cls = flag_word & 0xFF
        t, dims_raw, pos = _element(body, pos, e)
        if t != _MI_INT32 or not dims_raw or len(dims_raw) % 4:
            raise ModelRejected("MATLAB array dimensions are missing", code="malformed")
        dims = struct.unpack(e + f"{len(dims_raw) // 4}i", dims_raw)
        if min(dims) < 0:
            raise ModelRejected("negative MATLAB array dimension", code="malformed")
        t, raw_name, pos = _element(body, pos, e)
        if t != _MI_INT8:
            raise ModelRejected("MATLAB array name is missing", code="malformed")
        name = raw_name.decode("ascii", errors="replace")
        count = math.prod(dims)
        if cls in _MX_NUMERIC:
            if flag_word & _COMPLEX_FLAG:
                raise ModelRejected(
                    "complex MATLAB arrays are not accepted", code="unsupported-content"
                )
            t, payload, pos = _element(body, pos, e)
            code = _MI_NUMPY.get(t)
            if code is None or len(payload) != count * int(code[1]):
                raise ModelRejected(
                    f"MATLAB array {name!r}: data does not match its dimensions {dims}",
                    code="malformed",
                )
            arr = np.frombuffer(payload, dtype=e + code).astype(np.float64)
            return name, arr.reshape(dims, order="F")
        if cls != _MX_CELL:
            kind = _MX_NAMES.get(cls, f"class {cls}")
            raise ModelRejected(
                f"MATLAB file contains a {kind} array; only numeric and cell arrays are accepted",
                code="unsupported-content",
            )
        if count * 8 > len(body) - pos:  # each cell entry is an element with an 8-byte tag
            raise ModelRejected("MATLAB cell declares more entries than its data", code="malformed")
        entries = []
        for _ in range(count):
            t, inner, pos = _element(body, pos, e)
            if t != _MI_MATRIX:
                raise ModelRejected("MATLAB cell entry is not an array", code="malformed")
            entries.append(self.matrix(inner, depth + 1)[1])
        cell = np.empty(count, dtype=object)
        for i, entry in enumerate(entries):
            cell[i] = entry
        return name, cell.reshape(dims, order="F")


_COMPLEX_FLAG = 0x800
_MI_NUMPY = {
    1: "i1",
    2: "u1",
    3: "i2",
    4: "u2",
    5: "i4",
    6: "u4",
    7: "f4",
    9: "f8",
    12: "i8",
    13: "u8",
}
