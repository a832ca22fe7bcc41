"""Per-input (local) certification for the HTTP routes, the jobs and the CLI (issue 12).

The mathematics is :func:`sdp.local.certify_local`: for each input x0 with predicted class y it
certifies, over the l2 ball ||x - x0||_2 <= eps, verified lower bounds of every margin
f_y - f_j (CROWN-style linear bounds, Zhang et al. 2018; optimised slopes, Xu et al. 2021;
an l2-coupled SDP-strength method, Chiu et al. 2025), re-checked in float64 with outward
rounding. Without ``epsilon`` it searches the largest certified radius, never below the global
radius margin / (sqrt(2) L) of a verified bound L; with ``epsilon`` it certifies at that eps.

This module only adapts it: validation of the service-level options (epsilon, method, time
budget), the file-layout -> IR-layout permutation of the inputs, and the per-input columns
(:class:`service.certification.Certified`) that both response media types are rendered from.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, cast, get_args

import numpy as np

from sdp.ir import Network
from sdp.local import LocalMethodName, LocalResult, SlopeOptimizer, certify_local
from service.bodies.arrays import check_label_count
from service.certification import Certified
from service.documents import StoredBound
from service.errors import InvalidInput
from service.settings import LOCAL_TIME_BUDGET_S
from service.solver_device import gpu_driver_present

MODES = ("global", "local")
LOCAL_METHODS: tuple[str, ...] = tuple(get_args(LocalMethodName))


@dataclass(frozen=True)
class LocalOptions:
    """What a local certification asks for (validated by :func:`local_options`).

    ``epsilon``: None (largest-radius search), one eps for every input, or one per input.
    """

    method: str = "auto"
    epsilon: float | np.ndarray | None = None
    time_budget_s: float = LOCAL_TIME_BUDGET_S


def check_epsilon(epsilon: Any, batch: int | None = None) -> float | np.ndarray | None:
    """None, a finite eps >= 0, or (local mode) a list of them, one per input.

    InvalidInput ``invalid-epsilon`` for a negative, NaN or infinite eps, a non-number, or a
    list whose length is not the batch size.
    """
    if epsilon is None:
        return None
    if isinstance(epsilon, list | tuple | np.ndarray):
        try:
            arr = np.asarray(epsilon, dtype=np.float64)
        except (TypeError, ValueError):
            raise InvalidInput("epsilon must be numbers", code="invalid-epsilon") from None
        if arr.ndim != 1 or (batch is not None and arr.shape[0] != batch):
            raise InvalidInput(
                f"epsilon has {arr.size} values for {batch} inputs; give one number or one "
                "per input",
                code="invalid-epsilon",
            )
        if not (np.isfinite(arr).all() and (arr >= 0).all()):
            raise InvalidInput("every epsilon must be a finite number >= 0", code="invalid-epsilon")
        return arr
    if isinstance(epsilon, bool) or not isinstance(epsilon, int | float):
        raise InvalidInput("epsilon must be a number", code="invalid-epsilon")
    eps = float(epsilon)
    if not (math.isfinite(eps) and eps >= 0):
        raise InvalidInput("epsilon must be a finite number >= 0", code="invalid-epsilon")
    return eps


def global_epsilon(epsilon: Any, method: str | None, time_budget_s: float | None) -> float:
    """The eps of a global-mode request (0 when left out); InvalidInput for local-only
    options."""
    if method is not None or time_budget_s is not None:
        raise InvalidInput(
            "method and time_budget_s apply to mode local (the global bound is chosen with "
            "`bound`)",
            code="local-option-without-local-mode",
        )
    if isinstance(epsilon, list):
        raise InvalidInput(
            "one epsilon per input needs mode local; global mode takes one number",
            code="invalid-epsilon",
        )
    eps = check_epsilon(epsilon)
    return 0.0 if eps is None else float(eps)


def local_options(
    method: str | None,
    epsilon: Any,
    time_budget_s: float | None,
    *,
    batch: int,
    max_time_budget_s: float,
) -> LocalOptions:
    """Validated :class:`LocalOptions` (InvalidInput with a stable code otherwise)."""
    name = method or "auto"
    if name not in LOCAL_METHODS:
        raise InvalidInput(
            f"local method {name!r} is not one of {', '.join(LOCAL_METHODS)}",
            code="unsupported-method",
        )
    budget = max_time_budget_s if time_budget_s is None else float(time_budget_s)
    if not (math.isfinite(budget) and 0 < budget <= max_time_budget_s):
        raise InvalidInput(
            f"time_budget_s must be in (0, {max_time_budget_s:g}] seconds per input",
            code="invalid-time-budget",
        )
    return LocalOptions(name, check_epsilon(epsilon, batch), budget)


def verified_global_bound(bound: StoredBound | None) -> float | None:
    """L of a stored verified bound (the radius floor), or None without one."""
    return None if bound is None else bound.usable_lipschitz


def run_local(
    net: Network,
    x_file: np.ndarray,
    labels: np.ndarray | None,
    options: LocalOptions,
    global_bound: float | None,
    optimizer: SlopeOptimizer | None = None,
) -> LocalResult:
    """:func:`sdp.local.certify_local` on rows in the model FILE's layout (B, n0).

    The rows are permuted into the IR's layout first (an l2 ball is invariant under it).
    ``ValueError`` from sdp (bad rows, bad eps) becomes InvalidInput; ``NotApplicable``
    (a method that cannot handle this network) passes through to its 422.
    """
    x = net.ir_inputs(np.asarray(x_file, dtype=np.float64).reshape(len(x_file), -1))
    if labels is not None:
        check_label_count(len(labels), len(x))
    try:
        return certify_local(
            net,
            x,
            labels=labels,
            epsilon=options.epsilon,
            method=cast(LocalMethodName, options.method),
            global_bound=global_bound,
            time_budget_s=options.time_budget_s,
            optimizer=optimizer,
        )
    except ValueError as exc:
        raise InvalidInput(str(exc), code="invalid-local-input") from None


def check_labels(labels: Any, batch: int, classes: int) -> np.ndarray | None:
    """Labels as int64 class indices in [0, classes), one per input (InvalidInput otherwise)."""
    if labels is None:
        return None
    y = np.asarray(labels)
    if y.dtype.kind not in "iu" or y.ndim != 1:
        raise InvalidInput("labels must be a list of integer class indices")
    check_label_count(len(y), batch)
    if y.size and (y.min() < 0 or y.max() >= classes):
        raise InvalidInput(f"labels must be class indices in [0, {classes})")
    return y.astype(np.int64)


def local_columns(result: LocalResult, labels: np.ndarray | None) -> dict[str, np.ndarray]:
    """Per-input columns of one local certification of inputs with ``labels`` (or None).

    prediction, margin, radius, radius_method, global_radius; with an epsilon: epsilon (per
    input) and certified (certified at eps and, with labels, correct); with labels: label
    (int64, as in global mode, :func:`service.certification.certify_columns`), correct, and
    certified (correct and certified at eps; in a radius search: correct and radius > 0).
    """
    columns: dict[str, np.ndarray] = {
        "prediction": np.asarray(result.prediction, dtype=np.int64),
        "margin": np.asarray(result.margin, dtype=np.float64),
        "radius": np.asarray(result.radius, dtype=np.float64),
        "radius_method": np.asarray(result.radius_method, dtype=str),
        "global_radius": np.asarray(result.global_radius, dtype=np.float64),
    }
    robust = columns["radius"] > 0
    if result.epsilon is not None and result.certified is not None:
        columns["epsilon"] = np.asarray(result.epsilon, dtype=np.float64)
        robust = np.asarray(result.certified, dtype=bool)
    if labels is not None:
        columns["label"] = np.asarray(labels, dtype=np.int64).reshape(-1)
    if result.correct is not None:
        columns["correct"] = np.asarray(result.correct, dtype=bool)
        robust = robust & columns["correct"]
    if result.epsilon is not None or result.correct is not None:
        columns["certified"] = robust
    return columns


def local_summary(
    columns: dict[str, np.ndarray],
    *,
    method: str,
    lipschitz: float | None,
    bound_job_id: str | None,
    seconds: float,
) -> dict[str, Any]:
    """The summary of local ``columns``: mode, method, lipschitz_bound (the global floor),
    bound_job_id, accuracy, certified_accuracy, epsilon (the common eps, 0 in a radius search,
    None when the inputs had different ones), seconds (certification time)."""
    b = len(columns["prediction"])
    accuracy = certified_accuracy = None
    if "correct" in columns and b:
        accuracy = int(columns["correct"].sum()) / b
        certified_accuracy = int(columns["certified"].sum()) / b
    eps_common: float | None = 0.0
    if "epsilon" in columns:
        eps = columns["epsilon"]
        eps_common = float(eps[0]) if b and bool((eps == eps[0]).all()) else None
    return {
        "mode": "local",
        "method": method,
        "lipschitz_bound": lipschitz,
        "bound_job_id": bound_job_id,
        "certified_accuracy": certified_accuracy,
        "accuracy": accuracy,
        "epsilon": eps_common,
        "seconds": seconds,
    }


def certify_rows(
    net: Network,
    x_file: np.ndarray,
    labels: np.ndarray | None,
    options: LocalOptions,
    bound: StoredBound | None,
    optimizer: SlopeOptimizer | None = None,
) -> Certified:
    """:func:`run_local` + :func:`local_columns` with ``bound`` (a stored bound or None) as
    the radius floor."""
    lip = verified_global_bound(bound)
    start = time.perf_counter()
    columns = local_columns(run_local(net, x_file, labels, options, lip, optimizer), labels)
    summary = local_summary(
        columns,
        method=options.method,
        lipschitz=lip,
        bound_job_id=None if bound is None else bound.job_id,
        seconds=time.perf_counter() - start,
    )
    return Certified(columns, summary)


def device_optimizer(device: str) -> SlopeOptimizer | None:
    """The torch alpha-CROWN slope optimiser on ``device`` (``LIPCERT_DEVICE``), or None on a
    CPU-only machine: sdp's numpy optimiser runs either way, the torch one adds candidates
    that sdp re-verifies (:mod:`models.local`). torch is imported only when a GPU may be used."""
    if device == "cpu" or (device == "auto" and not gpu_driver_present()):
        return None
    from models.local import slope_optimizer

    return slope_optimizer(device)
