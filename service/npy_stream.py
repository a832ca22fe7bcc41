"""Read an ``application/x-npy`` certify body as it arrives, in row blocks.

A big batch takes about as long to upload through the ASGI server as to run through the
network (12.8 MB of float32 MNIST rows: ~40 ms on loopback). :class:`NpyRows` parses the .npy
header as soon as it is complete, validates dtype and shape (and the row limit) before the
rest arrives, and hands out complete C-order rows as float64 blocks, so the route can queue
block k for inference while block k+1 is still uploading. The checks are those of
:func:`service.certification.load_npy` and :func:`~service.certification.batch_inputs`
(integer/float dtypes only, never pickle; exact body length; finite values; row shape flat or
the model's input shape). Fortran-order arrays are not row-contiguous: they are collected
whole and read by ``load_npy``.
"""

from __future__ import annotations

import asyncio
import io
import math
import struct
from collections.abc import AsyncIterator, Awaitable, Callable

import numpy as np

from service.certification import NPY_MAGIC, batch_inputs, check_input_shape, load_npy
from service.errors import InvalidInput

#: Longest .npy header accepted (numpy itself refuses headers over 10 000 bytes).
MAX_HEADER_BYTES = 65536
#: Float64 bytes per inference block: small enough that the last block (run after the upload
#: ends) is short, big enough for efficient matrix products (256+ rows of 784 inputs).
BLOCK_BYTES = 2 << 20


