"""Errors raised by ``sdp``.

Every error carries a stable machine-readable ``code`` (used as the suffix of the
RFC 9457 problem ``type`` by the service) and a human ``detail``::

    LipcertError
    ├── ModelRejected          an uploaded/imported file is not acceptable (untrusted input)
    │   └── UnsupportedOp      an ONNX node whose op is not on the allow-list
    ├── UnsupportedMethod      a bound method that does not exist, or is refused (lipsdp-network)
    ├── NotApplicable          a method that cannot run on this network (LipSDP on a residual net)
    ├── CertificateError       a certificate does not verify (never reported as a bound)
    └── SolverError            a numerical solver failed or is not installed
        └── UnknownSolver      a solver name that is not registered (a request error)

Third-party exceptions (onnx, cvxpy, safetensors, scipy.io) are translated into these at
the boundary where they occur; nothing else escapes ``sdp``'s public functions for bad input.
"""

from __future__ import annotations


class LipcertError(Exception):
    """Base class: ``code`` is stable, ``detail`` is for humans."""

    code: str = "lipcert-error"

    def __init__(self, detail: str, *, code: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return self.detail


class ModelRejected(LipcertError):
    """The model file is refused. ``code`` says why (e.g. ``external-data``, ``too-large``)."""

    code = "model-rejected"


class UnsupportedOp(ModelRejected):
    """An ONNX node uses an op outside the allow-list."""

    code = "unsupported-op"

    def __init__(self, node: str, op: str, detail: str | None = None) -> None:
        super().__init__(detail or f"node {node!r}: op {op!r} is not supported")
        self.node = node
        self.op = op


class UnsupportedMethod(LipcertError):
    code = "unsupported-method"


class NotApplicable(LipcertError):
    code = "method-not-applicable"


class CertificateError(LipcertError):
    code = "certificate-invalid"


class SolverError(LipcertError):
    code = "solver-failed"


class UnknownSolver(SolverError):
    """A solver name that is not registered: the request is wrong, nothing failed."""

    code = "solver-unknown"
