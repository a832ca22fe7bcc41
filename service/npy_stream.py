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
import math
import struct
from collections.abc import AsyncIterator, Awaitable, Callable

import numpy as np

from service.certification import (
    NPY_MAGIC,
    batch_inputs,
    check_input_shape,
    load_npy,
    read_npy_header,
)
from service.errors import InvalidInput

#: Longest .npy header accepted (numpy itself refuses headers over 10 000 bytes).
MAX_HEADER_BYTES = 65536
#: Float64 bytes per inference block: small enough that the last block (run after the upload
#: ends) is short, big enough for efficient matrix products (256+ rows of 784 inputs).
BLOCK_BYTES = 2 << 20


class NpyRows:
    """Incremental .npy reader: :meth:`feed` body bytes, :meth:`take` complete float64 row
    blocks of ``block_rows`` rows (the last one shorter), :meth:`finish` at the end of the body
    (length checks; Fortran-order arrays become one block there).

    Rows are cast straight from the received bytes into preallocated float64 blocks (one pass
    over the data); only a partial row is ever buffered.
    """

    def __init__(self, input_shape: list[int], max_inputs: int, block_rows: int = 0) -> None:
        self.input_shape = list(input_shape)
        self.max_inputs = max_inputs
        self.n0 = math.prod(input_shape)
        self.block_rows = block_rows or max(64, BLOCK_BYTES // (8 * self.n0))
        self._head = bytearray()  # the header while incomplete; the whole body for Fortran
        self._tail = bytearray()  # a partial row
        self._dtype: np.dtype | None = None
        self._fortran = False
        self._shape: tuple[int, ...] = ()
        self._rows = 0  # rows declared by the header
        self._written = 0  # rows cast into blocks so far
        self._received = 0  # data bytes after the header
        self._block: np.ndarray | None = None
        self._fill = 0
        self._ready: list[np.ndarray] = []

    @property
    def header_done(self) -> bool:
        return self._dtype is not None

    @property
    def rows(self) -> int:
        """Rows declared by the header (0 before it is read)."""
        return self._rows

    def feed(self, data: bytes) -> None:
        """Add body bytes; parses and validates the header once it is complete."""
        if self._dtype is None or self._fortran:
            self._head += data
            if self._dtype is None:
                rest = self._parse_header()
                if rest is not None and not self._fortran:
                    self._consume(memoryview(rest))
            return
        self._consume(memoryview(data))

    def _parse_header(self) -> bytes | None:
        """Parse the header once complete; returns the data bytes that followed it."""
        buf = self._head
        head = bytes(buf[:6])
        if head != NPY_MAGIC[: len(head)]:
            raise InvalidInput("the body is not a .npy file (bad magic)", code="invalid-npy")
        if len(buf) < 12:
            return None
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
        rest = bytes(buf[start + hlen :])
        self._head = bytearray()
        return rest

    def _consume(self, data: memoryview) -> None:
        assert self._dtype is not None
        self._received += len(data)
        row_bytes = self.n0 * self._dtype.itemsize
        if self._tail:
            k = min(row_bytes - len(self._tail), len(data))
            self._tail += data[:k]
            data = data[k:]
            if len(self._tail) < row_bytes:
                return
            self._write(memoryview(bytes(self._tail)), 1)
            self._tail.clear()
        whole = len(data) // row_bytes
        if whole:
            self._write(data[: whole * row_bytes], whole)
        self._tail += data[whole * row_bytes :]

    def _write(self, data: memoryview, rows: int) -> None:
        """Cast ``rows`` rows from ``data`` into the current block(s); rows beyond the
        declared count are only counted (the length check at :meth:`finish` refuses them)."""
        assert self._dtype is not None
        src = np.frombuffer(data, dtype=self._dtype, count=rows * self.n0).reshape(rows, self.n0)
        done = 0
        while done < rows and self._written < self._rows:
            if self._block is None:
                cap = min(self.block_rows, self._rows - self._written)
                self._block, self._fill = np.empty((cap, self.n0), dtype=np.float64), 0
            k = min(rows - done, len(self._block) - self._fill)
            dst = self._block[self._fill : self._fill + k]
            dst[...] = src[done : done + k]
            if not math.isfinite(float(dst.sum())) and not np.isfinite(dst).all():
                bad = int(np.argwhere(~np.isfinite(dst))[0][0]) + self._written
                raise InvalidInput(f"inputs contain NaN or infinity (first at row {bad})")
            self._fill += k
            self._written += k
            done += k
            if self._fill == len(self._block):
                self._ready.append(self._block)
                self._block = None

    def take(self) -> np.ndarray | None:
        """The next complete block (float64, (rows, n0)), or None."""
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
        if self._fortran:
            whole = batch_inputs(load_npy(bytes(self._head)), self.input_shape, self.max_inputs)
            self._ready.append(whole)
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
    infer: Callable[[np.ndarray], Awaitable[tuple[np.ndarray, np.ndarray]]],
    on_header: Callable[[], None],
) -> tuple[np.ndarray, np.ndarray]:
    """Feed ``chunks`` to ``reader`` and start ``infer`` (-> (logits, logit error)) on each block
    of rows as soon as it is complete; ``on_header`` runs once the header is valid (e.g. to
    refuse with 409 before the upload ends). Returns (logits (B, K), logit errors (B,)) in
    input order. On any error the pending inferences are cancelled and the error propagates."""
    tasks: list[asyncio.Future[tuple[np.ndarray, np.ndarray]]] = []

    def start(block: np.ndarray) -> None:
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
