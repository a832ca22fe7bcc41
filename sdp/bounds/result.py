"""The result type every bound method returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sdp.certificate import Certificate
from sdp.ir import Array


@dataclass(frozen=True, eq=False)
class BoundResult:
    """A certified l2 Lipschitz upper bound of x -> logits.

    ``value`` may be reported only when ``verified`` is True: it was checked by
    :mod:`sdp.certificate` (LipSDP, sandwich) or is a product of rigorous norm bounds (naive,
    compositional). ``method`` names what produced the number (after any fallback), and
    ``notes`` say why a fallback happened. ``pairwise[y, j]`` bounds Lip(f_y - f_j).
    """

    value: float
    method: str
    verified: bool
    certificate: Certificate | None = None
    timings: dict[str, float] = field(default_factory=dict)
    lower_bound: float | None = None
    notes: tuple[str, ...] = ()
    pairwise: Array | None = None
    pairwise_certificates: tuple[Certificate, ...] = ()
    solver: str | None = None
    requested_method: str | None = None

    @property
    def gap_ratio(self) -> float | None:
        """upper / lower (>= 1 when both are sound); None without a lower bound."""
        if not self.lower_bound:
            return None
        return self.value / self.lower_bound

    def summary(self) -> dict[str, Any]:
        """JSON-ready summary (the CLI ``--json`` and HTTP contract keys, design.md §5)."""
        return {
            "lipschitz_bound": self.value,
            "method": self.method,
            "requested_method": self.requested_method or self.method,
            "verified": self.verified,
            "solve_time_s": self.timings.get("solve_s", self.timings.get("total_s", 0.0)),
            "timings": dict(self.timings),
            "lower_bound": self.lower_bound,
            "gap_ratio": self.gap_ratio,
            "notes": list(self.notes),
            "solver": self.solver,
            "pairwise": None if self.pairwise is None else np.asarray(self.pairwise).tolist(),
            "certificate": None
            if self.certificate is None
            else {"rho": self.certificate.rho, "layers": len(self.certificate.multipliers)},
        }
