"""The memory budget of request bodies: admission in arrival order, reservations that grow
while a body is decoded, and the freed memory handed back once a burst is over.

Every request whose body is :data:`BUDGET_MIN_BYTES` or more holds a :class:`Reservation` on the
app's one :class:`BodyBudget` (``LIPCERT_BODY_BUDGET_MB``):

* a body that declares its length (``Content-Length``) is **admitted** only once its declared
  size (JSON: :data:`JSON_DECODE_FACTOR` times it) is reserved (:meth:`BodyBudget.admit`).
  Requests that do not fit wait in a FIFO queue, reading nothing (uvicorn stops reading a
  connection whose body nobody takes), for at most ``LIPCERT_BODY_WAIT_S``; then, or at once
  when ``LIPCERT_BODY_QUEUE`` requests already wait, they are refused with 503 + Retry-After
  before any of their body is read. A waiting request never overtakes an earlier one, so big
  bodies are not starved by small ones. One body always gets in when nothing is held;
* a chunked body (no declared length) is counted as it arrives;
* routes grow the reservation before they allocate decoded copies
  (:func:`hold_request_memory`), and may be refused then (503) when others hold the rest;
* the reservation is released when the response has been sent, and waiting requests are
  admitted in order as room frees.

So the bodies in memory at once are the budget at most, however many clients send: with the
12.8 MB ``.npy`` bodies of docs/benchmarks.md, 20 of them within the default 256 MiB. The
memory freed when a burst ends is returned to the kernel once the budget has been empty for
:data:`TRIM_IDLE_S` (:func:`service.malloc_tuning.release_freed_memory`): the thresholds of
:mod:`service.malloc_tuning` keep it mapped between back-to-back requests, not after them.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from starlette.types import Scope

from service.bodies.errors import BodyOverBudget

#: Bodies below this size are not counted against the shared budget (single-input requests).
BUDGET_MIN_BYTES = 64 * 1024
#: Memory that decoding a JSON body takes per body byte: the parsed lists of Python floats,
#: their validated copy and the float64 array (12-14x measured for short numbers such as
#: ``0,`` and ``0.5,``; ~5x for ``0.12345678,``). A JSON body counts this much per byte.
JSON_DECODE_FACTOR = 16
#: Where a request's :class:`Reservation` is kept in the ASGI scope.
RESERVATION_KEY = "lipcert.reservation"
#: Seconds the budget must stay empty before freed heap memory is handed back to the kernel.
TRIM_IDLE_S = 1.0
#: ... and only after a burst that held at least this much at once.
TRIM_AFTER_BYTES = 32 << 20


@dataclass(eq=False)
class _Waiter:
    nbytes: int
    future: asyncio.Future[None]
    admitted: bool = False


class BodyBudget:
    """Bytes of request bodies, and of what decoding them takes, held at once across
    requests (see the module docstring). Shares are admitted and released on the event loop
    and grow, while a body is decoded, on worker threads too (hence the lock).

    ``on_drained`` (optional) runs on the event loop each time the budget becomes empty with
    nobody waiting."""

    def __init__(
        self, limit: int, queue_size: int = 128, on_drained: Callable[[], None] | None = None
    ) -> None:
        self.limit = limit
        self.queue_size = queue_size
        self.used = 0
        self.peak = 0  # most held at once since :meth:`reset_peak`
        self.on_drained = on_drained
        self._lock = threading.Lock()
        self._queue: deque[_Waiter] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def waiting(self) -> int:
        """Requests queued for admission."""
        return len(self._queue)

    def fits(self, nbytes: int) -> bool:
        """Whether ``nbytes`` more would fit now (always when nothing is held)."""
        return not self.used or self.used + nbytes <= self.limit

    def reset_peak(self) -> None:
        with self._lock:
            self.peak = self.used

    async def admit(self, nbytes: int, wait_s: float) -> bool:
        """Reserve ``nbytes`` for a new request: at once when nobody waits and they fit, else
        after the requests queued before it, within ``wait_s`` seconds. False (nothing
        reserved) when the wait runs out or the queue is full."""
        loop = self._loop = asyncio.get_running_loop()
        with self._lock:
            if not self._queue and self.fits(nbytes):
                self._add(nbytes)
                return True
            if wait_s <= 0 or len(self._queue) >= self.queue_size:
                return False
            waiter = _Waiter(nbytes, loop.create_future())
            self._queue.append(waiter)
        try:
            await asyncio.wait({waiter.future}, timeout=wait_s)
        except BaseException:  # cancelled: give back what may have been admitted meanwhile
            with self._lock:
                if waiter.admitted:
                    self._add(-nbytes)
                else:
                    self._queue.remove(waiter)
                self._admit_waiting()
            raise
        with self._lock:
            if not waiter.admitted:  # timed out
                self._queue.remove(waiter)
                self._admit_waiting()  # it may have blocked the head of the queue
        return waiter.admitted

    def try_resize(self, held: int, total: int) -> bool:
        """Change one admitted request's share from ``held`` to ``total`` bytes; False
        (nothing changed) when it grows beyond the limit while other requests hold bytes.
        Growing does not queue: the request has been admitted already."""
        with self._lock:
            others = self.used - held
            if total > held and others and others + total > self.limit:
                return False
            self._add(total - held)
            if total < held:
                self._admit_waiting()
            return True

    def _add(self, nbytes: int) -> None:
        """Change ``used`` (lock held); tell ``on_drained`` when it empties."""
        self.used += nbytes
        self.peak = max(self.peak, self.used)
        loop = self._loop
        if not self.used and not self._queue and self.on_drained and loop and not loop.is_closed():
            loop.call_soon_threadsafe(self.on_drained)

    def _admit_waiting(self) -> None:
        """Admit queued requests from the head while they fit (lock held)."""
        while self._queue:
            waiter = self._queue[0]
            if not self.fits(waiter.nbytes):
                return
            self._queue.popleft()
            waiter.admitted = True
            self._add(waiter.nbytes)
            waiter.future.get_loop().call_soon_threadsafe(_settle, waiter.future)


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class Reservation:
    """One request's share of a :class:`BodyBudget`: its declared body as admitted, or its
    body's bytes as they arrive (JSON at :data:`JSON_DECODE_FACTOR` per byte), resized by the
    route while it decodes the body (:func:`hold_request_memory`), released when the response
    is sent."""

    def __init__(self, budget: BodyBudget) -> None:
        self.budget = budget
        self.held = 0

    async def admit(self, total: int, wait_s: float) -> bool:
        """Reserve ``total`` bytes before the body is read (see :meth:`BodyBudget.admit`)."""
        if not await self.budget.admit(total, wait_s):
            return False
        self.held = total
        return True

    def hold(self, total: int) -> bool:
        if not self.budget.try_resize(self.held, total):
            return False
        self.held = total
        return True

    def release(self) -> None:
        self.hold(0)


def busy_detail(budget: BodyBudget) -> str:
    return (
        f"{budget.used} bytes of request bodies are being received or processed "
        f"(budget {budget.limit}, {budget.waiting} requests waiting); retry shortly"
    )


def hold_request_memory(scope: Scope, total: int) -> None:
    """Count ``total`` bytes (body + decoded copies) against the request's share of the body
    budget before allocating them; :class:`BodyOverBudget` (503 service-busy + Retry-After)
    when other requests hold the rest. No-op without a budget, and for a request whose body
    was not counted (under :data:`BUDGET_MIN_BYTES`): single-input requests never wait on the
    budget."""
    reservation: Reservation | None = scope.get(RESERVATION_KEY)
    if reservation is not None and reservation.held and not reservation.hold(total):
        raise BodyOverBudget(busy_detail(reservation.budget))
