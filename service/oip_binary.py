"""The binary tensor data extension of the Open Inference Protocol (KServe v2 / Triton HTTP/REST).

Request body: the JSON inference request, then raw tensor bytes. The JSON part's length in bytes
is the request header ``Inference-Header-Content-Length``; every input whose
``parameters.binary_data_size`` is set has no ``data`` and takes the next ``binary_data_size``
bytes after the JSON part, in the order of ``inputs``: its values in row-major order,
little-endian, ``binary_data_size = prod(shape) * itemsize(datatype)``.

Response body: outputs asked for in binary (an output's ``parameters.binary_data``, else the
request's ``parameters.binary_data_output``) carry ``parameters.binary_data_size`` instead of
``data``; the JSON part comes first, its length in the response header
``Inference-Header-Content-Length``, then each binary output's bytes in the order of
``outputs``.

Reference: Triton Inference Server, "Binary Tensor Data Extension"
(docs/protocol/extension_binary_data.md); KServe Open Inference Protocol, REST.

Nothing here trusts the sizes it is given: lengths are checked against the body before any
byte is read, and the bytes are only ever viewed as plain numbers (no object dtypes).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from service.errors import InvalidInput

#: Request and response header: the length in bytes of the body's JSON part.
HEADER_LENGTH = "Inference-Header-Content-Length"
#: Media type of a response that carries binary outputs.
BINARY_MEDIA_TYPE = "application/octet-stream"

#: Little-endian numpy dtype of each protocol datatype with a fixed size (BYTES has none).
DTYPES: dict[str, np.dtype] = {
    name: np.dtype(code)
    for name, code in {
        "BOOL": "?",
        "UINT8": "<u1",
        "UINT16": "<u2",
        "UINT32": "<u4",
        "UINT64": "<u8",
        "INT8": "<i1",
        "INT16": "<i2",
        "INT32": "<i4",
        "INT64": "<i8",
        "FP16": "<f2",
        "FP32": "<f4",
        "FP64": "<f8",
    }.items()
}


@dataclass(frozen=True)
class BinaryInput:
    """Where one input's values are: ``size`` bytes of ``datatype`` making ``shape``."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    size: int


@dataclass(frozen=True)
class OutputTensor:
    """One output: its protocol ``datatype`` and values (any shape; sent in row-major order)."""

    name: str
    datatype: str
    array: np.ndarray


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, memoryview]:
    """(JSON part, binary part) of a request body; without the header the whole body is JSON.

    InvalidInput when the header is not a length within the body."""
    if header_length is None:
        return body, memoryview(b"")
    text = header_length.strip()
    if not text.isdigit():
        raise InvalidInput(f"{HEADER_LENGTH} must be a non-negative integer, not {text!r}")
    n = int(text)
    if n > len(body):
        raise InvalidInput(f"{HEADER_LENGTH} is {n} but the body has only {len(body)} bytes")
    view = memoryview(body)
    return body[:n], view[n:]


def binary_data_size(parameters: dict[str, Any] | None) -> int | None:
    """An input's ``parameters.binary_data_size`` (None when not set); InvalidInput unless it is
    a non-negative integer."""
    if not parameters or "binary_data_size" not in parameters:
        return None
    size = parameters["binary_data_size"]
    if type(size) is not int or size < 0:
        raise InvalidInput(f"binary_data_size must be a non-negative integer, not {size!r}")
    return size


def read_inputs(inputs: Sequence[BinaryInput], data: memoryview) -> list[np.ndarray]:
    """The arrays of ``inputs``, taken one after the other from ``data`` (read-only views of
    the body, in their declared dtype and shape); InvalidInput when a size does not match the
    shape and datatype, or the bytes do not add up to exactly the body's binary part."""
    out = []
    offset = 0
    for spec in inputs:
        dtype = DTYPES.get(spec.datatype)
        if dtype is None:
            raise InvalidInput(f"input {spec.name!r}: datatype {spec.datatype} has no binary form")
        want = math.prod(spec.shape) * dtype.itemsize
        if spec.size != want:
            raise InvalidInput(
                f"input {spec.name!r}: binary_data_size is {spec.size} but shape "
                f"{list(spec.shape)} of {spec.datatype} takes {want} bytes"
            )
        if offset + want > len(data):
            raise InvalidInput(
                f"input {spec.name!r}: the body ends {offset + want - len(data)} bytes short "
                "of its binary data"
            )
        raw = data[offset : offset + want]
        out.append(np.frombuffer(raw, dtype=dtype).reshape(spec.shape))
        offset += want
    if offset != len(data):
        raise InvalidInput(
            f"the body has {len(data) - offset} bytes after the inputs' binary data "
            f"({HEADER_LENGTH} or binary_data_size is wrong)"
        )
    return out


def wants_binary(
    parameters: dict[str, Any] | None, default: bool, key: str = "binary_data"
) -> bool:
    """Whether outputs go in binary: ``parameters[key]`` (an output's ``binary_data``, or the
    request's ``binary_data_output``), else ``default``; InvalidInput unless it is a boolean."""
    if not parameters or key not in parameters:
        return default
    flag = parameters[key]
    if type(flag) is not bool:
        raise InvalidInput(f"{key} must be true or false, not {flag!r}")
    return flag


def encode_response(
    header: dict[str, Any], outputs: Sequence[tuple[OutputTensor, bool]]
) -> tuple[bytes, int | None]:
    """(body, JSON part's length or None) of an inference response: ``header`` with an
    ``outputs`` list, each output's values in JSON ``data`` or, when its flag is set, as
    little-endian bytes after the JSON part (``parameters.binary_data_size``). The length is
    None when nothing went in binary: the body is plain JSON then."""
    tensors: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for out, binary in outputs:
        tensor: dict[str, Any] = {
            "name": out.name,
            "datatype": out.datatype,
            "shape": list(out.array.shape),
        }
        if binary:
            blob = np.ascontiguousarray(out.array, dtype=DTYPES[out.datatype]).tobytes()
            tensor["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            tensor["data"] = out.array.ravel().tolist()
        tensors.append(tensor)
    head = orjson.dumps({**header, "outputs": tensors})
    if not blobs:
        return head, None
    return b"".join([head, *blobs]), len(head)
