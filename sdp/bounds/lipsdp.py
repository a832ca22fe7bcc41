"""LipSDP-Neuron / LipSDP-Layer bounds (Fazlyab et al., NeurIPS 2019), certified exactly.

Pipeline for one LMI (design.md §3.2-3.3)::

    Lmi (original)  --InputReduction.apply-->  reduced problem  --solver-->  T
    T  --invert (unchanged)-->  certify_multipliers(ORIGINAL Lmi, T)  -->  (rho, T) certificate

A solver's rho is never reported: only :func:`sdp.certificate.certify_multipliers` turns T into
the bound, and :func:`sdp.certificate.verify_certificate` re-checks the stored certificate.
If the solver fails or times out without multipliers, the always-feasible layer-wise
multipliers give a (looser) certificate, with a note.

Solver choice when none is named: "structured" when registered and available; else Clarabel
(interior point, exact to 1e-8) when the reduced LMI has at most ``CLARABEL_MAX_DIM`` rows, since
its dense PSD scaling makes it slow beyond that; else SCS. Each solver uses its own default
tolerance (``default_eps``: 1e-5 for the structured solver, 1e-6 for SCS, 1e-8 for Clarabel).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from sdp.bounds.linear_fold import LinearFold
from sdp.bounds.reduction import InputReduction
from sdp.bounds.result import BoundResult
from sdp.certificate import (
    Certificate,
    Lmi,
    certify_multipliers,
    certify_rho,
    first_zero_layer,
    layerwise_multipliers,
    verify_certificate,
    zero_layer_multipliers,
)
from sdp.errors import LipcertError, NotApplicable, SolverError
from sdp.ir import Array, Network
from sdp.solvers import available_solvers, get_solver
from sdp.solvers._lmi_structure import INPUT_RTOL
from sdp.solvers.base import LipSdpProblem, Progress, Solution, SolveOptions, Variant

UNROLL_CAP = 20_000_000
"""Refuse LipSDP when the unrolled weight matrices have more entries than this."""
HIDDEN_CAP = 4_000
"""Refuse LipSDP when the network has more hidden neurons than this (CVXPY path)."""
CLARABEL_MAX_DIM = 80


def unrolled_size(net: Network) -> tuple[int, int]:
    """(entries of the unrolled W_0..W_L, hidden neurons) of a chain, without unrolling."""
    chain = net.chain()
    entries = sum(a.in_features * a.out_features for a in chain.affines)
    return entries, sum(chain.hidden_sizes)


def check_size(net: Network, *, unroll_cap: int = UNROLL_CAP, hidden_cap: int = HIDDEN_CAP) -> None:
    """NotApplicable when the chain is too large for the dense LipSDP path."""
    entries, hidden = unrolled_size(net)
    if entries > unroll_cap or hidden > hidden_cap:
        raise NotApplicable(
            f"network too large for LipSDP ({hidden} hidden neurons, {entries} unrolled weight "
            f"entries; caps {hidden_cap} / {unroll_cap})",
            code="too-large-for-lipsdp",
        )


def choose_solver(name: str | None, dim: int) -> str:
    """The solver name to use for an LMI with ``dim`` rows after reduction."""
    if name:
        return name
    avail = available_solvers()
    if "structured" in avail:
        return "structured"
    if dim <= CLARABEL_MAX_DIM and "clarabel" in avail:
        return "clarabel"
    return "scs"


@dataclass(frozen=True)
class LmiOutcome:
    """A verified certificate for one LMI plus how it was obtained."""

    certificate: Certificate
    verified: bool
    notes: tuple[str, ...]
    timings: dict[str, float]
    solver: str | None
    solution: Solution | None


def _emit(progress: Progress | None, event: dict[str, Any]) -> None:
    if progress is not None:
        progress(event)


def _solve_and_certify(
    lmi: Lmi,
    variant: Variant,
    *,
    solver: str | None = None,
    timeout_s: float | None = None,
    progress: Progress | None = None,
    output_map: Array | None = None,
    network_hash: str = "",
) -> LmiOutcome:
    """Solve LipSDP for ``lmi`` and certify the multipliers on the original LMI."""
    notes: list[str] = []
    timings: dict[str, float] = {}
    meta: dict[str, Any] = {"variant": variant}
    solution: Solution | None = None
    used: str | None = None
    if lmi.depth == 0:
        t0 = time.perf_counter()
        rho = certify_rho(lmi, ())
        timings["verify_s"] = time.perf_counter() - t0
        notes.append("no hidden layer: the bound is the exact spectral norm of the affine map")
        mults: tuple[Array, ...] = ()
    elif (zero := first_zero_layer(lmi)) is not None:
        t0 = time.perf_counter()
        mults = zero_layer_multipliers(lmi, zero)
        rho = certify_rho(lmi, mults)
        timings["verify_s"] = time.perf_counter() - t0
        notes.append(f"weight matrix {zero} is zero: the network is constant, scaled certificate")
    else:
        _emit(progress, {"phase": "reduce"})
        t0 = time.perf_counter()
        problem = LipSdpProblem(lmi, variant)
        reduction = InputReduction(rel_tol=INPUT_RTOL)  # the one reduction of the chain
        inverse: dict[str, Any] | None = None
        if reduction.accepts(problem):
            problem, inverse = reduction.apply(problem)
            note = reduction.note(inverse)
            if note is not None:
                notes.append(note)
        timings["reduce_s"] = time.perf_counter() - t0
        used = choose_solver(solver, problem.lmi.input_size + sum(problem.lmi.hidden_sizes))
        meta["solver"] = used
        t1 = time.perf_counter()
        try:
            impl = get_solver(used)
            if not impl.available():
                raise SolverError(f"solver {used!r} is not available here", code="solver-missing")
            # tolerances are the solver's own defaults (default_eps)
            solution = impl.solve(problem, SolveOptions(timeout_s=timeout_s, progress=progress))
            if inverse is not None:
                solution = reduction.invert(solution, inverse)
            backend = solution.info.get("backend")
            if backend not in (None, "numpy"):
                notes.append(f"solver matrices on {backend}")
            if solution.info.get("backend_error"):
                notes.append(str(solution.info["backend_error"]))
        except SolverError as e:
            if solver:  # an explicitly requested solver that cannot run is the user's error
                raise
            notes.append(f"solver {used} failed: {e.detail}")
        timings["solve_s"] = time.perf_counter() - t1
        _emit(progress, {"phase": "verify"})
        t2 = time.perf_counter()
        if solution is not None and solution.multipliers is not None:
            if solution.status != "optimal":
                notes.append(f"solver status {solution.status}: multipliers certified anyway")
            rep = certify_multipliers(lmi, solution.multipliers)
            if rep.note != "verified solver multipliers":
                notes.append(rep.note)
            rho, mults = rep.rho, rep.multipliers
        else:
            status = "no answer" if solution is None else solution.status
            notes.append(f"solver gave no multipliers ({status}); layer-wise certificate used")
            mults = layerwise_multipliers(lmi)
            rho = certify_rho(lmi, mults)
        timings["verify_s"] = time.perf_counter() - t2
    cert = Certificate(
        rho=rho,
        multipliers=tuple(np.asarray(m, np.float64) for m in mults),
        output_map=None if output_map is None else np.atleast_2d(output_map),
        network_hash=network_hash,
        meta=meta,
    )
    verified = verify_certificate(lmi, cert)
    return LmiOutcome(cert, verified, tuple(notes), timings, used, solution)


def certify_lmi(
    lmi: Lmi,
    variant: Variant,
    *,
    solver: str | None = None,
    timeout_s: float | None = None,
    progress: Progress | None = None,
    output_map: Array | None = None,
    network_hash: str = "",
) -> LmiOutcome:
    """Solve LipSDP for ``lmi`` and certify the multipliers on the original LMI.

    Linear hidden layers (alpha = beta) are folded first (:mod:`sdp.bounds.linear_fold`); the
    folded solution is lifted back and certified on the original, unfolded LMI.
    """
    kw: dict[str, Any] = {
        "solver": solver,
        "timeout_s": timeout_s,
        "progress": progress,
        "output_map": output_map,
        "network_hash": network_hash,
    }
    fold = LinearFold()
    if not fold.accepts(lmi):
        return _solve_and_certify(lmi, variant, **kw)
    folded, kept = fold.apply(lmi)
    inner = _solve_and_certify(folded, variant, **kw)
    t0 = time.perf_counter()
    lifted = fold.lift(lmi, inner.certificate.multipliers, kept)
    notes = [*inner.notes, f"{lmi.depth - folded.depth} linear hidden layer(s) folded"]
    if lifted is None:
        notes.append("lifting failed; layer-wise certificate used")
        mults = layerwise_multipliers(lmi)
        lifted = (certify_rho(lmi, mults), mults)
    cert = Certificate(
        rho=lifted[0],
        multipliers=lifted[1],
        output_map=inner.certificate.output_map,
        network_hash=network_hash,
        meta={**inner.certificate.meta, "folded_linear_layers": lmi.depth - folded.depth},
    )
    timings = {**inner.timings, "lift_s": time.perf_counter() - t0}
    verified = verify_certificate(lmi, cert)
    return LmiOutcome(cert, verified, tuple(notes), timings, inner.solver, inner.solution)


def lipsdp_bound(
    net: Network,
    variant: Variant = "neuron",
    *,
    solver: str | None = None,
    timeout_s: float | None = None,
    progress: Progress | None = None,
) -> BoundResult:
    """Certified LipSDP bound sqrt(rho) of x -> logits for a chain network.

    Raises:
        NotApplicable: residual network or too large for the dense LipSDP path.
        SolverError: an explicitly named solver is unknown or not installed.
    """
    check_size(net)
    t0 = time.perf_counter()
    lmi = Lmi.from_chain(net.chain())
    out = certify_lmi(
        lmi,
        variant,
        solver=solver,
        timeout_s=timeout_s,
        progress=progress,
        network_hash=net.content_hash(),
    )
    out.certificate.meta["method"] = f"lipsdp-{variant}"
    timings = {**out.timings, "total_s": time.perf_counter() - t0}
    kind = "" if net.kind == "feedforward" else f" ({net.kind}: convolutions unrolled)"
    return BoundResult(
        value=out.certificate.lipschitz_bound,
        method=f"lipsdp-{variant}",
        verified=out.verified,
        certificate=out.certificate,
        timings=timings,
        notes=out.notes + ((f"LipSDP on the unrolled matrices{kind}",) if kind else ()),
        solver=out.solver,
    )


def pairwise_bounds(
    net: Network,
    variant: Variant = "neuron",
    *,
    solver: str | None = None,
    timeout_s: float | None = None,
    progress: Progress | None = None,
) -> tuple[Array, tuple[Certificate, ...], list[str]]:
    """Symmetric K x K matrix of verified bounds on Lip(f_y - f_j) (output row e_y - e_j).

    Each pair is its own LipSDP with output map P = (e_y - e_j)^T; the certificate stores P.
    ``timeout_s`` is the budget for all pairs together (split evenly over the remaining ones).
    """
    check_size(net)
    chain_lmi = Lmi.from_chain(net.chain())
    k = net.output_size
    mat = np.zeros((k, k))
    certs: list[Certificate] = []
    notes: list[str] = []
    pairs = [(y, j) for y in range(k) for j in range(y + 1, k)]
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    for n_done, (y, j) in enumerate(pairs):
        if deadline is not None:  # share the time budget over the remaining pairs
            timeout_s = max(deadline - time.monotonic(), 0.0) / (len(pairs) - n_done)
        row = np.zeros((1, k))
        row[0, y], row[0, j] = 1.0, -1.0
        out = certify_lmi(
            chain_lmi.with_output_map(row),
            variant,
            solver=solver,
            timeout_s=timeout_s,
            output_map=row,
            network_hash=net.content_hash(),
        )
        if not out.verified:
            raise LipcertError(f"pairwise certificate ({y},{j}) did not verify")
        out.certificate.meta.update({"method": f"lipsdp-{variant}", "pair": [y, j]})
        mat[y, j] = mat[j, y] = out.certificate.lipschitz_bound
        certs.append(out.certificate)
        notes.extend(n for n in out.notes if n not in notes)
        _emit(progress, {"phase": "pairwise", "done": n_done + 1, "total": len(pairs)})
    return mat, tuple(certs), notes
