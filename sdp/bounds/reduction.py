"""Reversible LipSDP problem reductions (cvxpy's ``Reduction`` shape: accepts/apply/invert).

Input reduction (design.md §3.2). f depends on x only through W_0 x. With the thin SVD
W_0 = U S V^T of rank r, replacing W_0 by U S (n_1 x r) gives a network g with f(x) = g(V^T x),
V^T a co-isometry, so Lip(f) = Lip(g); in the LMI the input block becomes V Q V^T, whose largest
eigenvalue equals that of Q (clipped at 0), so the SDP optimum is unchanged too. A wide W_0 is
reduced to R^T of the QR factorisation W_0^T = Q R instead when no singular value is to be
dropped (the same argument with Q for V; :func:`sdp.solvers._lmi_structure.reduce_input_by`).
The multipliers T act on hidden neurons only and are the same for both problems: ``invert``
returns them as is, and verification always runs on the ORIGINAL, unreduced LMI.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from sdp.solvers._lmi_structure import reduce_input_by
from sdp.solvers.base import LipSdpProblem, Solution


@dataclass(frozen=True)
class InputReduction:
    """Replace W_0 (n_1 x n_0) by R^T (QR) or U S (SVD), n_1 x r, when r < n_0.

    ``rel_tol`` > 0 drops singular values s_i <= rel_tol * s_max (which changes the network
    when such an s_i is nonzero). The default 0 drops nothing, not even exact zeros: r is
    always min(n_0, n_1) = n_1 (the reduction only applies when n_0 > n_1), so the reduced
    problem is exactly the original one.
    """

    rel_tol: float = 0.0

    def accepts(self, problem: LipSdpProblem) -> bool:
        w0 = problem.lmi.weights[0]
        return problem.lmi.depth > 0 and w0.shape[1] > w0.shape[0]

    def apply(self, problem: LipSdpProblem) -> tuple[LipSdpProblem, dict[str, Any]]:
        """The reduced problem (marked ``input_reduced``: solvers do not reduce it again).

        The inverse data name the sizes and the factorisation used ("qr", "svd" or "none")."""
        reduced, how = reduce_input_by(problem.lmi, rtol=self.rel_tol)
        inverse = {
            "input_size": problem.lmi.input_size,
            "rank": reduced.input_size,
            "factorisation": how,
        }
        return replace(problem, lmi=reduced, input_reduced=True), inverse

    def invert(self, solution: Solution, inverse_data: dict[str, Any]) -> Solution:
        """T is unchanged by the reduction; rho (diagnostic) is unchanged too."""
        info = {**solution.info, "input_reduction": dict(inverse_data)}
        return replace(solution, info=info)

    def note(self, inverse_data: dict[str, Any]) -> str | None:
        """What was done, for the result's notes (None when W_0 was kept)."""
        sizes = f"{inverse_data['input_size']} -> {inverse_data['rank']} inputs"
        if inverse_data["factorisation"] == "qr":
            return f"exact QR input reduction {sizes} (W_0 = R^T Q^T, nothing dropped)"
        if inverse_data["factorisation"] == "svd":  # only with rel_tol > 0 (else R^T is kept)
            rule = f"singular values <= {self.rel_tol:g} s_max dropped"
            return f"SVD input reduction {sizes} ({rule})"
        return None
