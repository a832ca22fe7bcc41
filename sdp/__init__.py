"""lipcert's maths: the network IR, importers, certified Lipschitz bounds and radii.

Pure numpy/scipy/cvxpy (+ onnx and safetensors for import). Never imports torch, FastAPI,
pydantic, ``models`` or ``service``.
"""

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
