"""Read an ``application/x-npz`` certify body: inputs and, optionally, integer labels.

The body is what ``numpy.savez(f, inputs=x, labels=y)`` (or ``savez_compressed``) writes: a
zip archive holding ``inputs.npy`` (required; what an ``application/x-npy`` body holds) and
``labels.npy`` (optional; a 1-D integer array, one class index per input). Nothing else.

An archive is untrusted, so before zipfile parses its central directory or inflates a member:

* the end-of-central-directory record (found the way ``zipfile`` finds it) must declare at most
  :data:`MAX_MEMBERS` members and a central directory of at most :data:`MAX_DIRECTORY_BYTES`
  (a huge directory would be parsed entry by entry); zip64 archives are refused (a body under
  the upload cap never needs them);
* members may only be named ``inputs.npy`` / ``labels.npy``, once each, unencrypted, stored or
  deflated, their declared uncompressed sizes together must fit the upload cap, each member's
  compression ratio must stay under :data:`MAX_RATIO` (beyond 1 MiB of slack); a member
  is inflated in bounded steps up to its declared size and no further (:func:`_read_member`),
  and zipfile checks its CRC;
* each member is read like an ``.npy`` body (:func:`service.bodies.npy.read_npy_header`:
  numpy's header parser, plain integer/float dtypes only, so never a pickle or object array;
  exact data length; finite inputs).

Every refusal is an :class:`~service.errors.InvalidInput` (422 problem+json): ``invalid-npz``
for the archive and its members, the ``.npy`` codes for the arrays inside. Labels are returned
as a list and checked (count, range) by :func:`service.certification.certify_columns`, exactly
as the labels of a JSON body.
"""

from __future__ import annotations

import io
import math
import struct
import zipfile
import zlib
from collections.abc import Callable

import numpy as np

from service.bodies.arrays import batch_inputs, check_label_count
from service.bodies.npy import load_npy, read_npy_header
from service.errors import InvalidInput

INPUTS, LABELS = "inputs.npy", "labels.npy"
#: Members an archive may declare (inputs and labels).
MAX_MEMBERS = 2
#: Largest central directory parsed (two entries need a few hundred bytes).
MAX_DIRECTORY_BYTES = 65536
#: Largest compression ratio of a member beyond the slack below: real inputs deflate a few
#: times at most (8-bit images ~5-10x), while a small body that inflates to the upload cap
#: and is then cast to float64 (8x more) would let a few cheap requests take gigabytes.
MAX_RATIO = 64
RATIO_SLACK_BYTES = 1 << 20

#: Called with the bytes a body's decoding will hold before they are allocated; raises to refuse.
Reserve = Callable[[int], None]

_END = b"PK\x05\x06"  # end of central directory record
_END_SIZE = 22
_ZIP64_LOCATOR = b"PK\x06\x07"
_ZIP64_LOCATOR_SIZE = 20


def _bad(detail: str) -> InvalidInput:
    return InvalidInput(detail, code="invalid-npz")


def _check_directory(body: bytes) -> None:
    """Refuse before zipfile parses: no end record, zip64, or too big a central directory."""
    # zipfile's own search: the record at the very end (no comment), else the last signature
    # in the final 64 KiB + 22 bytes (a comment of up to 65535 bytes may follow the record)
    if len(body) >= _END_SIZE and body[-_END_SIZE:-18] == _END and body[-2:] == b"\0\0":
        at = len(body) - _END_SIZE
    else:
        tail_start = max(len(body) - (1 << 16) - _END_SIZE, 0)
        found = body.rfind(_END, tail_start)
        if found < 0 or len(body) - found < _END_SIZE:
            raise _bad("the body is not an .npz (zip) archive")
        at = found
    _, _, _, _, entries, size_cd, _, _ = struct.unpack("<4s4H2LH", body[at : at + _END_SIZE])
    locator = at - _ZIP64_LOCATOR_SIZE
    if locator >= 0 and body[locator : locator + 4] == _ZIP64_LOCATOR:
        raise _bad("zip64 archives are not accepted (the body is far below 4 GiB)")
    if entries > MAX_MEMBERS or size_cd > MAX_DIRECTORY_BYTES:
        raise _bad(
            f"the archive declares {entries} members in a {size_cd}-byte directory; an .npz "
            f"body holds only {INPUTS} and optionally {LABELS}"
        )


