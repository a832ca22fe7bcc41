"""Turn logits and a stored bound into certified radii (design.md §4). Request bodies and their
inputs are read by :mod:`service.bodies`.

For logits f(x), predicted class y and margin m = f_y - max_{j != y} f_j, every x' with
||x' - x||_2 < m / (sqrt(2) L) keeps class y. With pairwise bounds L_yj >= Lip(f_y - f_j):
r = min_{j != y} (f_y - f_j) / L_yj. The maths lives in :mod:`sdp.radius`; this module only
adapts it to the HTTP results.

Rounding: radii hold for the EXACT margin, so callers pass ``logit_error`` (a per-input bound
on ||computed - exact logits||_2, :meth:`service.worker.InferenceWorker.logit_error`) and every
margin is shrunk by sqrt(2) times it before dividing (:func:`sdp.radius.certified_radius`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from sdp.radius import RadiusResult, certified_radius
from service.bodies.arrays import check_label_count
from service.documents import JsonValue, StoredBound, strict_json
from service.errors import InvalidInput


def radius_result(
    logits: np.ndarray,
    bound: StoredBound,
    *,
    labels: np.ndarray | None = None,
    logit_error: np.ndarray | None = None,
) -> RadiusResult:
    """sdp's :func:`~sdp.radius.certified_radius` of logits (B, K) under a stored ``bound``
    (its scalar L and, when it has a well-formed K x K one, its pairwise matrix).

    ``logit_error`` bounds ||logits - exact logits||_2 per row (shrinks the margins).
    """
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise InvalidInput(
            "the model has a single output; certified radii need at least two classes",
            code="not-a-classifier",
        )
    lipschitz = bound.lipschitz_bound
    if not (math.isfinite(lipschitz) and lipschitz > 0):
        raise InvalidInput(f"the stored bound {lipschitz!r} cannot give radii", code="bad-bound")
    # a malformed pairwise matrix is ignored, the scalar bound still holds
    pairwise = bound.pairwise_matrix(logits.shape[1])
    return certified_radius(
        logits, lipschitz, labels=labels, pairwise=pairwise, logit_error=logit_error
    )


@dataclass(frozen=True)
class Certified:
    """One certify answer as columns: ``columns`` holds per-input arrays (length B, in input
    order): prediction (int64), margin, radius (float64), radius_pairwise (with pairwise
    bounds), label (int64), correct and certified (bool) (with labels), logits (B, K) (on
    request);
    ``summary`` holds lipschitz_bound, method, bound_job_id, certified_accuracy, accuracy and
    epsilon. Both response media types (per-row JSON, columnar .npz) are rendered from it."""

    columns: dict[str, np.ndarray]
    summary: dict[str, JsonValue]


def certify_columns(
    logits: np.ndarray,
    bound: StoredBound,
    *,
    labels: list[int] | None,
    return_logits: bool,
    epsilon: float,
    logit_error: np.ndarray | None = None,
) -> Certified:
    """Predictions, margins and radii of a batch (:func:`radius_result`) with the summary;
    with labels, ``correct`` is sdp's and ``certified`` means correct with a best radius
    (the larger of the global and pairwise one) above ``epsilon``."""
    b, k = logits.shape
    y = None
    if labels is not None:
        check_label_count(len(labels), b)
        if any(not 0 <= int(v) < k for v in labels):
            raise InvalidInput(f"labels must be class indices in [0, {k})")
        y = np.asarray(labels, dtype=np.int64)
    out = radius_result(logits, bound, labels=y, logit_error=logit_error)
    columns: dict[str, np.ndarray] = {
        "prediction": np.asarray(out.prediction, dtype=np.int64),
        "margin": np.asarray(out.margin, dtype=np.float64),
        "radius": np.asarray(out.radius, dtype=np.float64),
    }
    if out.radius_pairwise is not None:
        columns["radius_pairwise"] = np.asarray(out.radius_pairwise, dtype=np.float64)
    accuracy = certified_accuracy = None
    if y is not None and out.correct is not None:
        cert = out.correct & (np.asarray(out.best_radius) > epsilon)
        columns["label"] = y
        columns["correct"] = out.correct
        columns["certified"] = cert
        accuracy, certified_accuracy = int(out.correct.sum()) / b, int(cert.sum()) / b
    if return_logits:
        columns["logits"] = np.asarray(logits, dtype=np.float64)
    summary: dict[str, JsonValue] = {
        "lipschitz_bound": bound.lipschitz_bound,
        "method": bound.method,
        "bound_job_id": bound.job_id,
        "certified_accuracy": certified_accuracy,
        "accuracy": accuracy,
        "epsilon": epsilon,
    }
    return Certified(columns, summary)


def rows_payload(cert: Certified) -> dict[str, object]:
    """The default JSON answer: the summary with one result object per input.

    Non-finite floats (not JSON) become null.
    """
    s = cert.summary
    return {
        "lipschitz_bound": s["lipschitz_bound"],
        "method": s["method"],
        "bound_job_id": s["bound_job_id"],
        "results": result_rows(cert),
        "certified_accuracy": s["certified_accuracy"],
        "accuracy": s["accuracy"],
        "epsilon": s["epsilon"],
    }


def result_rows(cert: Certified) -> list[dict[str, JsonValue]]:
    """One JSON object per input from ``cert``'s columns (non-finite floats as null)."""
    columns: dict[str, list[JsonValue]] = {}
    for name, col in cert.columns.items():
        if name == "logits":
            columns[name] = [_column(row) for row in col]
        elif col.dtype.kind == "f":
            columns[name] = _column(col)
        else:
            columns[name] = col.tolist()
    names = list(columns)
    return [dict(zip(names, values, strict=True)) for values in zip(*columns.values(), strict=True)]


def _column(a: np.ndarray) -> list[JsonValue]:
    """Floats as a list; non-finite values (not JSON) as None (:func:`strict_json`, which
    all-finite columns skip: they are most of them)."""
    values: list[JsonValue] = np.asarray(a, dtype=np.float64).tolist()
    if np.isfinite(a).all():
        return values
    return [strict_json(v) for v in values]
