"""The memory budget of request bodies: one :class:`BodyBudget` per app
(``LIPCERT_BODY_BUDGET_MB``), one :class:`Reservation` per request whose body is
:data:`BUDGET_MIN_BYTES` or more, counted as the body arrives (JSON at
:data:`JSON_DECODE_FACTOR` per byte) and grown by routes before they allocate decoded copies
(:func:`hold_request_memory`)."""

from __future__ import annotations

import threading

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


class BodyBudget:
    """Bytes of request bodies, and of what decoding them takes, held at once across
    requests. A request may grow its share while the total stays within ``limit``, and always
    when nothing else is held, so one body up to the size cap always gets in. Shares grow on
    the event loop and, while a body is decoded, on worker threads (hence the lock)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._lock = threading.Lock()

    def fits(self, nbytes: int) -> bool:
        """Whether a new request's ``nbytes`` would fit now (nothing is reserved)."""
        return not self.used or self.used + nbytes <= self.limit

    def try_resize(self, held: int, total: int) -> bool:
        """Change one request's share from ``held`` to ``total`` bytes; False (nothing
        changed) when it grows beyond the limit while other requests hold bytes."""
        with self._lock:
            others = self.used - held
            if total > held and others and others + total > self.limit:
                return False
            self.used = others + total
            return True


class Reservation:
    """One request's share of a :class:`BodyBudget`: its body's bytes as they arrive (JSON at
    :data:`JSON_DECODE_FACTOR` per byte), resized by the route while it decodes the body
    (:func:`hold_request_memory`), released when the response is sent."""

    def __init__(self, budget: BodyBudget) -> None:
        self.budget = budget
        self.held = 0

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
        f"(budget {budget.limit}); retry shortly"
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
