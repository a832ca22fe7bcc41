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
from typing import Any

import numpy as np

from sdp.radius import certified_radius
from service.bodies.arrays import check_label_count
from service.errors import InvalidInput


def radii(
    logits: np.ndarray,
    lipschitz: float,
    pairwise: Any = None,
    logit_error: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """(prediction, margin, radius, radius_pairwise) for logits (B, K), via sdp.radius.

    ``logit_error`` bounds ||logits - exact logits||_2 per row (shrinks the margins).
    """
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise InvalidInput(
            "the model has a single output; certified radii need at least two classes",
            code="not-a-classifier",
        )
    if not (math.isfinite(lipschitz) and lipschitz > 0):
        raise InvalidInput(f"the stored bound {lipschitz!r} cannot give radii", code="bad-bound")
    pw = None if pairwise is None else np.asarray(pairwise, dtype=np.float64)
    if pw is not None and pw.shape != (logits.shape[1],) * 2:
        pw = None  # a malformed pairwise matrix is ignored, the scalar bound still holds
    out = certified_radius(logits, lipschitz, pairwise=pw, logit_error=logit_error)
    rpw = None if pw is None else np.asarray(out.radius_pairwise, dtype=np.float64)
    return (
        np.asarray(out.prediction, dtype=np.int64),
        np.asarray(out.margin, dtype=np.float64),
        np.asarray(out.radius, dtype=np.float64),
        rpw,
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
    summary: dict[str, Any]


def certify_columns(
    logits: np.ndarray,
    bound: dict[str, Any],
    *,
    labels: list[int] | None,
    return_logits: bool,
    epsilon: float,
    logit_error: np.ndarray | None = None,
) -> Certified:
    """Predictions, margins and radii of a batch (see :func:`radii`) with the summary."""
    b, k = logits.shape
    y = None
    if labels is not None:
        check_label_count(len(labels), b)
        if any(not 0 <= int(v) < k for v in labels):
            raise InvalidInput(f"labels must be class indices in [0, {k})")
        y = np.asarray(labels, dtype=np.int64)
    lip = float(bound["lipschitz_bound"])
    pred, margin, radius, rpw = radii(logits, lip, bound.get("pairwise"), logit_error)
    columns: dict[str, np.ndarray] = {"prediction": pred, "margin": margin, "radius": radius}
    if rpw is not None:
        columns["radius_pairwise"] = rpw
    accuracy = certified_accuracy = None
    if y is not None:
        ok = y == pred
        best = np.maximum(radius, rpw) if rpw is not None else radius
        cert = ok & (best > epsilon)
        columns["label"] = y
        columns["correct"] = ok
        columns["certified"] = cert
        accuracy, certified_accuracy = int(ok.sum()) / b, int(cert.sum()) / b
    if return_logits:
        columns["logits"] = np.asarray(logits, dtype=np.float64)
    summary = {
        "lipschitz_bound": lip,
        "method": str(bound.get("method", "")),
        "bound_job_id": bound.get("job_id"),
        "certified_accuracy": certified_accuracy,
        "accuracy": accuracy,
        "epsilon": epsilon,
    }
    return Certified(columns, summary)


def rows_payload(cert: Certified) -> dict[str, Any]:
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


def result_rows(cert: Certified) -> list[dict[str, Any]]:
    """One JSON object per input from ``cert``'s columns (non-finite floats as null)."""
    columns: dict[str, list[Any]] = {}
    for name, col in cert.columns.items():
        if name == "logits":
            columns[name] = [_column(row) for row in col]
        elif col.dtype.kind == "f":
            columns[name] = _column(col)
        else:
            columns[name] = col.tolist()
    names = list(columns)
    return [dict(zip(names, values, strict=True)) for values in zip(*columns.values(), strict=True)]


def _column(a: np.ndarray) -> list[float | None]:
    """Floats as a list; non-finite values (not JSON) as None."""
    if np.isfinite(a).all():
        return list(np.asarray(a, dtype=np.float64).tolist())
    return [_num(v) for v in a]


def _num(v: float) -> float | None:
    f = float(v)
    return f if math.isfinite(f) else None
