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
    """

    lmi: Lmi
    variant: Variant = "neuron"


@dataclass(frozen=True)
class SolveOptions:
    timeout_s: float | None = None
    eps: float = 1e-7
    max_iters: int = 100_000
    progress: Progress | None = None
    warm_start: tuple[Array, ...] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


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
