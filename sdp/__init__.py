"""lipcert's maths: the network IR, importers, certified Lipschitz bounds and radii.

Pure numpy/scipy/cvxpy (+ onnx and safetensors for import). Never imports torch, FastAPI,
pydantic, ``models`` or ``service``.

The names below are re-exported lazily (PEP 562): ``from sdp import Network`` works as before,
but ``import sdp.ir`` loads the IR alone, not the bound methods, solvers or cvxpy
(tests/sdp/test_layering.py).
"""

from typing import TYPE_CHECKING

from sdp._lazy import lazy_exports

if TYPE_CHECKING:
    from sdp.bounds.result import BoundResult
    from sdp.certificate import (
        Certificate,
        Lmi,
        certify_multipliers,
        certify_rho,
        layerwise_multipliers,
        verify_certificate,
    )
    from sdp.errors import (
        CertificateError,
        LipcertError,
        ModelRejected,
        NotApplicable,
        SolverError,
        UnsupportedMethod,
        UnsupportedOp,
    )
    from sdp.ir import Activation, Chain, Conv2d, Dense, InputLayout, Network, Residual

_EXPORTS = {
    "BoundResult": "sdp.bounds.result",
    **dict.fromkeys(
        (
            "Certificate",
            "Lmi",
            "certify_multipliers",
            "certify_rho",
            "layerwise_multipliers",
            "verify_certificate",
        ),
        "sdp.certificate",
    ),
    **dict.fromkeys(
        (
            "CertificateError",
            "LipcertError",
            "ModelRejected",
            "NotApplicable",
            "SolverError",
            "UnsupportedMethod",
            "UnsupportedOp",
        ),
        "sdp.errors",
    ),
    **dict.fromkeys(
        ("Activation", "Chain", "Conv2d", "Dense", "InputLayout", "Network", "Residual"),
        "sdp.ir",
    ),
}

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = [
    "Activation",
    "BoundResult",
    "Certificate",
    "CertificateError",
    "Chain",
    "Conv2d",
    "Dense",
    "InputLayout",
    "LipcertError",
    "Lmi",
    "ModelRejected",
    "Network",
    "NotApplicable",
    "Residual",
    "SolverError",
    "UnsupportedMethod",
    "UnsupportedOp",
    "certify_multipliers",
    "certify_rho",
    "layerwise_multipliers",
    "verify_certificate",
]
