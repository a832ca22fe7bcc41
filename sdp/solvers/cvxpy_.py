"""LipSDP through CVXPY in the block-tridiagonal form (design.md §3.2).

With blocks (x, z_1, ..., z_L), slope bounds a_j <= phi_j' <= b_j (per neuron) and
T_j = diag(t_j) >= 0, the LMI M(rho, T) <= 0 has the blocks

    M_00       = -rho I - 2 W_0^T diag(a_0 b_0 t_0) W_0
    M_jj       = -2 diag(t_{j-1}) - 2 W_j^T diag(a_j b_j t_j) W_j        (1 <= j < L)
    M_LL       = -2 diag(t_{L-1}) + W_L^T W_L
    M_{j+1,j}  = diag((a_j + b_j) t_j) W_j

(Fazlyab et al., "Efficient and Accurate Estimation of Lipschitz Constants for Deep Neural
Networks", NeurIPS 2019). The W^T diag(ab t) W terms vanish for ReLU-like slopes (a b = 0) and
are only built when needed; the matrix is assembled from blocks with ``cp.bmat`` and never as a
dense A^T T A of the whole stack. The solver's rho is diagnostic only: certification happens in
:mod:`sdp.certificate`.

Progress is reported per phase ("build", "solve"); SCS's iteration log is printed by the C
library on the process's stdout and is not parsed (no per-iteration events).
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import numpy as np

from sdp.errors import SolverError, UnknownSolver
from sdp.solvers.base import LipSdpProblem, Solution, SolveOptions, Status

_BACKENDS = {"scs": "SCS", "clarabel": "CLARABEL", "sdpa": "SDPA"}

STATUS_MAP: dict[str, Status] = {
    "optimal": "optimal",
    "optimal_inaccurate": "inaccurate",
    "infeasible": "infeasible",
    "infeasible_inaccurate": "infeasible",
    "unbounded": "error",
    "unbounded_inaccurate": "error",
    "user_limit": "timeout",
    "solver_error": "error",
    "infeasible_or_unbounded": "infeasible",
}
"""cvxpy status strings -> the canonical set of :mod:`sdp.solvers.base`."""


def build_problem(problem: LipSdpProblem, margin: float = 0.0) -> tuple[Any, Any, list[Any]]:
    """The CVXPY problem for ``problem``: returns (cp.Problem, rho variable, t expressions).

    ``margin`` > 0 asks for M(rho, T) <= -margin * I, so that a first-order solver's slightly
    infeasible answer is still feasible for M <= 0 when re-checked exactly.
    """
    import cvxpy as cp

    lmi = problem.lmi
    W, al, be = lmi.weights, lmi.alpha, lmi.beta
    L = lmi.depth
    rho = cp.Variable(nonneg=True, name="rho")
    constraints = []
    if problem.variant == "layer":
        lam = cp.Variable(L, nonneg=True, name="lambda")
        t = [lam[j] * np.ones(n) for j, n in enumerate(lmi.hidden_sizes)]
    else:
        tv = [cp.Variable(n, nonneg=True, name=f"t{j}") for j, n in enumerate(lmi.hidden_sizes)]
        t = list(tv)

    def wdw(j: int) -> Any:
        """W_j^T diag(a_j b_j t_j) W_j, or None when a_j b_j = 0 everywhere."""
        ab = al[j] * be[j]
        if not np.any(ab):
            return None
        return W[j].T @ cp.diag(cp.multiply(ab, t[j])) @ W[j]

    sizes = [lmi.input_size, *lmi.hidden_sizes]
    blocks: list[list[Any]] = [[None] * (L + 1) for _ in range(L + 1)]
    for j in range(L + 1):
        n = sizes[j]
        diag = -rho * np.eye(n) if j == 0 else -2 * cp.diag(t[j - 1])
        if j < L:
            extra = wdw(j)
            if extra is not None:
                diag = diag - 2 * extra
        else:
            diag = diag + W[L].T @ W[L]
        blocks[j][j] = diag
        if j < L:
            coupling = cp.diag(cp.multiply(al[j] + be[j], t[j])) @ W[j]  # M_{j+1,j}
            blocks[j + 1][j] = coupling
            blocks[j][j + 1] = coupling.T
    for i in range(L + 1):
        for j in range(L + 1):
            if blocks[i][j] is None:
                blocks[i][j] = np.zeros((sizes[i], sizes[j]))
    m = cp.bmat(blocks)
    sym = (m + m.T) / 2
    constraints.append(sym + margin * np.eye(sum(sizes)) << 0 if margin > 0 else sym << 0)
    return cp.Problem(cp.Minimize(rho), constraints), rho, t


SCS_EPS = 1e-6
"""SCS tolerance: 1e-6 lands within 0.03% of the published LipSDP values on the fixtures."""
INTERIOR_EPS = 1e-8
"""Clarabel / SDPA gap and feasibility tolerance."""
SCS_MAX_ITERS = 100_000


class CvxpySolver:
    """LipSDP via CVXPY with the backend ``scs`` (default), ``clarabel`` or ``sdpa``.

    Defaults it owns: ``default_eps`` (SCS_EPS for scs, INTERIOR_EPS otherwise) and, for
    scs, ``max_iters`` SCS_MAX_ITERS (clarabel and sdpa keep their own iteration limits).
    """

    variants = frozenset({"neuron", "layer"})

    def __init__(self, backend: str = "scs") -> None:
        if backend not in _BACKENDS:
            raise UnknownSolver(f"unknown CVXPY backend {backend!r}")
        self.backend = backend
        self.name = backend
        self.default_eps = SCS_EPS if backend == "scs" else INTERIOR_EPS

    def available(self) -> bool:
        try:
            import cvxpy as cp
        except ImportError:
            return False
        return _BACKENDS[self.backend] in cp.installed_solvers()

    def _solver_kwargs(self, options: SolveOptions) -> dict[str, Any]:
        kw: dict[str, Any] = {}
        eps = self.default_eps if options.eps is None else options.eps
        if self.backend == "scs":
            max_iters = SCS_MAX_ITERS if options.max_iters is None else options.max_iters
            kw.update(eps_abs=eps, eps_rel=eps, max_iters=max_iters)
            if options.timeout_s is not None:
                kw["time_limit_secs"] = float(options.timeout_s)
        elif self.backend == "clarabel":
            kw.update(tol_gap_abs=eps, tol_gap_rel=eps, tol_feas=eps)
            if options.max_iters is not None:
                kw["max_iter"] = options.max_iters
            if options.timeout_s is not None:
                kw["time_limit"] = float(options.timeout_s)
        return kw

    def solve(self, problem: LipSdpProblem, options: SolveOptions) -> Solution:
        """Solve LipSDP; multipliers are per neuron (a layer variant is expanded)."""
        import cvxpy as cp

        if problem.variant not in self.variants:
            raise SolverError(f"variant {problem.variant!r} not supported", code="solver-variant")
        if options.progress:
            options.progress({"phase": "build", "solver": self.name})
        t0 = time.perf_counter()
        prob, rho, t = build_problem(problem)
        build_s = time.perf_counter() - t0
        if options.progress:
            options.progress({"phase": "solve", "solver": self.name, "build_s": build_s})
        t1 = time.perf_counter()
        try:
            with warnings.catch_warnings():  # "may be inaccurate": the status says it already
                warnings.simplefilter("ignore", UserWarning)
                prob.solve(solver=_BACKENDS[self.backend], **self._solver_kwargs(options))
        except cp.error.SolverError as e:
            return Solution(
                status="error",
                multipliers=None,
                solve_s=time.perf_counter() - t1,
                info={"error": str(e), "build_s": build_s},
            )
        solve_s = time.perf_counter() - t1
        status: Status = STATUS_MAP.get(str(prob.status), "error")
        timed_out = options.timeout_s is not None and solve_s >= 0.98 * options.timeout_s
        if timed_out and status != "optimal":
            status = "timeout"
        mults: tuple[np.ndarray, ...] | None = None
        try:
            vals = [np.asarray(ti.value, dtype=np.float64).ravel() for ti in t]
            if all(v.size == n for v, n in zip(vals, problem.lmi.hidden_sizes, strict=True)):
                mults = tuple(vals)
        except (TypeError, ValueError):
            mults = None
        stats = prob.solver_stats
        return Solution(
            status=status,
            multipliers=mults,
            rho=None if rho.value is None else float(rho.value),
            iterations=int(stats.num_iters or 0) if stats is not None else 0,
            solve_s=solve_s,
            info={"cvxpy_status": str(prob.status), "build_s": build_s},
        )
