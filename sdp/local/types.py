"""Public data types of local certification (the contract of docs / LOCAL_CONTRACT)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np

from sdp.ir import Array, Network

LocalMethodName = Literal["ibp", "crown", "alpha-crown", "sdp-crown", "bab", "beta-crown", "auto"]


@dataclass(frozen=True, eq=False)
class LocalCertificate:
    """What certified one input at radius ``epsilon`` (enough for :func:`verify_local`).

    Claim: for every x with ||x - x0||_2 <= epsilon (closed ball), and for the network as
    imported (float64 weights as exact reals), f_y(x) - f_j(x) >= lower_bounds[j] > 0 for every
    j != y = ``prediction`` (``lower_bounds[y]`` is +inf). For ``method == "global"`` the claim
    is the global one, on the OPEN ball of radius epsilon <= margin / (sqrt 2 L) with
    ``global_bound`` L (whose own LipSDP certificate is checked by :mod:`sdp.certificate`).
    ``method == "none"`` certifies nothing (epsilon 0).

    ``alphas`` holds (act node index, (K, n) lower slopes) for alpha-CROWN, rows indexed by j
    (row y unused); ``payload`` is free-form data of a method registered by another module.
    """

    method: str
    epsilon: float
    prediction: int
    network_hash: str
    input_hash: str
    lower_bounds: Array | None = None
    alphas: tuple[tuple[int, Array], ...] = ()
    global_bound: float | None = None
    payload: tuple[tuple[str, Array], ...] = ()


@dataclass(frozen=True, eq=False)
class LocalResult:
    """Per-input results, arrays of length B (inputs in the IR layout, float64).

    ``radius[i]``: every x with ||x - x0_i||_2 < radius[i] keeps ``prediction[i]`` (and the
    closed ball of that radius too when ``radius_method[i]`` is a local method).
    """

    prediction: np.ndarray
    margin: Array
    radius: Array
    radius_method: tuple[str, ...]
    global_radius: Array
    epsilon: Array | None
    certified: np.ndarray | None
    correct: np.ndarray | None
    certificates: tuple[LocalCertificate, ...]


@dataclass(frozen=True, eq=False)
class SlopeProblem:
    """Data for an external optimiser of alpha-CROWN lower slopes (e.g. torch on a GPU).

    Maximise, for every input b and row r, the CROWN lower bound of objective[b, r] . f(x) over
    ||x - x0[b]||_2 <= eps[b] with the pre-activation bounds ``pre_lower/pre_upper`` of the
    activation nodes ``act_nodes`` (graph node ids, in forward order), over lower slopes in
    [alpha_min, alpha_max] of the neurons in ``alpha_mask`` (other neurons: ``alpha_init``).
    """

    net: Network
    x0: Array  # (B, n0)
    eps: Array  # (B,)
    objective: Array  # (B, m, K)
    act_nodes: tuple[int, ...]
    pre_lower: tuple[Array, ...]  # (B, n) per act node
    pre_upper: tuple[Array, ...]
    alpha_init: tuple[Array, ...]  # (B, m, n) per act node
    alpha_mask: tuple[np.ndarray, ...]  # (B, n) per act node
    alpha_min: tuple[float, ...]
    alpha_max: tuple[float, ...]


class SlopeOptimizer(Protocol):
    """Returns candidate alphas (one (B, m, n) array per ``problem.act_nodes`` entry); sdp
    clips them to their ranges and recomputes the bound rigorously (never trusts them)."""

    def __call__(self, problem: SlopeProblem) -> Sequence[Array]: ...
