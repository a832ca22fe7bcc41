"""Read an ``application/x-npy`` certify body as it arrives, in row blocks.

A big batch takes about as long to upload through the ASGI server as to run through the
network (12.8 MB of float32 MNIST rows: ~40 ms on loopback). :class:`NpyRows` parses the .npy
header as soon as it is complete, validates dtype and shape (and the row limit) before the
rest arrives, and hands out row blocks as soon as their bytes are in, so the route can queue
block k for inference while block k+1 is still uploading.

The event loop receives the body, so it does as little per byte as possible: a block
(:class:`RowBlock`) is only a list of views of the received chunks (no copy, no cast).
:meth:`RowBlock.to_float64` -- called by the inference worker on its own thread -- casts the
bytes into one float64 array and checks finiteness there. The checks are those of
:func:`service.bodies.npy.load_npy` and :func:`~service.bodies.arrays.batch_inputs`
(integer/float dtypes only, never pickle; exact body length; finite values, with the global row
of the first bad one; row shape flat or the model's input shape). Fortran-order arrays are not
row-contiguous: they are collected whole and read by ``load_npy``.
"""

from __future__ import annotations

import asyncio
import math
import struct
from collections.abc import AsyncIterator, Awaitable, Callable

import numpy as np

from service.bodies.arrays import batch_inputs, check_finite, check_input_shape
from service.bodies.npy import NPY_MAGIC, check_npy_version, load_npy, read_npy_header
from service.errors import InvalidInput

#: Longest .npy header accepted (numpy itself refuses headers over 10 000 bytes).
MAX_HEADER_BYTES = 65536
#: Float64 bytes per inference block: small enough that the last block (run after the upload
#: ends) is short, big enough for efficient matrix products (256+ rows of 784 inputs).
BLOCK_BYTES = 2 << 20


class RowBlock:
    """Rows ``row0 .. row0 + len(self)`` of a .npy body, as the received bytes: ``pieces``
    (views of the body chunks, in order) hold exactly ``rows * n0`` values of ``dtype``, a
    value possibly split across two pieces. Nothing is copied until :meth:`to_float64`."""

    __slots__ = ("dtype", "n0", "pieces", "row0", "rows")

    def __init__(
        self, pieces: list[memoryview], dtype: np.dtype, row0: int, rows: int, n0: int
    ) -> None:
        self.pieces, self.dtype, self.row0, self.rows, self.n0 = pieces, dtype, row0, rows, n0

    def __len__(self) -> int:
        return self.rows

    def to_float64(self) -> np.ndarray:
        """The rows as a C-contiguous float64 (rows, n0) array, cast in one pass from the
        pieces; InvalidInput (naming the body's row) when a value is NaN or infinite."""
        out = np.empty((self.rows, self.n0), dtype=np.float64)
        flat = out.reshape(-1)
        size, pos = self.dtype.itemsize, 0
        carry = b""  # the first bytes of a value split across pieces
        for piece in self.pieces:
            if carry:
                k = size - len(carry)
                carry += bytes(piece[:k])
                piece = piece[k:]
                if len(carry) < size:
                    continue
                flat[pos] = np.frombuffer(carry, dtype=self.dtype)[0]
                pos, carry = pos + 1, b""
            whole = len(piece) // size
            if whole:
                flat[pos : pos + whole] = np.frombuffer(piece, dtype=self.dtype, count=whole)
                pos += whole
            carry = bytes(piece[whole * size :])
        assert pos == flat.size and not carry, "a RowBlock holds whole rows"
        return check_finite(out, "inputs", row0=self.row0)


class FortranBody:
    """A whole Fortran-order .npy body (not row-contiguous, so not streamed in blocks): parsed,
    length-checked and cast to C-order float64 by :meth:`to_float64` on the worker thread."""

    __slots__ = ("body", "input_shape", "max_inputs", "rows")

    def __init__(self, body: bytearray, input_shape: list[int], max_inputs: int, rows: int):
        self.body, self.input_shape, self.max_inputs, self.rows = (
            body,
            input_shape,
            max_inputs,
            rows,
        )

    def __len__(self) -> int:
        return self.rows

    def to_float64(self) -> np.ndarray:
        return batch_inputs(load_npy(self.body), self.input_shape, self.max_inputs)


