"""Certified Lipschitz bounds: naive, compositional, LipSDP, sandwich; empirical lower bounds.

Re-exported lazily (PEP 562), so that importing one bound module (``sdp.bounds.naive`` from
:mod:`sdp.rounding`) does not load the solver registry behind ``compute_bound``.
"""

from typing import TYPE_CHECKING

from sdp._lazy import lazy_exports

if TYPE_CHECKING:
    from sdp.bounds.compute import compute_bound
    from sdp.bounds.lipsdp import lipsdp_bound, pairwise_bounds
    from sdp.bounds.lower import empirical_lower_bound
    from sdp.bounds.naive import naive_bound
    from sdp.bounds.plan import METHODS
    from sdp.bounds.result import BoundResult

_EXPORTS = {
    "METHODS": "sdp.bounds.plan",
    "compute_bound": "sdp.bounds.compute",
    "lipsdp_bound": "sdp.bounds.lipsdp",
    "pairwise_bounds": "sdp.bounds.lipsdp",
    "empirical_lower_bound": "sdp.bounds.lower",
    "naive_bound": "sdp.bounds.naive",
    "BoundResult": "sdp.bounds.result",
}

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = [
    "METHODS",
    "BoundResult",
    "compute_bound",
    "empirical_lower_bound",
    "lipsdp_bound",
    "naive_bound",
    "pairwise_bounds",
]
