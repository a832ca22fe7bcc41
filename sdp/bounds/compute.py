"""``compute_bound``: one entry point that dispatches to a bound method and adds the lower bound.

Methods: ``naive`` (product of rigorous layer norms; compositional for residual nets),
``lipsdp-neuron`` / ``lipsdp-layer`` (certified LipSDP), ``eclipse-fast`` (LipSDP-Neuron
multipliers chosen layer by layer in closed form, certified; linear in depth,
:mod:`sdp.bounds.eclipse`), ``eclipse`` (the same with a small SDP per layer, small chains),
``sandwich`` (closed-form check,
:func:`sdp.bounds.sandwich.sandwich_bound`), ``eclipse-refined`` (per-neuron multipliers refined
on the sparse LMI of a conv chain, :mod:`sdp.bounds.eclipse_refine`), ``lipsdp-dag`` (LipSDP-Neuron
over the network's DAG with the skip paths inside the LMI, certified; :mod:`sdp.bounds.residual`),
``auto`` (the smallest of the sandwich closed form if the net is one, LipSDP-Neuron for a chain
small enough, eclipse-refined for a conv chain too large for it, eclipse-fast for another chain
too large, lipsdp-dag for a residual network within the time limit, and naive/compositional).
``lipsdp-network`` is refused: coupling multipliers between neuron pairs is unsound (Pauli,
Koch, Berberich, Kohler, Allgower, "Training robust neural networks using Lipschitz bounds",
IEEE L-CSS 2021, counterexample).
Every returned ``BoundResult`` is verified; otherwise an error is raised.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

from sdp.bounds.eclipse import check_eclipse_size, eclipse_bound, eclipse_fast_bound
from sdp.bounds.eclipse_refine import check_refine_size, eclipse_refined_bound, refine_fits
from sdp.bounds.lipsdp import check_size, lipsdp_bound, pairwise_bounds
from sdp.bounds.lower import empirical_lower_bound
from sdp.bounds.naive import naive_bound
from sdp.bounds.plan import check_bound_request
from sdp.bounds.residual import check_dag_size, dag_bound
from sdp.bounds.result import BoundResult
from sdp.bounds.sandwich import sandwich_bound
from sdp.errors import CertificateError, LipcertError, NotApplicable
from sdp.ir import Conv2d, Network
from sdp.solvers.base import Progress, Variant

AUTO_HIDDEN_CAP = 2_000
"""auto runs LipSDP-Neuron only up to this many hidden neurons (the structured solver needs
about a minute at 1 600 on 2 cores, docs/benchmarks.md; the timeout below bounds the rest)."""
AUTO_ECLIPSE_WIDTH = 1_024
"""auto runs eclipse-fast (on chains too large for LipSDP) only up to this hidden layer width
(cost ~ width^3 per layer: a few seconds per layer at this width on one core). The per-layer
SDP variant ``eclipse`` is never run by auto (one SDP per layer: too slow for its purpose)."""
AUTO_TIMEOUT_S = 120.0
"""auto's solver time limit when the caller gives none (the certificate covers a timeout)."""
AUTO_REFINE_SHARE = 0.85
"""Share of auto's time limit given to eclipse-refined (the rest: the empirical lower bound)."""
AUTO_DAG_TIMEOUT_S = 300.0
"""auto's time limit for lipsdp-dag on residual networks when the caller gives none (issue 13's
goal for resnet_4b; checked between stages, docs/benchmarks.md)."""


def _naive(net: Network) -> BoundResult:
    t0 = time.perf_counter()
    value, notes = naive_bound(net)
    method = "naive" if net.is_chain else "naive-compositional"
    return BoundResult(
        value=value,
        method=method,
        verified=True,
        timings={"total_s": time.perf_counter() - t0},
        notes=("product of per-layer spectral norm upper bounds", *notes),
    )


def _sandwich(net: Network) -> BoundResult:
    if net.sandwich is None:
        raise NotApplicable("not a sandwich network (no sandwich parameters)")
    return sandwich_bound(net)


def _lipsdp(net: Network, variant: Variant, **kw: Any) -> BoundResult:
    if not net.is_chain:
        raise NotApplicable(
            "LipSDP needs a chain; this residual network is bounded compositionally "
            "(method naive or auto)"
        )
    return lipsdp_bound(net, variant, **kw)