class NpyRows:
    """Incremental .npy reader: :meth:`feed` body bytes, :meth:`take` complete row blocks of
    ``block_rows`` rows (the last one shorter), :meth:`finish` at the end of the body (length
    checks; a Fortran-order array becomes one :class:`FortranBody` there).

    Blocks are :class:`RowBlock` views of the fed chunks (cast later, off the event loop), or
    for Fortran-order bodies the whole body (:class:`FortranBody`), cast on the worker thread.
    """

    def __init__(self, input_shape: list[int], max_inputs: int, block_rows: int = 0) -> None:
        self.input_shape = list(input_shape)
        self.max_inputs = max_inputs
        self.n0 = math.prod(input_shape)
        self.block_rows = block_rows or max(64, BLOCK_BYTES // (8 * self.n0))
        self._head = bytearray()  # the header while incomplete; the whole body for Fortran
        self._dtype: np.dtype | None = None
        self._fortran = False
        self._shape: tuple[int, ...] = ()
        self._rows = 0  # rows declared by the header
        self._emitted = 0  # rows handed out in blocks so far
        self._received = 0  # data bytes after the header
        self._pieces: list[memoryview] = []  # bytes of the block being received
        self._block_left = 0  # bytes still missing from that block
        self._ready: list[RowBlock | FortranBody] = []

    @property
    def header_done(self) -> bool:
        return self._dtype is not None

    @property
    def rows(self) -> int:
        """Rows declared by the header (0 before it is read)."""
        return self._rows

    @property
    def whole_body_bytes(self) -> int:
        """What a Fortran-order body holds at once once read (the body and its float64 copy;
        known from the header): row blocks of a C-order body are transient, so 0 there."""
        if not self._fortran or self._dtype is None:
            return 0
        count = math.prod(self._shape)
        return count * (self._dtype.itemsize + 8)

    def feed(self, data: bytes) -> None:
        """Add body bytes; parses and validates the header once it is complete. The bytes
        are kept by reference (not copied): ``data`` must not change afterwards."""
        if self._dtype is None or self._fortran:
            self._head += data
            if self._dtype is None:
                rest = self._parse_header()
                if rest is not None and not self._fortran:
                    self._consume(rest)
            return
        self._consume(data if type(data) is bytes else bytes(data))

    def _parse_header(self) -> bytes | None:
        """Parse the header once complete; returns the data bytes that followed it."""
        buf = self._head
        head = bytes(buf[:6])
        if head != NPY_MAGIC[: len(head)]:
            raise InvalidInput("the body is not a .npy file (bad magic)", code="invalid-npy")
        if len(buf) < 12:
            return None
        check_npy_version(buf[6], buf[7])
        if buf[6] == 1:
            start, hlen = 10, struct.unpack("<H", bytes(buf[8:10]))[0]
        else:
            start, hlen = 12, struct.unpack("<I", bytes(buf[8:12]))[0]
        if hlen > MAX_HEADER_BYTES:
            raise InvalidInput(f"the .npy header is {hlen} bytes long", code="invalid-npy")
        if len(buf) < start + hlen:
            return None
        shape, fortran, dtype, _ = read_npy_header(bytes(buf[: start + hlen]))
        if math.prod(shape) == 0:
            raise InvalidInput(
                ".npy header declares 0 values; at least one input is needed", code="invalid-npy"
            )
        check_input_shape(tuple(shape), self.input_shape, self.max_inputs)
        self._dtype, self._fortran, self._rows = dtype, bool(fortran), int(shape[0])
        self._shape = tuple(shape)
        if self._fortran:  # not row-contiguous: keep the whole body for load_npy
            return None
        self._block_left = self._block_bytes()
        rest = bytes(buf[start + hlen :])
        self._head = bytearray()
        return rest

    def _block_bytes(self) -> int:
        """Bytes of the next block (0 when every declared row is in a block)."""
        assert self._dtype is not None
        rows = min(self.block_rows, self._rows - self._emitted)
        return rows * self.n0 * self._dtype.itemsize

    def _consume(self, data: bytes) -> None:
        """Split ``data`` at block boundaries (views only); bytes beyond the declared rows are
        only counted (the length check at :meth:`finish` refuses them)."""
        assert self._dtype is not None
        self._received += len(data)
        view = memoryview(data)
        while view and self._block_left:
            k = min(len(view), self._block_left)
            self._pieces.append(view[:k] if k < len(view) else view)
            view = view[k:]
            self._block_left -= k
            if not self._block_left:
                rows = min(self.block_rows, self._rows - self._emitted)
                block = RowBlock(self._pieces, self._dtype, self._emitted, rows, self.n0)
                self._ready.append(block)
                self._emitted += rows
                self._pieces = []
                self._block_left = self._block_bytes()

    def take(self) -> RowBlock | FortranBody | None:
        """The next complete block (:class:`RowBlock`, or the whole :class:`FortranBody`)."""
        return self._ready.pop(0) if self._ready else None

    def finish(self) -> None:
        """At the end of the body: check that it held exactly the declared data (then every
        row is in a block for :meth:`take`)."""
        if self._dtype is None:
            if bytes(self._head[:6]) != NPY_MAGIC:
                raise InvalidInput("the body is not a .npy file (bad magic)", code="invalid-npy")
            raise InvalidInput(
                "unreadable .npy header: the body ends inside it", code="invalid-npy"
            )
        if self._fortran:  # cast on the worker thread, not here on the event loop
            self._ready.append(
                FortranBody(self._head, self.input_shape, self.max_inputs, self._rows)
            )
            return
        count = math.prod(self._shape)
        if self._received != count * self._dtype.itemsize:
            raise InvalidInput(
                f".npy header declares {count} values of {self._dtype.itemsize} bytes but the "
                f"body carries {self._received} bytes",
                code="invalid-npy",
            )


async def infer_npy_body(
    chunks: AsyncIterator[bytes],
    reader: NpyRows,
    infer: Callable[[RowBlock | FortranBody], Awaitable[tuple[np.ndarray, np.ndarray]]],
    on_header: Callable[[], None],
) -> tuple[np.ndarray, np.ndarray]:
    """Feed ``chunks`` to ``reader`` and start ``infer`` (-> (logits, logit error)) on each block
    of rows as soon as it is complete; ``on_header`` runs once the header is valid (e.g. to
    refuse with 409 before the upload ends). Returns (logits (B, K), logit errors (B,)) in
    input order. On any error the pending inferences are cancelled and the error propagates."""
    tasks: list[asyncio.Future[tuple[np.ndarray, np.ndarray]]] = []

    def start(block: RowBlock | FortranBody) -> None:
        tasks.append(asyncio.ensure_future(infer(block)))

    try:
        async for chunk in chunks:
            had_header = reader.header_done
            reader.feed(chunk)
            if reader.header_done and not had_header:
                on_header()
            while (block := reader.take()) is not None:
                start(block)
        reader.finish()
        while (block := reader.take()) is not None:
            start(block)
        results = await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    if len(results) == 1:
        return results[0]
    return np.concatenate([r[0] for r in results]), np.concatenate([r[1] for r in results])
