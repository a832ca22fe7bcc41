"""Request and response bodies (pydantic, at the HTTP edge only) with OpenAPI examples."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt

Number = float | int


class Problem(BaseModel):
    """RFC 9457 problem details (``application/problem+json``)."""

    type: str = Field(examples=["https://lipcert.dev/problems/model-not-found"])
    title: str = Field(examples=["Not Found"])
    status: int = Field(examples=[404])
    detail: str = Field(examples=["no model with id '0123456789abcdef'"])
    code: str = Field(examples=["model-not-found"])
    instance: str | None = Field(default=None, examples=["/v1/models/0123456789abcdef"])


class ModelInfo(BaseModel):
    """A stored model. ``id`` is derived from the sha256 of the uploaded bytes."""

    id: str = Field(examples=["3f2a9c1b7d4e5f60"])
    sha256: str
    filename: str = Field(examples=["mnist-net_256x2.onnx"])
    format: str = Field(examples=["onnx"], description="onnx | safetensors | mat")
    kind: str = Field(examples=["feedforward"], description="feedforward|sandwich|conv|residual")
    input_shape: list[int] = Field(
        examples=[[784]],
        description="One input as the model file takes it (onnxruntime's layout, batch dim "
        "dropped): the shape (or, flattened in C order, the length) of what certify and OIP "
        "infer accept.",
    )
    output_shape: list[int] = Field(examples=[[10]])
    layers: int = Field(examples=[3], description="Affine (dense/conv) layers.")
    parameters: int = Field(examples=[269322])
    size_bytes: int
    created_at: str = Field(examples=["2026-01-01T12:00:00Z"])
    ir_input_shape: list[int] | None = Field(
        default=None,
        examples=[None],
        description="Only when the file's input goes straight into a Transpose (e.g. NHWC -> "
        "NCHW): the input shape of the network that is bounded, "
        "[input_shape[p] for p in input_permutation]. Inputs are still sent as input_shape.",
    )
    input_permutation: list[int] | None = Field(
        default=None,
        examples=[None],
        description="With ir_input_shape: the axis permutation of input_shape the network "
        "applies on entry (an l2 bound or radius does not change under it).",
    )
    status: Literal["ok", "unimportable"] = Field(
        default="ok",
        description="unimportable: the stored file no longer imports under this server's "
        "importer (re-checked at start-up after an importer upgrade, under the upload "
        "limits); its bounds are not used and jobs on it fail. problem says why.",
    )
    problem: dict[str, str] | None = Field(
        default=None,
        examples=[None],
        description="With status unimportable: {code, detail} of the importer's refusal.",
    )


class ModelList(BaseModel):
    models: list[ModelInfo]


class CertifyRequest(BaseModel):
    """Inputs to classify and certify. Each input is flat (n0 numbers) or nested in the
    model's input shape. ``bound`` picks the Lipschitz bound: ``best`` (smallest verified)
    or the id of a bound job of this model."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"inputs": [[0.1, 0.2], [0.5, -0.3]], "labels": [0, 1], "bound": "best"}]
        }
    )

    inputs: list[Any] = Field(min_length=1, description="Batch of inputs (numbers only).")
    labels: list[StrictInt] | None = Field(
        default=None, description="True classes, one per input (JSON integers)."
    )
    bound: str = Field(default="best", max_length=128, description='"best" or a bound job id.')
    return_logits: StrictBool = Field(default=False)
    epsilon: float | list[float] | None = Field(
        default=None,
        description="Global mode (default 0): the radius for certified_accuracy, certified "
        "iff prediction == label and radius > epsilon. Local mode: certify every input at this "
        "l2 eps (one number, or one per input); left out, the largest certified radius of "
        "each input is searched.",
    )
    mode: Literal["global", "local"] = Field(
        default="global",
        description="global: radius = margin / (sqrt(2) L) from one verified Lipschitz bound "
        "(fast); local: per-input bounds of the margins on the l2 ball (slower, much larger "
        "radii for networks not trained to be Lipschitz; at most LIPCERT_MAX_LOCAL_INPUTS "
        "inputs here, larger batches through POST /v1/models/{id}/certifications).",
    )
    method: str | None = Field(
        default=None,
        max_length=32,
        description="Local mode: ibp | crown | alpha-crown | sdp-crown | bab | beta-crown | "
        "auto (default).",
    )
    time_budget_s: float | None = Field(
        default=None,
        gt=0,
        description="Local mode: seconds per input for the radius search, and at one epsilon "
        "the deadline of alpha-crown's optimisation (at most LIPCERT_LOCAL_TIME_BUDGET_S, the "
        "default).",
    )


class CertifiedInput(BaseModel):
    prediction: int
    margin: float | None = Field(description="f_y(x) - max_{j != y} f_j(x), y the prediction.")
    radius: float | None = Field(description="margin / (sqrt(2) L): l2 radius keeping the class.")
    radius_pairwise: float | None = Field(
        default=None, description="min_j (f_y - f_j) / L_yj when pairwise bounds exist."
    )
    radius_method: str | None = Field(
        default=None,
        description="Local mode: what certified `radius` (global, ibp, crown, alpha-crown, ...).",
    )
    global_radius: float | None = Field(
        default=None, description="Local mode: margin / (sqrt(2) L) (0 without a bound)."
    )
    epsilon: float | None = Field(default=None, description="Local mode with epsilon.")
    label: int | None = None
    correct: bool | None = Field(default=None, description="label given: prediction == label.")
    certified: bool | None = Field(
        default=None,
        description="Global mode, label given: correct and radius > epsilon. Local mode with "
        "epsilon: certified at epsilon (and correct, when labels are given).",
    )
    logits: list[float] | None = None


