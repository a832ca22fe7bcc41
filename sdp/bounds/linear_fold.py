"""Fold linear hidden layers (alpha = beta, e.g. identity) before solving LipSDP.

A layer whose slope bounds coincide, a_k = b_k = c (per neuron), is linear: z_{k+1} = c * v_k.
Its LipSDP constraint -2 (dw - c dv)^T T (dw - c dv) >= 0 is only an equality in the limit
T -> infinity, so the SDP has no minimiser and solvers stall. ``apply`` merges such a layer into
its neighbours, W_{k+1} diag(c) W_k (the same function), and the folded LMI is solved.
``lift`` maps the folded multipliers back to the ORIGINAL LMI by giving every folded layer a
large multiplier s (rho(T) decreases to the folded optimum as s grows) and certifying each
candidate with :func:`sdp.certificate.certify_rho` on the original LMI; the best verified one
is kept. Certificates therefore always refer to the unfolded network.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sdp.certificate import Lmi, certify_rho
from sdp.errors import CertificateError
from sdp.ir import Array


def linear_layers(lmi: Lmi) -> list[int]:
    """Hidden layers whose slope bounds coincide for every neuron."""
    return [k for k in range(lmi.depth) if np.array_equal(lmi.alpha[k], lmi.beta[k])]


@dataclass(frozen=True)
class LinearFold:
    """Reversible reduction: remove linear hidden layers by merging them into the next one."""

    def accepts(self, lmi: Lmi) -> bool:
        return bool(linear_layers(lmi))

    def apply(self, lmi: Lmi) -> tuple[Lmi, list[int]]:
        """The folded LMI and the indices of the original hidden layers it keeps."""
        lin = set(linear_layers(lmi))
        weights: list[Array] = []
        alpha: list[Array] = []
        beta: list[Array] = []
        kept: list[int] = []
        pending = lmi.weights[0]
        for k in range(lmi.depth):
            if k in lin:
                pending = lmi.weights[k + 1] @ (lmi.alpha[k][:, None] * pending)
            else:
                weights.append(pending)
                alpha.append(lmi.alpha[k])
                beta.append(lmi.beta[k])
                kept.append(k)
                pending = lmi.weights[k + 1]
        weights.append(pending)
        return Lmi(tuple(weights), tuple(alpha), tuple(beta)), kept

    def lift(
        self, original: Lmi, folded_t: tuple[Array, ...], kept: list[int]
    ) -> tuple[float, tuple[Array, ...]] | None:
        """Best verified (rho, T) on the original LMI over a range of multipliers s."""
        scale = max(
            [1.0, *(float(np.max(t, initial=0.0)) for t in folded_t)]
            + [float(np.linalg.norm(w, 2)) ** 2 for w in original.weights]
        )
        best: tuple[float, tuple[Array, ...]] | None = None
        for factor in (1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8):
            t = [np.full(n, scale * factor) for n in original.hidden_sizes]
            for k, tk in zip(kept, folded_t, strict=True):
                t[k] = np.asarray(tk, dtype=np.float64)
            try:
                rho = certify_rho(original, t)
            except CertificateError:
                continue
            if best is None or rho < best[0]:
                best = (rho, tuple(t))
        return best
