"""``POST /v1/models/{id}/bounds`` (start a bound job) and ``GET /v1/models/{id}/bounds``.

A request is validated before anything is queued: unknown model -> 404, then sdp's own plan
(:func:`sdp.bounds.plan.check_bound_request`, the one ``compute_bound`` runs in the job):
unknown or unsound method (``lipsdp-network``), unknown solver, or a method that cannot run on
this network (sandwich on a plain net, LipSDP on a residual or too large net) -> 422
problem+json.
Identical requests (same model, method, pairwise, solver) share one job: the answer is the
in-flight or succeeded job (``reused: true``), still ``202`` with
``Location: /v1/jobs/{job_id}``.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response
from pydantic import BaseModel, ConfigDict, Field, StrictBool

from sdp.bounds import METHODS
from sdp.bounds.plan import check_bound_request
from sdp.solvers import solver_names
from service.deps import RunnerDep, StorageDep, model_or_404, runner_or_503
from service.diskspace import StorageFull
from service.documents import JsonValue, StoredBound
from service.jobs.base import JobSpec
from service.routes.jobs import JobOut
from service.schemas import BODY_ERRORS, problem_responses

router = APIRouter(prefix="/v1", tags=["bounds"])
"""Included by :func:`service.app.create_app` behind the API-key dependency."""

MAX_TIMEOUT_S = 7 * 24 * 3600.0


class BoundRequest(BaseModel):
    """Body of ``POST /v1/models/{id}/bounds``."""

    model_config = ConfigDict(extra="forbid")

    method: str = Field(
        default="auto",
        description="auto | naive | lipsdp-layer | lipsdp-neuron | eclipse-fast | eclipse | "
        "eclipse-refined | sandwich | lipsdp-dag",
        examples=["lipsdp-neuron"],
        json_schema_extra={"enum": list(METHODS)},  # checked by check_bound_request
    )
    pairwise: StrictBool = Field(default=False, description="Also bound every class pair y, j.")
    solver: str | None = Field(
        default=None,
        description="SDP solver name (default: automatic).",
        json_schema_extra={"enum": [*solver_names(), None]},  # checked by check_bound_request
    )
    timeout_s: float | None = Field(
        default=None,
        gt=0,
        le=MAX_TIMEOUT_S,
        description="Hard wall-clock limit of the job (default LIPCERT_JOB_TIMEOUT_S). The "
        "solver gets 80% of it (a solver stopped early still yields a verified, looser "
        "bound); when the limit is reached the solver process is killed and the job fails "
        "with code 'timeout'.",
    )


@router.post(
    "/models/{model_id}/bounds",
    status_code=202,
    summary="Start a bound job",
    response_model=JobOut,
    responses=problem_responses(400, 404, 422, 507, *BODY_ERRORS),
)
def request_bound(
    model_id: str, body: BoundRequest, response: Response, storage: StorageDep, runner: RunnerDep
) -> dict[str, Any]:
    """Queue a certified bound computation (or reuse an identical in-flight/finished job).

    507 ``storage-full`` when the data dir has no room for the job and its bound."""
    model_or_404(storage, model_id)
    full = storage.space_problem()
    if full is not None:
        raise StorageFull(full)
    net = storage.load_network(model_id)
    check_bound_request(net, body.method, pairwise=body.pairwise, solver=body.solver)
    spec = JobSpec(
        model_id=model_id,
        method=body.method,
        pairwise=body.pairwise,
        solver=body.solver,
        timeout_s=body.timeout_s,
    )
    rec = runner_or_503(runner).submit(spec)
    response.headers["Location"] = f"/v1/jobs/{rec.id}"
    return rec.to_dict()


class BoundList(BaseModel):
    model_id: str
    bounds: list[dict[str, Any]]  # StoredBound.to_json() / .summarised()
    best: dict[str, Any] | None


@router.get(
    "/models/{model_id}/bounds",
    summary="Verified bounds of a model",
    response_model=BoundList,
    responses=problem_responses(404, 422),
)
def list_bounds(model_id: str, storage: StorageDep, full: bool = False) -> BoundList:
    """Every verified bound stored for the model, oldest first, and the best (smallest) one.

    Certificates are summarised unless ``full=true`` (then rho and the multipliers T are
    included, so the bound can be re-checked without a solver).
    """
    model_or_404(storage, model_id)
    verified = [b for b in storage.list_bounds(model_id) if b.verified]
    best = min(verified, key=lambda b: b.lipschitz_bound, default=None)

    def shown(b: StoredBound) -> dict[str, JsonValue]:
        return b.to_json() if full else b.summarised()

    return BoundList(
        model_id=model_id,
        bounds=[shown(b) for b in verified],
        best=None if best is None else shown(best),
    )