def _auto(net: Network, **kw: Any) -> BoundResult:
    """The smallest verified bound among the closed form (sandwich nets), LipSDP-Neuron (chains
    up to ``AUTO_HIDDEN_CAP`` hidden neurons, within the time limit) and naive."""
    closed: BoundResult | None = None
    notes: list[str] = []
    if net.sandwich is not None:
        try:
            closed = _sandwich(net)
        except NotApplicable as e:  # e.g. slopes outside [0, 1]: bound it as a plain network
            notes.append(f"auto: sandwich check not applicable ({e.detail})")
    naive = _naive(net)
    best = naive if closed is None or naive.value < closed.value else closed
    if not net.is_chain:
        limit = kw.get("timeout_s") or AUTO_DAG_TIMEOUT_S
        return _auto_residual(net, best, limit, *notes)
    try:
        check_size(net, hidden_cap=AUTO_HIDDEN_CAP)
    except NotApplicable as e:
        if any(isinstance(a, Conv2d) for a in net.chain().affines):
            return _auto_conv(net, best, kw.get("timeout_s"), *notes, f"auto: {e.detail}")
        return _auto_deep(net, best, *notes, f"auto: {e.detail}")
    if kw.get("timeout_s") is None:
        kw = {**kw, "timeout_s": AUTO_TIMEOUT_S}
        notes.append(
            f"auto: solver time limit {AUTO_TIMEOUT_S:g} s (auto's default; set timeout_s "
            "to change it)"
        )
    try:
        res = lipsdp_bound(net, "neuron", **kw)
    except CertificateError as e:  # e.g. composite weights known too loosely (design.md §3.3)
        return _noted(best, *notes, f"auto: LipSDP not used ({e.detail}); {best.method} used")
    if res.verified and res.value <= best.value:
        return _noted(res, *notes)
    return _noted(
        best, *notes, f"auto: LipSDP gave {res.value:.6g} >= {best.method}; {best.method} used"
    )


def _auto_conv(
    net: Network, best: BoundResult, timeout_s: float | None, *notes: str
) -> BoundResult:
    """A conv chain too large for LipSDP: the smaller of ``best`` and eclipse-refined, run
    within AUTO_REFINE_SHARE of the time limit when it fits there (else :func:`_auto_deep`)."""
    limit = (AUTO_TIMEOUT_S if timeout_s is None else timeout_s) * AUTO_REFINE_SHARE
    try:
        check_refine_size(net)
        if not refine_fits(net, limit):
            raise NotApplicable(f"its certificate check would not fit in {limit:.3g} s")
        res = eclipse_refined_bound(net, timeout_s=limit)
    except LipcertError as e:  # too large, or its multipliers did not certify
        return _auto_deep(net, best, *notes, f"auto: eclipse-refined skipped ({e.detail})")
    if res.verified and res.value <= best.value:
        return _noted(res, *notes, f"auto: eclipse-refined used (time limit {limit:.3g} s)")
    return _noted(
        best,
        *notes,
        f"auto: eclipse-refined gave {res.value:.6g} >= {best.method}; {best.method} used",
    )


def _auto_deep(net: Network, best: BoundResult, *notes: str) -> BoundResult:
    """A chain too large for LipSDP: the smaller of ``best`` and eclipse-fast (if it applies)."""
    try:
        check_eclipse_size(net, width_cap=AUTO_ECLIPSE_WIDTH)
        res = eclipse_fast_bound(net)
    except LipcertError as e:  # too large, or its multipliers did not certify
        return _noted(
            best,
            *notes,
            f"auto: eclipse-fast not applicable ({e.detail}); {best.method} bound used",
        )
    if res.verified and res.value <= best.value:
        return _noted(res, *notes, "auto: eclipse-fast used")
    return _noted(
        best,
        *notes,
        f"auto: eclipse-fast gave {res.value:.6g} >= {best.method}; {best.method} used",
    )


def _auto_residual(net: Network, best: BoundResult, limit: float, *notes: str) -> BoundResult:
    """A residual network: the smaller of ``best`` (compositional) and lipsdp-dag, when that
    applies and finishes within ``limit`` seconds (checked between its stages)."""
    try:
        check_dag_size(net)
        res = dag_bound(net, time_limit_s=limit)
    except LipcertError as e:  # too large, mixed-sign slopes, over the time limit
        return _noted(
            best, *notes, f"auto: lipsdp-dag not used ({e.detail}); {best.method} bound used"
        )
    if res.verified and res.value <= best.value:
        return _noted(res, *notes, f"auto: lipsdp-dag used (time limit {limit:g} s)")
    return _noted(
        best, *notes, f"auto: lipsdp-dag gave {res.value:.6g} >= {best.method}; {best.method} used"
    )


def _noted(res: BoundResult, *notes: str) -> BoundResult:
    return replace(res, notes=(*res.notes, *notes)) if notes else res


