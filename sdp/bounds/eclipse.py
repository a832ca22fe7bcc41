"""``eclipse-fast``: LipSDP-Neuron multipliers chosen layer by layer in closed form, then certified.

Reference: Y. Xu and S. Sivaranjani, "ECLipsE: Efficient Compositional Lipschitz Constant
Estimation for Deep Neural Networks", NeurIPS 2024 (the idea: the LipSDP LMI of a chain is
block tridiagonal, so it is feasible iff a sequence of per-layer Schur complements stays
positive definite; choosing the multipliers of one layer at a time makes the cost linear in
depth). The derivation below is ours, in the notation of :mod:`sdp.certificate` (design.md §3.2).

Derivation. -M(rho, T) is block tridiagonal over (x, z_1, ..., z_L) with, for D_j =
diag(a_j b_j), C_j = diag(a_j + b_j) W_j and T_j = diag(t_j),

    (-M)_00 = rho I + 2 W_0^T D_0 T_0 W_0,   (-M)_jj = 2 T_{j-1} + 2 W_j^T D_j T_j W_j,
    (-M)_LL = 2 T_{L-1} - W_L^T W_L,          (-M)_{j+1,j} = -T_j C_j.

Block Gaussian elimination from the input: -M >= 0 with every leading block > 0 iff

    P_0 = (-M)_00 > 0,  P_{j+1} = (-M)_{j+1,j+1} - T_j C_j P_j^{-1} C_j^T T_j > 0  (j < L-1),
    P_L = 2 T_{L-1} - T_{L-1} C_{L-1} P_{L-1}^{-1} C_{L-1}^T T_{L-1} - W_L^T W_L >= 0.

Scaling: (rho, T) -> (k rho, k T) scales every P_j (without the -W_L^T W_L term) by k. So run
the recursion at rho = 1 (P'_j), and at the end the smallest k with k P'_L >= W_L^T W_L is
k* = lambda_max(W_L P'_L^{-1} W_L^T); then (rho, T) = (k*, k* T') satisfies the LMI.

Closed-form stage choice (ECLipsE-Fast's idea: a scalar multiplier per layer, t_j = tau_j 1).
With K_j = C_j P_j^{-1} C_j^T (P_j including its own 2 W_j^T D_j T_j W_j term, which is >= 0 for
a_j b_j >= 0, so it only helps) the next Schur complement is P'_{j+1} = 2 tau I - tau^2 K_j +
(layer j+1's own term). Its guaranteed smallest eigenvalue 2 tau - tau^2 lambda_max(K_j) is
largest at tau_j = 1 / lambda_max(K_j), giving P'_{j+1} >= tau_j I > 0: every stage stays
feasible by construction, whatever the depth. tau_j is picked from P_j without the layer's own
term (that term needs tau_j); K_j is then recomputed with it. a_j b_j < 0 (slopes of both signs)
is refused: the own term would be indefinite.

ECLipsE (method ``eclipse``): the stage instead solves a small SDP for one multiplier per
neuron, looking one layer ahead: with G = C_{j+1}^T C_{j+1} (W_L^T W_L at the last stage),
maximise gamma s.t. [[P_j + 2 W_j^T D_j T_j W_j, C_j^T T_j], [T_j C_j, 2 T_j - gamma G]] >= 0,
i.e. (Schur complement) P_{j+1} >= gamma G: the next Schur complement is made large where the
next layer amplifies. It is solved on unit-norm data (P_j shrinks geometrically with depth),
with a small ridge on G (so gamma > 0 gives P_{j+1} > 0) and the answer shrunk by 0.99 (strict
margin); a stage whose solver fails, or whose next P is not positive definite, takes the
closed-form choice instead. Tighter than the closed form on the nets we tried, but one SDP per
layer: capped to small chains (SDP_WIDTH_CAP).

Scaling, again. For fixed T' the smallest rho with M(rho, k T') <= 0 is a convex function of k
(often well below k* at some k > k*: the hidden blocks get slack); it is minimised over k by a
grid and golden section, every point certified (:func:`_best_scaling`).

Verification. None of these floating-point numbers is trusted: the multipliers k T' go
through :func:`sdp.certificate.certify_rho`, which factorises the whole LMI backwards with
rigorous float margins (block Cholesky over the same block-tridiagonal structure:
O(sum n_j^3), linear in depth) and returns the certified rho.
The reported bound is sqrt(certified rho), with the certificate attached.
"""