def _members(body: bytes, max_bytes: int, reserve: Reserve) -> dict[str, bytes]:
    """The archive's members by name, after the checks of the module docstring; ``reserve``
    is told, before any member is inflated, what reading the archive will hold at most."""
    _check_directory(body)
    try:
        with zipfile.ZipFile(io.BytesIO(body)) as archive:
            infos = archive.infolist()
            names = [i.filename for i in infos]
            if len(infos) > MAX_MEMBERS or len(set(names)) != len(names):
                raise _bad(f"the archive holds members {names}; expected {INPUTS} [+ {LABELS}]")
            unknown = sorted(set(names) - {INPUTS, LABELS})
            if unknown:
                raise _bad(
                    f"unexpected members {unknown}: an .npz body holds {INPUTS} (required) "
                    f"and {LABELS} (optional)"
                )
            if INPUTS not in names:
                raise _bad(f"the archive has no {INPUTS} member (the input batch)")
            for info in infos:
                if info.flag_bits & 0x1:
                    raise _bad(f"{info.filename} is encrypted")
                if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                    raise _bad(f"{info.filename}: only stored or deflated members are accepted")
            declared = sum(i.file_size for i in infos)
            if declared > max_bytes:
                raise _bad(
                    f"the members declare {declared} bytes uncompressed; at most {max_bytes}"
                )
            for info in infos:
                if info.file_size > MAX_RATIO * info.compress_size + RATIO_SLACK_BYTES:
                    raise _bad(
                        f"{info.filename} declares {info.file_size} bytes from "
                        f"{info.compress_size} compressed (compression ratio over {MAX_RATIO}: "
                        "send it stored, e.g. numpy.savez)"
                    )
            inputs_size = next(i.file_size for i in infos if i.filename == INPUTS)
            reserve(len(body) + declared + 8 * inputs_size)  # uint8 inputs -> 8x as float64
            return {info.filename: _read_member(archive, info) for info in infos}
    except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError, ValueError) as exc:
        raise _bad(f"unreadable .npz archive: {exc}") from None
    except (NotImplementedError, OSError, struct.error) as exc:
        raise _bad(f"unreadable .npz archive ({type(exc).__name__})") from None


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    """The member's declared ``file_size`` bytes, inflated in bounded steps.

    ``ZipFile.read`` would hand the whole compressed stream to one decompress call (up to
    2 GiB of output from a 2 MiB deflate bomb) and only then cut it to the declared size; a
    sized read inflates at most what is asked for. Reading one byte more reaches the end of
    the member, where zipfile checks its CRC; data beyond the declared size is refused.
    """
    with archive.open(info) as member:
        data = member.read(info.file_size)
        if len(data) != info.file_size or member.read(1):
            raise _bad(f"{info.filename}: the data does not match its declared size")
    return data


def _member_error(name: str, exc: InvalidInput) -> InvalidInput:
    return InvalidInput(f"{name}: {exc.detail}", code=exc.code, status=exc.status)


def read_npz_body(
    body: bytes,
    input_shape: list[int],
    max_inputs: int,
    max_bytes: int,
    reserve: Reserve = lambda nbytes: None,
) -> tuple[np.ndarray, list[int] | None]:
    """(inputs float64 (B, n0), labels or None) of an ``application/x-npz`` certify body.

    ``reserve(nbytes)`` is called before the members are inflated with what decoding will hold
    at most (body + members + float64 inputs, counting the inputs as uint8, the worst case); it
    may raise to refuse (:func:`service.bodies.budget.hold_request_memory`)."""
    members = _members(body, max_bytes, reserve)
    try:
        x = batch_inputs(load_npy(members[INPUTS]), input_shape, max_inputs)
    except InvalidInput as exc:
        raise _member_error(INPUTS, exc) from None
    if LABELS not in members:
        return x, None
    data = members[LABELS]
    try:
        shape, _, dtype, offset = read_npy_header(data)  # 1-D: Fortran order is the same
    except InvalidInput as exc:
        raise _member_error(LABELS, exc) from None
    if dtype.kind not in "iu":
        raise _bad(f"{LABELS} has dtype {dtype}; labels are integer class indices")
    if len(shape) != 1:
        raise _bad(f"{LABELS} has shape {list(shape)}; expected [batch]")
    count = math.prod(shape)
    check_label_count(count, len(x))  # before a list of up to 64 Mi Python ints is built
    if len(data) - offset != count * dtype.itemsize:
        raise _bad(
            f"{LABELS}: the header declares {count} values of {dtype.itemsize} bytes but the "
            f"member carries {len(data) - offset} bytes"
        )
    labels = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    return x, [int(v) for v in labels.tolist()]
