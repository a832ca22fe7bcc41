"""One validation plan for a bound request, shared by :func:`sdp.bounds.compute_bound` and
the service's bounds route (which runs it before queuing a job, so a request that the job
would refuse is answered at once, with the same error).

:func:`check_bound_request` refuses, in this order: the unsound ``lipsdp-network`` variant and
unknown methods (:class:`~sdp.errors.UnsupportedMethod`), unknown solver names
(:class:`~sdp.errors.UnknownSolver`), and methods that cannot run on this network
(:class:`~sdp.errors.NotApplicable`: sandwich without sandwich parameters, LipSDP or pairwise
bounds on a residual network or on a chain too large for LipSDP; eclipse-fast on a residual
network or a chain with a hidden layer too wide, or too large for eclipse; eclipse-refined on
a residual network or a chain over its caps; lipsdp-dag on a network whose dense LMI blocks
would be too large).
"""

from __future__ import annotations

from sdp.bounds.eclipse import SDP_HIDDEN_CAP, SDP_WIDTH_CAP, check_eclipse_size
from sdp.bounds.eclipse_refine import check_refine_size
from sdp.bounds.lipsdp import check_size
from sdp.bounds.residual import check_dag_size
from sdp.errors import NotApplicable, UnknownSolver, UnsupportedMethod
from sdp.ir import Network
from sdp.solvers import solver_names

METHODS = (
    "auto",
    "naive",
    "lipsdp-layer",
    "lipsdp-neuron",
    "eclipse-fast",
    "eclipse",
    "eclipse-refined",
    "sandwich",
    "lipsdp-dag",
)
"""The bound methods offered (``lipsdp-network`` is refused, see :func:`check_method`)."""


def check_method(method: str) -> None:
    """UnsupportedMethod for ``lipsdp-network`` and for names outside :data:`METHODS`.

    ``lipsdp-network`` couples multipliers between neuron pairs, which is unsound
    (counterexample: Pauli, Koch, Berberich, Kohler, Allgower, "Training robust neural
    networks using Lipschitz bounds", IEEE L-CSS 2021).
    """
    if method == "lipsdp-network":
        raise UnsupportedMethod(
            "lipsdp-network is not offered: coupling multipliers between neuron pairs is "
            "unsound (counterexample: Pauli et al., IEEE L-CSS 2021); use lipsdp-neuron"
        )
    if method not in METHODS:
        raise UnsupportedMethod(f"unknown method {method!r} (choose from {', '.join(METHODS)})")


def check_solver(solver: str | None) -> None:
    """UnknownSolver when ``solver`` names no registered solver (None: the default)."""
    if solver is not None and solver not in solver_names():
        raise UnknownSolver(f"unknown solver {solver!r} (known: {', '.join(solver_names())})")


def check_applicable(net: Network, method: str, pairwise: bool) -> None:
    """NotApplicable when ``method`` (or pairwise bounds) cannot run on ``net``."""
    if method == "sandwich" and net.sandwich is None:
        raise NotApplicable("not a sandwich network (no sandwich parameters)")
    lipsdp = method in ("lipsdp-neuron", "lipsdp-layer")
    if (lipsdp or pairwise) and not net.is_chain:
        raise NotApplicable(
            "LipSDP and pairwise bounds need a chain; this residual network is bounded "
            "compositionally (method naive or auto)"
        )
    if method == "eclipse-fast":
        check_eclipse_size(net)
    if method == "eclipse":
        check_eclipse_size(net, width_cap=SDP_WIDTH_CAP, hidden_cap=SDP_HIDDEN_CAP)
    if method == "eclipse-refined":
        check_refine_size(net)
    if method == "lipsdp-dag":
        check_dag_size(net)
    if lipsdp or pairwise:
        check_size(net)


def check_bound_request(
    net: Network, method: str, *, pairwise: bool = False, solver: str | None = None
) -> None:
    """The whole plan: method, solver, then applicability to ``net`` (module docstring)."""
    check_method(method)
    check_solver(solver)
    check_applicable(net, method, pairwise)