class NpyRows:
    """Incremental .npy reader: :meth:`feed` bytes, :meth:`take` complete row blocks,
    :meth:`finish` at the end of the body (length checks, the last rows)."""

    def __init__(self, input_shape: list[int], max_inputs: int) -> None:
        self.input_shape = list(input_shape)
        self.max_inputs = max_inputs
        self.n0 = math.prod(input_shape)
        self._buf = bytearray()
        self._dtype: np.dtype | None = None
        self._fortran = False
        self._rows = 0  # rows declared by the header
        self._next_row = 0  # rows handed out so far
        self._received = 0  # data bytes after the header

    @property
    def header_done(self) -> bool:
        return self._dtype is not None

    @property
    def rows(self) -> int:
        """Rows declared by the header (0 before it is read)."""
        return self._rows

    def feed(self, data: bytes) -> None:
        """Add body bytes; parses and validates the header once it is complete."""
        self._buf += data
        if self._dtype is None:
            self._parse_header()
        elif not self._fortran:
            self._received += len(data)

    def _parse_header(self) -> None:
        buf = self._buf
        head = bytes(buf[:6])
        if head != NPY_MAGIC[: len(head)]:
            raise InvalidInput("the body is not a .npy file (bad magic)", code="invalid-npy")
        if len(buf) < 12:
            return
        major = buf[6]
        if major == 1:
            start, hlen = 10, struct.unpack("<H", bytes(buf[8:10]))[0]
        else:
            start, hlen = 12, struct.unpack("<I", bytes(buf[8:12]))[0]
        if hlen > MAX_HEADER_BYTES:
            raise InvalidInput(f"the .npy header is {hlen} bytes long", code="invalid-npy")
        if len(buf) < start + hlen:
            return
        fmt = np.lib.format
        try:
            stream = io.BytesIO(bytes(buf[: start + hlen]))
            version = fmt.read_magic(stream)
            if version == (1, 0):
                shape, fortran, dtype = fmt.read_array_header_1_0(stream)
            else:
                shape, fortran, dtype = fmt.read_array_header_2_0(stream)
        except Exception as exc:  # numpy raises ValueError/OSError/EOFError on bad headers
            raise InvalidInput(f"unreadable .npy header: {exc}", code="invalid-npy") from None
        if dtype.kind not in "iuf" or dtype.hasobject:
            raise InvalidInput(f".npy dtype {dtype} is not an integer or float type")
        if math.prod(shape) == 0:
            raise InvalidInput(
                ".npy header declares 0 values; at least one input is needed", code="invalid-npy"
            )
        check_input_shape(tuple(shape), self.input_shape, self.max_inputs)
        self._dtype, self._fortran, self._rows = dtype, bool(fortran), int(shape[0])
        self._shape = tuple(shape)
        if not self._fortran:
            del self._buf[: start + hlen]
            self._received = len(self._buf)

    def take(self, min_rows: int) -> np.ndarray | None:
        """The next block of at least ``min_rows`` complete rows (all complete rows that have
        arrived, up to the declared count), float64 (rows, n0); None when fewer arrived."""
        if self._dtype is None or self._fortran:
            return None
        row_bytes = self.n0 * self._dtype.itemsize
        ready = min(len(self._buf) // row_bytes, self._rows - self._next_row)
        if ready < min_rows or ready == 0:
            return None
        return self._block(ready, row_bytes)

    def _block(self, rows: int, row_bytes: int) -> np.ndarray:
        assert self._dtype is not None
        nbytes = rows * row_bytes
        view = np.frombuffer(self._buf, dtype=self._dtype, count=rows * self.n0)
        block = view.reshape(rows, self.n0)
        if not np.isfinite(block).all():
            bad = int(np.argwhere(~np.isfinite(block))[0][0]) + self._next_row
            raise InvalidInput(f"inputs contain NaN or infinity (first at row {bad})")
        out = block.astype(np.float64, copy=True)  # torch wants writable native arrays
        del view, block  # release the export before the buffer shrinks
        del self._buf[:nbytes]
        self._next_row += rows
        return out

    def finish(self) -> np.ndarray | None:
        """At the end of the body: the rows not taken yet (None if none), after checking that
        the body holds exactly the declared data."""
        if self._dtype is None:
            if bytes(self._buf[:6]) != NPY_MAGIC:
                raise InvalidInput("the body is not a .npy file (bad magic)", code="invalid-npy")
            raise InvalidInput(
                "unreadable .npy header: the body ends inside it", code="invalid-npy"
            )
        if self._fortran:  # the buffer still holds the whole body
            return batch_inputs(load_npy(bytes(self._buf)), self.input_shape, self.max_inputs)
        count = math.prod(self._shape)
        if self._received != count * self._dtype.itemsize:
            raise InvalidInput(
                f".npy header declares {count} values of {self._dtype.itemsize} bytes but the "
                f"body carries {self._received} bytes",
                code="invalid-npy",
            )
        left = self._rows - self._next_row
        return self._block(left, self.n0 * self._dtype.itemsize) if left else None


async def infer_npy_body(
    chunks: AsyncIterator[bytes],
    reader: NpyRows,
    infer: Callable[[np.ndarray], Awaitable[tuple[np.ndarray, np.ndarray]]],
    on_header: Callable[[], None],
) -> tuple[np.ndarray, np.ndarray]:
    """Feed ``chunks`` to ``reader`` and start ``infer`` (-> (logits, logit error)) on each block
    of rows as soon as it is complete; ``on_header`` runs once the header is valid (e.g. to
    refuse with 409 before the upload ends). Returns (logits (B, K), logit errors (B,)) in
    input order. On any error the pending inferences are cancelled and the error propagates."""
    block_rows = max(64, BLOCK_BYTES // (8 * reader.n0))
    tasks: list[asyncio.Future[tuple[np.ndarray, np.ndarray]]] = []

    def start(block: np.ndarray) -> None:
        tasks.append(asyncio.ensure_future(infer(block)))

    try:
        async for chunk in chunks:
            had_header = reader.header_done
            reader.feed(chunk)
            if reader.header_done and not had_header:
                on_header()
            while (block := reader.take(block_rows)) is not None:
                start(block)
        last = reader.finish()
        if last is not None:
            start(last)
        results = await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    if len(results) == 1:
        return results[0]
    return np.concatenate([r[0] for r in results]), np.concatenate([r[1] for r in results])
