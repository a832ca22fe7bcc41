"""Certified Lipschitz bounds: naive, compositional, LipSDP, sandwich; empirical lower bounds."""

from sdp.bounds.compute import METHODS, compute_bound
from sdp.bounds.lipsdp import lipsdp_bound, pairwise_bounds
from sdp.bounds.lower import empirical_lower_bound
from sdp.bounds.naive import naive_bound
from sdp.bounds.result import BoundResult

__all__ = [
    "METHODS",
    "BoundResult",
    "compute_bound",
    "empirical_lower_bound",
    "lipsdp_bound",
    "naive_bound",
    "pairwise_bounds",
]