from __future__ import annotations

import math
import time

import numpy as np
from scipy import linalg

from sdp.bounds.golden import golden_section
from sdp.bounds.lipsdp import UNROLL_CAP, unrolled_size
from sdp.bounds.result import BoundResult
from sdp.certificate import Certificate, Lmi, certify_rho, verify_certificate
from sdp.errors import CertificateError, LipcertError, NotApplicable
from sdp.ir import Array, Network

WIDTH_CAP = 4_096
"""Refuse eclipse-fast when a hidden layer is wider than this (cost ~ width^3 per layer)."""
SDP_WIDTH_CAP, SDP_HIDDEN_CAP = 64, 1_000
"""Refuse ``eclipse`` (one CVXPY + Clarabel SDP per layer: about 1-5 s per layer of 30 neurons
on one loaded core, growing steeply with width) beyond these sizes; eclipse-fast has no such
cap."""
SCALE_GRID = tuple(sorted({*(2.0**e for e in range(-8, 9)), 1 + 1e-6, 1 + 1e-4, 1 + 1e-2}))
"""The scalings k = f k* of T' tried first (then refined by golden section around the best);
the points just above k* catch a minimum at the feasibility edge (typical of deep chains)."""
STAGE_SHRINK = 0.99
"""The SDP stage's multipliers are scaled by this: P(θT) - θ P(T) = θ(1-θ) T K T >= 0, so the
next Schur complement keeps a strict margin even when the solver's answer is on the boundary."""
STAGE_RIDGE = 1e-3
"""The SDP stage's target G_{j+1} (unit norm) plus this times I: keeps its optimum interior."""
GOLDEN_STEPS = 16
"""Golden-section steps on log k around the best grid point."""


def check_eclipse_size(
    net: Network, *, width_cap: int = WIDTH_CAP, hidden_cap: int | None = None
) -> None:
    """NotApplicable unless ``net`` is a chain small enough to unroll with layers <= width_cap
    (and at most ``hidden_cap`` hidden neurons in all, when given)."""
    if not net.is_chain:
        raise NotApplicable(
            "ECLipsE bounds need a chain; this residual network is bounded compositionally "
            "(method naive or auto)"
        )
    entries, hidden = unrolled_size(net)
    widest = max(net.chain().hidden_sizes, default=0)
    if entries > UNROLL_CAP or widest > width_cap or (hidden_cap and hidden > hidden_cap):
        raise NotApplicable(
            f"network too large for this ECLipsE variant (widest hidden layer {widest}, "
            f"{hidden} hidden neurons, {entries} unrolled weight entries; caps {width_cap} / "
            f"{hidden_cap or 'none'} / {UNROLL_CAP})",
            code="too-large-for-eclipse",
        )


def _gain(p: Array, c: Array) -> Array:
    """K = C P^{-1} C^T via the Cholesky factor of P (P > 0 by construction)."""
    r = linalg.cholesky(p, lower=False)
    y = linalg.solve_triangular(r, c.T, trans="T", lower=False)
    return y.T @ y


def _lam_max(k: Array) -> float:
    n = k.shape[0]
    return float(linalg.eigvalsh(k, subset_by_index=[n - 1, n - 1])[0]) if n else 0.0


def _stage_fast(p: Array, c: Array, own: Array, g: Array) -> Array:
    """ECLipsE-Fast's stage: t = 1 / lambda_max(C P^{-1} C^T), one scalar for the layer."""
    del own, g
    lam = _lam_max(_gain(p, c))
    tau = 1.0 / lam if lam > 0 and math.isfinite(lam) else 1.0
    return np.full(c.shape[0], tau)


