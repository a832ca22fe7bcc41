"""Solver registry: every LipSDP solver behind the tiny :class:`~sdp.solvers.base.Solver` protocol.

Solver instances are made on first use; the CVXPY front-ends import cvxpy itself (about a
second) only when they run, so importing this registry stays cheap::

    SOLVERS            name -> Solver instance (filled on first use)
    get_solver(name)   the solver, or SolverError (unknown / not installed)
    available_solvers() names whose ``available()`` is True right now

Built-in names: "scs", "clarabel", "sdpa" (CVXPY front-ends, :mod:`sdp.solvers.cvxpy_`) and
"structured" (:class:`~sdp.solvers.structured.StructuredSolver`, numpy/scipy only).
"""

from __future__ import annotations

from collections.abc import Callable

from sdp.errors import SolverError, UnknownSolver
from sdp.solvers.base import LipSdpProblem, Solution, SolveOptions, Solver
from sdp.solvers.cvxpy_ import CvxpySolver
from sdp.solvers.structured import StructuredSolver

SOLVERS: dict[str, Solver] = {}
"""Instantiated solvers by name (populated lazily by :func:`get_solver`)."""


def _cvxpy(backend: str) -> Callable[[], Solver]:
    def make() -> Solver:
        return CvxpySolver(backend)

    return make


def _structured() -> Solver:
    return StructuredSolver()


_FACTORIES: dict[str, Callable[[], Solver]] = {
    "scs": _cvxpy("scs"),
    "clarabel": _cvxpy("clarabel"),
    "sdpa": _cvxpy("sdpa"),
    "structured": _structured,
}


def register_solver(name: str, factory: Callable[[], Solver]) -> None:
    """Register (or replace) a solver factory under ``name``; instantiated on first use."""
    _FACTORIES[name] = factory
    SOLVERS.pop(name, None)


def solver_names() -> list[str]:
    """Every registered name (available or not)."""
    return sorted(_FACTORIES)


def get_solver(name: str) -> Solver:
    """The solver registered as ``name``.

    Raises:
        UnknownSolver: unknown name (a SolverError with code ``solver-unknown``).
        SolverError: the solver cannot be imported (code ``solver-missing``).
    """
    if name in SOLVERS:
        return SOLVERS[name]
    factory = _FACTORIES.get(name)
    if factory is None:
        raise UnknownSolver(f"unknown solver {name!r} (known: {', '.join(solver_names())})")
    try:
        solver = factory()
    except ImportError as e:
        raise SolverError(f"solver {name!r} is not installed: {e}", code="solver-missing") from e
    SOLVERS[name] = solver
    return solver


def available_solvers() -> list[str]:
    """Names of the registered solvers that can run here (imports succeed, backend present)."""
    names = []
    for name in solver_names():
        try:
            if get_solver(name).available():
                names.append(name)
        except SolverError:
            continue
    return names


__all__ = [
    "SOLVERS",
    "LipSdpProblem",
    "Solution",
    "SolveOptions",
    "Solver",
    "available_solvers",
    "get_solver",
    "register_solver",
    "solver_names",
]
