"""Errors raised while a request body is taken: by the body guard
(:class:`service.bodies.limits.BodyLimitMiddleware`), from its wrapped ``receive``, and by
routes that grow their share of the body budget.

They are :class:`~starlette.exceptions.HTTPException`\\ s carrying a stable ``code``, so
FastAPI's own body parsing re-raises them unchanged (it turns any other exception into a
400); the app's problem handler (:func:`service.errors.install_error_handlers`) answers them,
and the guard answers those the application let through, both with
:func:`service.errors.problem`.
"""

from __future__ import annotations

from starlette.exceptions import HTTPException

from service.deps import KEY_DETAIL


class BodyError(HTTPException):
    """A body that cannot be taken any further (``code``: the problem's stable code);
    ``close``: whether the answer also closes the connection (the rest of the body is not
    read); otherwise the server reads and discards it and the connection stays usable."""

    code = "bad-request"
    close = True


class BodyTooLarge(BodyError):
    """The body passed the size cap (413)."""

    code = "payload-too-large"

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body exceeds the limit of {limit} bytes")


class BodyTimeout(BodyError):
    """The body has not fully arrived ``timeout_s`` after the application started reading it
    (408)."""

    code = "request-timeout"

    def __init__(self, timeout_s: float) -> None:
        super().__init__(408, f"the request body did not arrive within {timeout_s:g} s")


class BodyWithoutKey(BodyError):
    """A body sent without the configured X-API-Key (401), refused before it is read."""

    code = "unauthorized"

    def __init__(self) -> None:
        super().__init__(401, KEY_DETAIL, headers={"WWW-Authenticate": "X-API-Key"})


class BodyOverBudget(BodyError):
    """The body (as declared, as it arrives, or as decoded) does not fit beside the bodies of
    other requests (503 + Retry-After). The connection is kept: a client still sending its
    body reads the 503 once it is done, instead of a connection reset."""

    code = "service-busy"
    close = False

    def __init__(self, detail: str) -> None:
        super().__init__(503, detail, headers={"Retry-After": "1"})
