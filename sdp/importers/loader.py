"""Load an untrusted model file: sniff the format from the bytes, never from the file name.

Formats (checked in this order):

==============  =================================================================
pickle          ``\\x80`` + protocol byte, or a zip archive holding ``*.pkl`` (torch
                ``.pth``/``.pt``) -> refused with code ``pickle-refused``
MATLAB 5        text header ``MATLAB 5.0 MAT-file`` -> :mod:`sdp.importers.mat`
HDF5            ``\\x89HDF`` (MATLAB v7.3) -> ``unsupported-format``
safetensors     8-byte little-endian header length n, then n bytes of JSON ``{...}``
ONNX            a protobuf ``ModelProto`` (first field ir_version = tag ``0x08``)
==============  =================================================================
"""

from __future__ import annotations

import io
import struct
import zipfile
from pathlib import Path

from sdp._blas import one_thread
from sdp.errors import ModelRejected
from sdp.importers.limits import Limits
from sdp.importers.mat import is_mat5, load_mat
from sdp.importers.onnx import load_onnx, looks_like_onnx
from sdp.importers.safetensors import load_safetensors
from sdp.ir import Network

_PICKLE_HINT = (
    "pickled models (torch .pth/.pt, joblib, pickle) are never loaded because unpickling runs "
    "arbitrary code; export the model to ONNX (torch.onnx.export) or save its weights as "
    "safetensors with a lipcert config"
)


def detect_format(data: bytes) -> str:
    """One of ``pickle``, ``mat``, ``hdf5``, ``safetensors``, ``onnx``, ``unknown``, ``empty``."""
    if not data:
        return "empty"
    if len(data) >= 2 and data[0] == 0x80 and 1 <= data[1] <= 5:
        return "pickle"
    if data[:4] == b"PK\x03\x04":
        return "pickle" if _zip_has_pickle(data) else "unknown"
    if is_mat5(data):
        return "mat"
    if data[:4] == b"\x89HDF":
        return "hdf5"
    if _looks_like_safetensors(data):
        return "safetensors"
    if data[0] == 0x08:  # protobuf field 1 (ir_version), varint: how every exporter starts
        return "onnx"
    return "onnx" if looks_like_onnx(data) else "unknown"


def load_model(data: bytes, *, limits: Limits | None = None, name: str = "") -> Network:
    """Parse untrusted model bytes into a :class:`~sdp.ir.Network`.

    Raises :class:`~sdp.errors.ModelRejected` (or its subclass ``UnsupportedOp``) with a stable
    ``code`` for every kind of bad input; see :mod:`sdp.importers` for the table of codes.
    An unexpected exception from a parser is reported as ``malformed`` (never passed through).

    The import is deterministic: BLAS runs on one thread while a file is parsed, so the same
    bytes give the same float64 network (and :meth:`~sdp.ir.Network.content_hash`) in every
    process of a machine, whatever its thread settings. Multi-threaded BLAS splits sums
    (norms, products, LU) differently per thread count: a sandwich file's Cayley transforms
    differed in the last bits between a 2-thread server and a 1-thread job process, so the
    job's bound named another network and was never listed.
    """
    try:
        with one_thread():
            return _load(data, limits or Limits(), name)
    except ModelRejected:
        raise
    except MemoryError as exc:
        raise ModelRejected("the model needs too much memory to import", code="too-large") from exc
    except Exception as exc:  # a parser failing on hostile bytes in a way we did not foresee
        raise ModelRejected(
            f"the model could not be imported ({type(exc).__name__}: {exc})", code="malformed"
        ) from exc


def _load(data: bytes, limits: Limits, name: str) -> Network:
    data = bytes(data)
    limits.check_bytes(len(data))
    fmt = detect_format(data)
    if fmt == "empty":
        raise ModelRejected("the model file is empty", code="empty")
    if fmt == "pickle":
        raise ModelRejected(f"refused: {_PICKLE_HINT}", code="pickle-refused")
    if fmt == "mat":
        return load_mat(data, limits, name=name)
    if fmt == "hdf5":
        raise ModelRejected(
            "HDF5 (MATLAB v7.3) files are not supported; save with -v7 or use safetensors/ONNX",
            code="unsupported-format",
        )
    if fmt == "safetensors":
        return load_safetensors(data, limits, name=name)
    if fmt == "onnx":
        return load_onnx(data, limits, name=name)
    raise ModelRejected(
        "unrecognised model format: expected ONNX, safetensors (with a lipcert config) or a "
        "LipSDP .mat file",
        code="unknown-format",
    )


def load_model_file(path: str | Path, *, limits: Limits | None = None) -> Network:
    """:func:`load_model` on a file; the size cap is checked before reading."""
    limits = limits or Limits()
    p = Path(path)
    try:
        size = p.stat().st_size
        limits.check_bytes(size)
        data = p.read_bytes()
    except OSError as exc:
        raise ModelRejected(f"cannot read {p.name}: {exc.strerror}", code="unreadable") from exc
    return load_model(data, limits=limits, name=p.stem)


def _zip_has_pickle(data: bytes) -> bool:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            return any(n.endswith(".pkl") for n in zf.namelist())
    except (zipfile.BadZipFile, ValueError, OSError, EOFError):
        return False


def _looks_like_safetensors(data: bytes) -> bool:
    if len(data) < 10:
        return False
    (n,) = struct.unpack_from("<Q", data)
    return 2 <= n <= len(data) - 8 and data[8:9] == b"{"