class CertifyResponse(BaseModel):
    model_id: str
    mode: Literal["global", "local"] = "global"
    lipschitz_bound: float | None = Field(
        description="The verified bound used (local mode: the radius floor; null without one)."
    )
    method: str
    bound_job_id: str | None = None
    results: list[CertifiedInput]
    certified_accuracy: float | None = None
    accuracy: float | None = None
    epsilon: float | None = 0.0
    seconds: float | None = Field(default=None, description="Local mode: time certifying.")
    precision: str = Field(description="Dtype of the forward pass that produced the logits.")


class OipTensor(BaseModel):
    """An Open Inference Protocol v2 tensor. ``data`` is flat (row-major) or nested; with the
    binary tensor data extension it is left out and ``parameters.binary_data_size`` gives the
    length of the tensor's raw bytes after the JSON part."""

    name: str
    shape: list[int]
    datatype: Literal[
        "BOOL",
        "UINT8",
        "UINT16",
        "UINT32",
        "UINT64",
        "INT8",
        "INT16",
        "INT32",
        "INT64",
        "FP16",
        "FP32",
        "FP64",
    ]
    data: list[Any] | None = None
    parameters: dict[str, Any] | None = None


class OipRequestOutput(BaseModel):
    name: str
    parameters: dict[str, Any] | None = None


class OipInferRequest(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "req-1",
                    "inputs": [
                        {"name": "input", "shape": [1, 2], "datatype": "FP32", "data": [0.1, 0.2]}
                    ],
                }
            ]
        }
    )

    id: str | None = Field(default=None, max_length=256)
    inputs: list[OipTensor] = Field(min_length=1, max_length=1)
    outputs: list[OipRequestOutput] | None = None
    parameters: dict[str, Any] | None = None


class OipOutputTensor(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list[Any] | None = Field(
        default=None, description="Left out for a binary output (parameters.binary_data_size)."
    )
    parameters: dict[str, Any] | None = None


class OipInferResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    outputs: list[OipOutputTensor]
    parameters: dict[str, Any] | None = None


class OipTensorMeta(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class OipModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[OipTensorMeta]
    outputs: list[OipTensorMeta]


class OipServerMetadata(BaseModel):
    name: str = Field(examples=["lipcert"])
    version: str = Field(examples=["0.1.0"])
    extensions: list[str] = Field(examples=[["binary_tensor_data"]])


class OipError(BaseModel):
    """An Open Inference Protocol error (every error under /v2)."""

    error: str = Field(examples=["no model with id '0123456789abcdef'"])


class Live(BaseModel):
    live: bool


class Ready(BaseModel):
    ready: bool


class ModelReady(BaseModel):
    name: str
    ready: bool
    error: str | None = Field(default=None, description="Why the model is not ready.")


Responses = dict[int | str, dict[str, Any]]


def inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """``model``'s JSON schema with its nested models written in place, for an OpenAPI body
    declared by hand (a ``#/$defs/...`` reference would resolve against the whole document)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return resolve(defs[ref.removeprefix("#/$defs/")])
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    resolved: dict[str, Any] = resolve(schema)
    return resolved


#: What each error status means, wherever it is declared.
ERROR_DESCRIPTIONS = {
    400: "Malformed request (unparsable body; under /v2 every refused request).",
    401: "Missing or wrong X-API-Key header (when LIPCERT_API_KEY is set).",
    404: "Unknown model, bound or job.",
    408: "The request body did not arrive in time.",
    409: "No verified Lipschitz bound for this model yet (upload: model id collision).",
    413: "Request body over LIPCERT_MAX_UPLOAD_MB.",
    415: "Content type (or encoding) not accepted.",
    422: "The request is well formed but refused (validation, unusable inputs or model).",
    503: "Busy (inference queue or body budget full: Retry-After) or a component is down.",
    507: "The data directory's disk is full (storage-full).",
}
#: The answers of the body middleware to any request with a body (service.middleware).
BODY_ERRORS = (401, 408, 413, 503)
_PROBLEM_SCHEMA = Problem.model_json_schema()
_OIP_ERROR_SCHEMA = OipError.model_json_schema()


def problem_responses(*statuses: int) -> Responses:
    """OpenAPI ``responses`` declaring ``statuses`` as RFC 9457 problem+json (the /v1 routes)."""
    return {
        s: {
            "description": ERROR_DESCRIPTIONS[s],
            "content": {"application/problem+json": {"schema": _PROBLEM_SCHEMA}},
        }
        for s in statuses
    }


def oip_error_responses(*statuses: int) -> Responses:
    """OpenAPI ``responses`` declaring ``statuses`` as the v2 protocol's ``{"error": ...}``."""
    return {
        s: {
            "description": ERROR_DESCRIPTIONS[s],
            "content": {"application/json": {"schema": _OIP_ERROR_SCHEMA}},
        }
        for s in statuses
    }


#: The errors of a /v1 route that takes a model id (and maybe query parameters).
PROBLEM_RESPONSES: Responses = problem_responses(404, 422)
