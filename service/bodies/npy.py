"""The ``.npy`` format of request bodies: the header (numpy's own parser, plain integer and
float dtypes only, never a pickle) and a whole body as a float64 array. The incremental
reader of streamed bodies is :mod:`service.bodies.npy_stream`."""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np

from service.bodies.arrays import check_finite
from service.errors import InvalidInput

NPY_MAGIC = b"\x93NUMPY"


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