def _lower_bound_limit(method: str, timeout_s: float | None, elapsed_s: float) -> float | None:
    """auto's time for the empirical lower bound: what its limit leaves, at least the share
    ``1 - AUTO_REFINE_SHARE`` of it (other methods: no limit)."""
    if method != "auto":
        return None
    limit = AUTO_TIMEOUT_S if timeout_s is None else timeout_s
    return max(limit - elapsed_s, (1.0 - AUTO_REFINE_SHARE) * limit)


def compute_bound(
    net: Network,
    method: str = "auto",
    *,
    pairwise: bool = False,
    solver: str | None = None,
    timeout_s: float | None = None,
    progress: Progress | None = None,
    lower_bound: bool = True,
) -> BoundResult:
    """A verified l2 Lipschitz upper bound of x -> logits of ``net``.

    Args:
        net: the network IR.
        method: auto | naive | lipsdp-layer | lipsdp-neuron | eclipse-fast | eclipse |
            eclipse-refined | sandwich | lipsdp-dag.
        pairwise: also bound Lip(f_y - f_j) for every class pair (LipSDP, chains only).
        solver: solver registry name (``sdp.solvers``); None picks one.
        timeout_s: solver time limit per LMI (the layer-wise certificate covers a timeout).
        progress: callback receiving phase events {"phase": "reduce"|"solve"|"verify"|...}.
        lower_bound: also compute an empirical lower bound (``lower_bound``, ``gap_ratio``).

    Returns:
        BoundResult with ``verified`` True and ``method`` naming what produced the number.

    Raises:
        UnsupportedMethod: unknown method or ``lipsdp-network``.
        UnknownSolver: ``solver`` names no registered solver.
        NotApplicable: method cannot run on this network (e.g. LipSDP on a residual net).
    """
    check_bound_request(net, method, pairwise=pairwise, solver=solver)
    t0 = time.perf_counter()
    kw: dict[str, Any] = {"solver": solver, "timeout_s": timeout_s, "progress": progress}
    if method == "naive":
        res = _naive(net)
    elif method == "sandwich":
        res = _sandwich(net)
    elif method == "auto":
        res = _auto(net, **kw)
    elif method in ("eclipse-fast", "eclipse", "eclipse-refined", "lipsdp-dag"):
        if method == "eclipse-refined":
            res = eclipse_refined_bound(net, timeout_s=timeout_s)
        elif method == "lipsdp-dag":
            res = dag_bound(net, time_limit_s=timeout_s)
        else:
            res = eclipse_bound(net, "fast" if method == "eclipse-fast" else "sdp")
        naive = _naive(net).value
        if res.value > naive:
            res = replace(res, notes=(*res.notes, f"looser than the naive bound {naive:.6g}"))
    else:
        res = _lipsdp(net, "neuron" if method == "lipsdp-neuron" else "layer", **kw)
        naive = _naive(net).value
        if res.value > naive:
            res = replace(res, notes=(*res.notes, f"looser than the naive bound {naive:.6g}"))
    if not res.verified:
        raise LipcertError(f"{res.method} produced no verified bound", code="bound-unverified")
    extra: dict[str, Any] = {"requested_method": method}
    if pairwise:
        variant: Variant = "layer" if method == "lipsdp-layer" else "neuron"
        if progress is not None:
            progress({"phase": "pairwise", "done": 0})
        mat, certs, notes = pairwise_bounds(
            net, variant, solver=solver, timeout_s=timeout_s, progress=progress
        )
        extra.update(pairwise=mat, pairwise_certificates=certs)
        extra["notes"] = (*res.notes, *(f"pairwise: {n}" for n in notes))
    timings = dict(res.timings)
    if lower_bound:
        if progress is not None:
            progress({"phase": "lower_bound"})
        t1 = time.perf_counter()
        low = empirical_lower_bound(
            net, time_limit_s=_lower_bound_limit(method, timeout_s, t1 - t0)
        )
        timings["lower_bound_s"] = time.perf_counter() - t1
        # a measured ratio above the bound: never report it (1e-6 covers the ratio's own
        # rounding, ~ eps |f| / step, unless logits are ~1e6 times the Lipschitz constant)
        if low > res.value * (1 + 1e-6):
            raise LipcertError(
                f"{res.method} bound {res.value:.9g} is below the measured ratio {low:.9g}",
                code="bound-below-lower-bound",
            )
        extra["lower_bound"] = low
    timings["total_s"] = time.perf_counter() - t0
    extra["timings"] = timings
    return replace(res, **extra)