def _stage_sdp(p: Array, c: Array, own: Array, g: Array) -> Array:
    """ECLipsE's stage (a small SDP, one multiplier per neuron; module docstring, "ECLipsE").

    maximise gamma s.t. [[P + 2 W^T D T W, C^T T], [T C, 2T - gamma G]] >= 0, T = diag(t) >= 0,
    on the data scaled to unit norm (P_j shrinks geometrically with depth); the solver's t is
    shrunk by STAGE_SHRINK so the next Schur complement is strictly positive definite.
    Falls back to the closed-form stage if the solver fails.
    """
    import cvxpy as cp  # heavy import, as in sdp.solvers.cvxpy_: only when this stage runs

    n = c.shape[0]
    sp = float(np.abs(p).max()) or 1.0
    sg = float(np.abs(g).max()) or 1.0
    g = g / sg + STAGE_RIDGE * np.eye(n)  # G + ridge > 0, so gamma > 0 makes P_{j+1} > 0
    t = cp.Variable(n, nonneg=True)
    gamma = cp.Variable()
    tc = cp.multiply(t[:, None], c / 1.0)
    top = p / sp + 2 * own.T @ cp.diag(t) @ own / sp if np.any(own) else p / sp
    lmi = cp.bmat([[top, tc.T], [tc, 2 * cp.diag(t) - gamma * g]])
    prob = cp.Problem(cp.Maximize(gamma), [(lmi + lmi.T) / 2 >> 0, t <= 1e6])
    try:
        prob.solve(solver="CLARABEL")
    except cp.error.SolverError:
        return _stage_fast(p, c, own, g)
    if t.value is None or prob.status not in ("optimal", "optimal_inaccurate"):
        return _stage_fast(p, c, own, g)
    tv = np.clip(np.asarray(t.value, np.float64), 0.0, None) * STAGE_SHRINK * sp
    if not np.all(tv > 0) or not _next_pd(p, c, own, tv):
        return _stage_fast(p, c, own, g)
    return tv


def _next_pd(p: Array, c: Array, own: Array, t: Array) -> bool:
    """Whether the stage with multipliers t keeps the next Schur complement positive definite."""
    try:
        p_own = p + 2 * (own.T * t) @ own
        nxt = -_gain(p_own, t[:, None] * c)
        nxt[np.diag_indices_from(nxt)] += 2 * t
        linalg.cholesky(nxt, lower=False)
    except linalg.LinAlgError:
        return False
    return True


def eclipse_multipliers(lmi: Lmi, stage: str = "fast") -> tuple[float, tuple[Array, ...]]:
    """(k*, T') of the forward recursion (module docstring); (k*, k* T') is an (unverified)
    LipSDP-Neuron point. ``stage``: "fast" (closed form) or "sdp" (a small SDP per layer).
    NotApplicable when some a_j b_j < 0."""
    W, al, be = lmi.weights, lmi.alpha, lmi.beta
    L = lmi.depth
    ab = [a * b for a, b in zip(al, be, strict=True)]
    if any(np.any(x < 0) for x in ab):
        raise NotApplicable("eclipse needs slope bounds with a*b >= 0 on every neuron")
    choose = _stage_fast if stage == "fast" else _stage_sdp
    p = np.eye(lmi.input_size)
    t: list[Array] = []
    for j in range(L):
        c = (al[j] + be[j])[:, None] * W[j]
        own_root = np.sqrt(ab[j])[:, None] * W[j]  # 2 W^T D T W = 2 own^T T own
        nxt = W[L] if j + 1 == L else (al[j + 1] + be[j + 1])[:, None] * W[j + 1]
        tj = choose(p, c, own_root, nxt.T @ nxt)
        if not np.all(np.isfinite(tj)) or np.any(tj <= 0):
            raise LipcertError("eclipse: stage multiplier is not finite", code="eclipse-failed")
        t.append(tj)
        if np.any(ab[j]):
            p = p + 2 * (own_root.T * tj) @ own_root
        k = _gain(p, tj[:, None] * c)
        p = -k
        p[np.diag_indices_from(p)] += 2 * tj
    k_star = _lam_max(_gain(p, W[L]))
    return k_star, tuple(t)


