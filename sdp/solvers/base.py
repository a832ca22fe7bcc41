"""The tiny solver protocol shared by the CVXPY path and the structured fast path.

A solver proposes multipliers T; it never certifies anything. Its ``rho`` is kept only for
diagnostics: :func:`sdp.certificate.certify_multipliers` turns T into the reported bound.
Statuses map onto a small canonical set (cvxpy's ``STATUS_MAP`` idea).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from sdp.certificate import Lmi
from sdp.ir import Array

Variant = Literal["neuron", "layer"]
Status = Literal["optimal", "inaccurate", "infeasible", "timeout", "cancelled", "error"]
Progress = Callable[[dict[str, Any]], None]
"""Progress callback, e.g. {"phase": "solve", "iteration": 40, "residual": 1e-5}."""


@dataclass(frozen=True, eq=False)
class LipSdpProblem:
    """LipSDP for ``lmi`` (already input-reduced and output-mapped as desired).

    ``variant="neuron"``: one multiplier per hidden neuron; ``"layer"``: one per layer.
    ``input_reduced``: the input block was already reduced (``sdp.bounds.reduction``), so a
    solver that would reduce it itself does not do it a second time.
    """

    lmi: Lmi
    variant: Variant = "neuron"
    input_reduced: bool = False


@dataclass(frozen=True)
class SolveOptions:
    """What every solver takes (cvxpy's ``solve(...)`` arguments, typed).

    ``eps`` and ``max_iters`` None mean the solver's own default (each solver documents its
    ``default_eps``, ``default_max_iters``); a value given is honoured, never silently capped.
    ``cancelled``: polled by solvers that can stop early (True stops the solve, which then
    returns its best multipliers with status "cancelled"). Solver-specific tuning is typed and
    belongs to the solver (e.g. :class:`sdp.solvers.structured.StructuredSolver`'s ``tuning``).
    """

    timeout_s: float | None = None
    eps: float | None = None
    max_iters: int | None = None
    progress: Progress | None = None
    warm_start: tuple[Array, ...] | None = None
    cancelled: Callable[[], bool] | None = None

    def __post_init__(self) -> None:
        if self.eps is not None and not self.eps > 0:
            raise ValueError(f"eps must be > 0, got {self.eps!r}")
        if self.max_iters is not None and self.max_iters < 1:
            raise ValueError(f"max_iters must be >= 1, got {self.max_iters!r}")
        if self.timeout_s is not None and not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s!r}")


@dataclass(frozen=True, eq=False)
class Solution:
    """A solver's proposal: ``multipliers[i]`` = diag(T_i) of hidden layer i, per neuron."""

    status: Status
    multipliers: tuple[Array, ...] | None
    rho: float | None = None
    iterations: int = 0
    solve_s: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Solver(Protocol):
    name: str
    variants: frozenset[str]

    def available(self) -> bool: ...

    def solve(self, problem: LipSdpProblem, options: SolveOptions) -> Solution: ...