def eclipse_fast_multipliers(lmi: Lmi) -> tuple[float, tuple[Array, ...]]:
    """:func:`eclipse_multipliers` with the closed-form stage (ECLipsE-Fast)."""
    return eclipse_multipliers(lmi, "fast")


def _certified(lmi: Lmi, mults: tuple[Array, ...]) -> float:
    try:
        return certify_rho(lmi, mults)
    except CertificateError:
        return math.inf


def _best_scaling(
    lmi: Lmi, k_star: float, t_prime: tuple[Array, ...]
) -> tuple[float, tuple[Array, ...]] | None:
    """The smallest certified rho over multipliers k T' (module docstring, "Scaling").

    rho_min(k) = min {rho : M(rho, k T') <= 0} is convex in k (the feasible (rho, k) form a
    convex set, the LMI being affine in both), hence unimodal in log k: a geometric grid
    brackets its minimum and golden section refines it. Every candidate is certified by
    :func:`certify_rho`; only certified values are compared, so the search is heuristic and
    the result sound whatever the rounding does to convexity.
    """
    best: tuple[float, tuple[Array, ...]] | None = None

    def evaluate(log_k: float) -> float:
        nonlocal best
        mults = tuple(math.exp(log_k) * tj for tj in t_prime)
        rho = _certified(lmi, mults)
        if rho < math.inf and (best is None or rho < best[0]):
            best = (rho, mults)
        return rho

    if not (0 < k_star < math.inf):  # a zero (e.g. cancelled composite) or overflowed scale
        return None
    logs = [math.log(k_star * f) for f in SCALE_GRID]
    values = [evaluate(x) for x in logs]
    i = int(np.argmin(values))
    if not math.isfinite(values[i]):
        return None
    lo, hi = logs[max(i - 1, 0)], logs[min(i + 1, len(logs) - 1)]
    golden_section(evaluate, lo, hi, GOLDEN_STEPS)  # evaluate keeps the best certified one
    return best


def eclipse_bound(net: Network, stage: str = "fast") -> BoundResult:
    """Verified l2 Lipschitz bound of a chain by ECLipsE multipliers (module docstring):
    ``stage`` "fast" (method ``eclipse-fast``) or "sdp" (method ``eclipse``).

    Raises:
        NotApplicable: not a chain, too large, or slopes of both signs.
        LipcertError: no candidate multiplier scaling certified (never seen; reported as such).
    """
    method = "eclipse-fast" if stage == "fast" else "eclipse"
    if stage == "fast":
        check_eclipse_size(net)
    else:
        check_eclipse_size(net, width_cap=SDP_WIDTH_CAP, hidden_cap=SDP_HIDDEN_CAP)
    t0 = time.perf_counter()
    lmi = Lmi.from_chain(net.chain())
    try:
        k_star, t_prime = eclipse_multipliers(lmi, stage)
    except ValueError as e:  # scipy's check_finite: a block overflowed (weights ~1e100)
        raise LipcertError(f"{method}: float64 overflow on this network's scales") from e
    t1 = time.perf_counter()
    best = _best_scaling(lmi, k_star, t_prime)
    if best is None:
        raise LipcertError(f"{method} multipliers did not certify", code="eclipse-unverified")
    cert = Certificate(
        rho=best[0],
        multipliers=best[1],
        network_hash=net.content_hash(),
        meta={"method": method, "closed_form_rho": k_star},
    )
    verified = verify_certificate(lmi, cert)
    t2 = time.perf_counter()
    what = "ECLipsE-Fast" if stage == "fast" else "ECLipsE (per-layer SDP)"
    return BoundResult(
        value=cert.lipschitz_bound,
        method=method,
        verified=verified,
        certificate=cert,
        timings={"solve_s": t1 - t0, "verify_s": t2 - t1, "total_s": t2 - t0},
        notes=(
            f"{what} multipliers (Xu & Sivaranjani, NeurIPS 2024), certified by block "
            f"Cholesky; recursion's rho {k_star:.9g}, certified {cert.rho:.9g}",
        ),
    )


def eclipse_fast_bound(net: Network) -> BoundResult:
    """:func:`eclipse_bound` with the closed-form stage (method ``eclipse-fast``)."""
    return eclipse_bound(net, "fast")
