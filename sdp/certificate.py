"""LipSDP certificates and their exact, solver-free verification (design.md §3.2-3.3).

Notation. Hidden layers i = 0..L-1 have pre-activations v_i = W_i z_i + b_i and outputs
z_{i+1} = phi_i(v_i), with phi_i slope-restricted in [a_i, b_i] (vectors, per neuron).
For multipliers t_i >= 0 (T_i = diag(t_i)) every incremental pair satisfies

    2 (dw - a dv)^T T (b dv - dw) >= 0,

so if  M(rho, T) = [A;B]^T [[-2abT, (a+b)T], [(a+b)T, -2T]] [A;B]
                   + blkdiag(-rho I, 0, ..., 0, W_L^T W_L)  <= 0
then ||f(x) - f(x')||^2 <= rho ||x - x'||^2  (Fazlyab et al., "Efficient and Accurate
Estimation of Lipschitz Constants for Deep Neural Networks", NeurIPS 2019).

-M is block tridiagonal over the blocks (x, z_1, ..., z_L):

    (-M)_00     = rho I + 2 W_0^T diag(a_0 b_0 t_0) W_0
    (-M)_jj     = 2 diag(t_{j-1}) + 2 W_j^T diag(a_j b_j t_j) W_j      (1 <= j < L)
    (-M)_LL     = 2 diag(t_{L-1}) - W_L^T W_L
    (-M)_{j+1,j} = -diag((a_j + b_j) t_j) W_j

Verification never trusts a solver's rho. With G = -H (the hidden blocks) it runs the
block Cholesky of G - cI backwards (S_L = G_LL - cI, S_j = G_jj - cI - G_{j,j+1} S_{j+1}^{-1}
G_{j+1,j}); if every block factorises, H(T) < 0 and

    rho(T) = lambda_max( -2 W_0^T diag(a_0 b_0 t_0) W_0 + C^T S_1^{-1} C ),
    C = diag((a_0+b_0) t_0) W_0

is the smallest rho with M(rho, T) <= 0. The reported rho adds the float shift c and a
relative safety margin, and the final Schur complement (rho - c) I - Q is Cholesky-factorised
explicitly, so the whole of -M(rho, T) - cI has been factorised in float64.

The shift c follows Rump's criterion for floating-point Cholesky ("Verification of positive
definiteness", BIT 2006): c >= gamma_{n+1} / (1 - gamma_{n+1}) * trace|A|, doubled. On the
hidden blocks it is applied in Jacobi scaling (D G D with D = diag|G_ii|^{-1/2}), i.e. as a
per-neuron shift 2 gamma_{n+1} (n+1) |G_ii|, so deep nets whose multipliers span many orders of
magnitude are not drowned by the largest one; the input block gets the plain trace form. Both
add the worst-case rounding of forming W^T D W (gamma_m times scaled row sums of |W|^T |D| |W|).
It is a careful float64 margin, not an interval-arithmetic proof; it is many orders of magnitude
larger than observed rounding and many orders smaller than any reported digit.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np
from scipy import linalg
from scipy.sparse import linalg as sparse_linalg

from sdp.errors import CertificateError, NotApplicable
from sdp.ir import Array, Chain, Network, frobenius_norm

_U = np.finfo(np.float64).eps / 2
REL_MARGIN = 1e-9
"""Relative safety margin added to every certified rho (on top of the float shift)."""
LANCZOS_MIN_DIM = 1_000
"""Input blocks larger than this get their lambda_max candidate from Lanczos first."""


def _gamma(n: int) -> float:
    return n * _U / (1 - n * _U)


@dataclass(frozen=True, eq=False)
class Lmi:
    """The network data of the LipSDP LMI: dense W_0..W_L and per-neuron slope bounds.

    ``weights[-1]`` is the output map; for a pairwise bound it is (e_y - e_j)^T W_L.
    """

    weights: tuple[Array, ...]
    alpha: tuple[Array, ...]
    beta: tuple[Array, ...]
    weight_errors: tuple[float, ...] = ()
    """Per weight, a bound of ||W_k - W_k*||_2 for the exact W_k* of the function (a chain's
    composite layers, an output map's rounding: :meth:`from_chain`); () = all exact. The check
    proves the LMI for every W_k* within them (:func:`weight_error_shifts`)."""

    def __post_init__(self) -> None:
        ws = tuple(np.asarray(w, dtype=np.float64) for w in self.weights)
        L = len(ws) - 1
        if L < 0 or len(self.alpha) != L or len(self.beta) != L:
            raise ValueError("need L+1 weights and L slope vectors")
        errs = tuple(float(e) for e in self.weight_errors)
        if errs and (len(errs) != L + 1 or any(not e >= 0 for e in errs)):
            raise ValueError("need one weight error bound >= 0 per weight")
        object.__setattr__(self, "weight_errors", errs if any(errs) else ())
        for i in range(L):
            if ws[i + 1].shape[1] != ws[i].shape[0]:
                raise ValueError(f"W_{i + 1} {ws[i + 1].shape} does not follow W_{i} {ws[i].shape}")
        al = tuple(
            np.broadcast_to(np.asarray(a, np.float64), (ws[i].shape[0],)).copy()
            for i, a in enumerate(self.alpha)
        )
        be = tuple(
            np.broadcast_to(np.asarray(b, np.float64), (ws[i].shape[0],)).copy()
            for i, b in enumerate(self.beta)
        )
        for a, b in zip(al, be, strict=True):
            if np.any(a > b) or not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
                raise ValueError("slope bounds must be finite with alpha <= beta")
        object.__setattr__(self, "weights", ws)
        object.__setattr__(self, "alpha", al)
        object.__setattr__(self, "beta", be)

    @classmethod
    def from_chain(cls, chain: Chain, output_map: Array | None = None) -> Lmi:
        """LMI data of a chain; ``output_map`` P (rows) bounds x -> P f(x) instead of f."""
        ws = chain.weights()
        sl = chain.slopes()
        al = [np.full(w.shape[0], s[0]) for w, s in zip(ws[:-1], sl, strict=True)]
        be = [np.full(w.shape[0], s[1]) for w, s in zip(ws[:-1], sl, strict=True)]
        lmi = cls(tuple(ws), tuple(al), tuple(be), chain.errors())
        return lmi if output_map is None else lmi.with_output_map(output_map)

    def with_output_map(self, output_map: Array) -> Lmi:
        """The LMI of x -> P f(x): last weight fl(P W_L) (:func:`mapped_output`), its error
        bound grown by the map's rounding (:func:`output_map_error`)."""
        p = np.asarray(output_map, np.float64)
        errs = self.errors()
        last = mapped_output(p, self.weights[-1])
        error = output_map_error(p, last, errs[-1], weight=self.weights[-1])
        return Lmi((*self.weights[:-1], last), self.alpha, self.beta, (*errs[:-1], error))

    def errors(self) -> tuple[float, ...]:
        """:attr:`weight_errors`, one per weight (0.0 where none is given)."""
        return self.weight_errors or (0.0,) * len(self.weights)

    @property
    def depth(self) -> int:
        """Number of hidden layers L."""
        return len(self.weights) - 1

    @property
    def hidden_sizes(self) -> list[int]:
        return [w.shape[0] for w in self.weights[:-1]]

    @property
    def input_size(self) -> int:
        return int(self.weights[0].shape[1])


@dataclass(frozen=True, eq=False)
class Certificate:
    """A LipSDP-Neuron certificate: M(rho, T) <= 0, hence Lip <= sqrt(rho).

    ``multipliers[i]`` is diag(T_i) for hidden layer i. ``output_map`` (optional) is the row
    block P the certificate bounds (P f instead of f), e.g. e_y - e_j for a pairwise bound.
    """

    rho: float
    multipliers: tuple[Array, ...]
    output_map: Array | None = None
    network_hash: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def lipschitz_bound(self) -> float:
        return math.sqrt(self.rho)

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": "lipcert-certificate/1",
                "rho": self.rho,
                "lipschitz_bound": self.lipschitz_bound,
                "multipliers": [t.tolist() for t in self.multipliers],
                "output_map": None
                if self.output_map is None
                else np.asarray(self.output_map).tolist(),
                "network_hash": self.network_hash,
                "meta": self.meta,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> Certificate:
        try:
            d = json.loads(text)
            if d.get("format") != "lipcert-certificate/1":
                raise ValueError("not a lipcert certificate")
            om = d.get("output_map")
            if om is not None and np.ndim(om) != 2:
                raise ValueError("output_map must be a 2-D row block")
            return cls(
                rho=float(d["rho"]),
                multipliers=tuple(np.asarray(t, dtype=np.float64) for t in d["multipliers"]),
                output_map=None if om is None else np.asarray(om, dtype=np.float64),
                network_hash=str(d.get("network_hash", "")),
                meta=dict(d.get("meta", {})),
            )
        except (ValueError, KeyError, TypeError) as e:
            raise CertificateError(
                f"unreadable certificate: {e}", code="certificate-unreadable"
            ) from e


def _absrow(w: Array, d: Array) -> Array:
    """Row sums of |W|^T |diag(d)| |W| via two mat-vecs (bounds the rounding of W^T D W)."""
    aw = np.abs(w)
    return aw.T @ (np.abs(d) * (aw @ np.ones(aw.shape[1])))


@dataclass
class _Factorisation:
    q: Array  # Q_c = -2 W_0^T D W_0 + C^T S_1^{-1} C (input-space matrix)
    q_err: float  # shift to apply to the final (input) block


def _factorise_hidden(lmi: Lmi, t: Sequence[Array]) -> _Factorisation:
    """Backward block Cholesky of G - cI (G = -H(T)); CertificateError if G - cI is not PD."""
    W, al, be = lmi.weights, lmi.alpha, lmi.beta
    L = lmi.depth
    t = [np.asarray(ti, dtype=np.float64) for ti in t]
    if len(t) != L or any(ti.shape != (n,) for ti, n in zip(t, lmi.hidden_sizes, strict=True)):
        raise CertificateError(
            "multipliers do not match the network's hidden layers", code="certificate-mismatch"
        )
    if any(np.any(~np.isfinite(ti)) or np.any(ti < 0) for ti in t):
        raise CertificateError("multipliers must be finite and >= 0", code="certificate-invalid")
    n_hidden = sum(lmi.hidden_sizes)
    # the weight errors' shifts (1e-6 more: the rounding of subtracting them)
    werr = weight_error_shifts(lmi, t)
    if not all(math.isfinite(d) for d in (*werr.hidden, werr.input)):
        raise CertificateError(
            "the network's composite weights are not known accurately enough to certify",
            code="certificate-infeasible",
        )
    ab = [a * b for a, b in zip(al, be, strict=True)]
    apb = [a + b for a, b in zip(al, be, strict=True)]

    # Float shift, per neuron (Jacobi-scaled Rump criterion): checking D G D - cI > 0 with
    # D = diag(|G_ii|)^{-1/2} is checking G - c diag(|G_ii|) > 0, so the shift scales with
    # each neuron's own diagonal entry and stays tiny when multipliers span many orders of
    # magnitude (deep trained nets). Plus the rounding of forming W^T D W, bounded per row
    # in the same scaling: s_i >= gamma_m (F d)_i / d_i with F = |W|^T |D| |W|, d = sqrt|G_ii|.
    n_total = n_hidden + lmi.input_size
    rel = 2 * _gamma(n_total + 1) * (n_total + 1)
    shifts: list[Array] = []
    for j in range(L):
        w_next = W[j + 1]
        d_next = ab[j + 1] * t[j + 1] if j + 1 < L else np.ones(w_next.shape[0])
        sign = 1.0 if j + 1 < L else -1.0
        diag_g = 2 * t[j] + sign * (1.0 if j + 1 == L else 2.0) * np.einsum(
            "ij,i,ij->j", w_next, d_next, w_next
        )
        scale = np.sqrt(np.abs(diag_g)) + np.finfo(np.float64).tiny
        aw = np.abs(w_next)
        form = (aw.T @ (np.abs(d_next) * (aw @ scale))) / scale
        form *= 2 * _gamma(w_next.shape[0] + 2) * (1.0 if j + 1 == L else 2.0)
        shifts.append(
            rel * np.abs(diag_g) + form + werr.hidden[j] * (1 + 1e-6) + np.finfo(np.float64).tiny
        )

    s_inv_coupling: Array | None = None  # R_{j+1}^{-T} G_{j+1,j}, from the block below
    for j in reversed(range(L)):
        if j == L - 1:
            blk = -(W[L].T @ W[L])
        elif np.any(ab[j + 1] * t[j + 1]):
            blk = 2 * (W[j + 1].T * (ab[j + 1] * t[j + 1])) @ W[j + 1]
        else:  # a b t = 0 (ReLU, sigmoid, tanh): the own term is exactly zero, skip its product
            blk = np.zeros((W[j].shape[0], W[j].shape[0]))
        blk[np.diag_indices_from(blk)] += 2 * t[j] - shifts[j]
        if s_inv_coupling is not None:
            blk -= s_inv_coupling.T @ s_inv_coupling
        try:
            r = linalg.cholesky(blk, lower=False, check_finite=True)
        except (linalg.LinAlgError, ValueError) as e:
            raise CertificateError(
                f"H(T) is not negative definite (block of hidden layer {j} fails Cholesky)",
                code="certificate-infeasible",
            ) from e
        # coupling G_{j,j-1} = -diag((a+b) t)_{j-1} W_{j-1}; for j == 0 this is C (to the input)
        coupling = (apb[j] * t[j])[:, None] * W[j]
        s_inv_coupling = linalg.solve_triangular(r, coupling, trans="T", lower=False)
    if L == 0:
        w = W[0]
        q = w.T @ w  # no hidden layer: M = -rho I + W^T W
        q_err = _gamma(w.shape[0] + 2) * float(np.max(_absrow(w, np.ones(w.shape[0])), initial=0.0))
        return _Factorisation(q=q, q_err=2 * q_err + werr.input * (1 + 1e-6))
    assert s_inv_coupling is not None
    q = s_inv_coupling.T @ s_inv_coupling
    if np.any(ab[0] * t[0]):  # else the own term is exactly zero (its product skipped)
        q -= 2 * (W[0].T * (ab[0] * t[0])) @ W[0]
    q_err = _gamma(W[0].shape[0] + 2) * float(np.max(_absrow(W[0], ab[0] * t[0]), initial=0.0)) * 2
    return _Factorisation(q=q, q_err=q_err + werr.input * (1 + 1e-6))


def _input_shift(f: _Factorisation, rho: float) -> float:
    n0 = f.q.shape[0]
    trace = n0 * abs(rho) + float(np.abs(np.diag(f.q)).sum())
    return f.q_err + 2 * _gamma(n0 + 1) * trace


def _final_block_ok(f: _Factorisation, rho: float) -> bool:
    blk = -f.q
    blk[np.diag_indices_from(blk)] += rho - _input_shift(f, rho)
    try:
        linalg.cholesky(blk, lower=False)
    except (linalg.LinAlgError, ValueError):  # ValueError: a non-finite entry
        return False
    return True


def mapped_output(output_map: Array, weight: Array) -> Array:
    """P W with every entry correctly rounded: the last weight of the LMI of x -> P f(x).

    BLAS rounds each partial sum of P @ W, so with three or more terms a row can cancel to
    anything, 0 included, where the exact P W is not (1 + 2^-60 - 1 -> 0); the LMI would then
    prove a bound of another function (a zero last layer: "Lip(P f) <= 1e-105" for a P f of
    Lipschitz constant 100). A row of P with at most one nonzero entry, or with two entries
    +-1 (the pairwise e_y - e_j), makes one rounding per entry in any summation order, so
    BLAS's value is already the correctly rounded one; any other row is summed exactly
    (:class:`fractions.Fraction`: every float is a rational) and rounded once (CPython's
    integer division rounds correctly). The exact path costs a few microseconds per term.
    The entries' own rounding (u |fl(P W)|) is left: :func:`output_map_error` bounds it, and
    the LMI check covers every exact P W within that bound (``Lmi.weight_errors``, design.md
    §3.3). This function removes the cancellation within one entry, which keeps the bound small.
    """
    p = np.asarray(output_map, np.float64)
    w = np.asarray(weight, np.float64)
    out = p @ w
    nonzero = p != 0
    count = nonzero.sum(axis=1)
    unit_pair = (count == 2) & np.all(~nonzero | (np.abs(p) == 1.0), axis=1)
    for r in np.flatnonzero((count > 1) & ~unit_pair):
        ks = np.flatnonzero(nonzero[r])
        terms = [(Fraction(float(p[r, k])), w[k]) for k in ks]
        finite = np.isfinite(w[ks]).all(axis=0)  # else BLAS's inf / NaN stands (refused later)
        for c in np.flatnonzero(finite):
            exact = sum((coef * Fraction(float(row[c])) for coef, row in terms), Fraction(0))
            try:
                out[r, c] = float(exact)
            except OverflowError:  # beyond float64: as BLAS's own overflow would
                out[r, c] = math.inf if exact > 0 else -math.inf
    return out


def output_map_error(
    output_map: Array, mapped: Array, weight_error: float = 0.0, *, weight: Array | None = None
) -> float:
    """Bound of ||fl(P W) - P W*||_2 for ``mapped`` = :func:`mapped_output` (P, W) and
    ||W - W*||_2 <= ``weight_error``: every entry of fl(P W) is correctly rounded, so
    |fl(P W) - P W| <= u |fl(P W)| entrywise, plus ||P||_F ||W - W*||_2; the factor 1.001 covers
    the float norms' own rounding. 0 where no entry was rounded (P selects or negates rows).
    Entries below the smallest normal number are rounded by up to 2^-1075 absolute instead,
    except in the columns where ``weight`` (W, when given) is zero: there P W = 0 exactly, so
    a zero last layer stays exactly zero (the network is then constant)."""
    with np.errstate(over="ignore", invalid="ignore"):
        exact = not weight_error and bool(
            np.all((np.abs(output_map) == 1.0) | (output_map == 0.0))
            and np.all(np.count_nonzero(output_map, axis=1) <= 1)
        )
        if exact:
            return 0.0
        small = np.abs(np.asarray(mapped)) < np.finfo(np.float64).tiny
        if weight is not None:
            small &= np.any(np.asarray(weight) != 0, axis=0)[None, :]
        n_small = int(np.count_nonzero(small))
        underflow = (math.ceil(math.sqrt(n_small)) + 4) * 2.0**-1074 if n_small else 0.0
        bound = _U * frobenius_norm(mapped)
        if weight_error:
            bound += frobenius_norm(output_map) * weight_error
        bound = bound * 1.001 + underflow
        if bound and not underflow:  # the float evaluation's own rounding in the subnormals
            bound += 4 * 2.0**-1074
    return bound if math.isfinite(bound) else math.inf


@dataclass(frozen=True)
class WeightErrorShifts:
    """Diagonal shifts covering the weight errors: ``hidden[j]`` for hidden layer j's block,
    ``input`` for the input block (all 0.0 for exact weights)."""

    hidden: tuple[float, ...]
    input: float


def weight_error_shifts(lmi: Lmi, t: Sequence[Array]) -> WeightErrorShifts:
    """Per-block delta with M(rho, T; W*) - M(rho, T; W) <= diag(delta_b I) for every W* within
    ``lmi.weight_errors`` (e_k >= ||W_k* - W_k||_2).

    M is block tridiagonal in (x, z_1..z_L). W_k enters the coupling block C_k = diag((a+b)
    t_k) W_k between hidden layer k and the block before it (hidden k-1, or the input), and
    the quadratic term 2 W_k^T diag(a b t_k) W_k in that block before; W_L enters -W_L^T W_L
    in the last hidden block. With E_k = W_k* - W_k: ||Delta C_k|| <= c_k = max|(a+b) t_k| e_k,
    ||Delta quad_k|| <= q_k = 2 max|a b t_k| (2 ||W_k||_F e_k + e_k^2), ||Delta last|| <=
    2 ||W_L||_F e_L + e_L^2; a symmetric pair [[0, C^T], [C, 0]] is <= ||C|| (I + I), so
    delta(hidden k) = c_k + c_{k+1} + q_{k+1} (the last: c_{L-1} + the W_L term) and
    delta(input) = c_0 + q_0. Checking -M(W) - diag(delta) > 0 proves -M(W*) > 0. The factor
    1.001 covers the float evaluation of these few positive terms; inf if they overflow.
    """
    L = lmi.depth
    errs = lmi.weight_errors
    if not errs:
        return WeightErrorShifts((0.0,) * L, 0.0)
    c = [0.0] * (L + 1)  # coupling term of W_k (k < L)
    q = [0.0] * (L + 1)  # quadratic term of W_k (k < L), the W_L term at L
    with np.errstate(over="ignore", invalid="ignore"):
        for k, e in enumerate(errs):
            if not e:
                continue
            w_norm = frobenius_norm(lmi.weights[k]) * 1.001
            if k == L:
                q[k] = 2 * w_norm * e + e * e
                continue
            tk = np.asarray(t[k], np.float64)
            a, b = lmi.alpha[k], lmi.beta[k]
            c[k] = float(np.max(np.abs((a + b) * tk), initial=0.0)) * e
            q[k] = 2 * float(np.max(np.abs(a * b * tk), initial=0.0)) * (2 * w_norm * e + e * e)
        hidden = tuple(_finite_or_inf((c[k] + c[k + 1] + q[k + 1]) * 1.001) for k in range(L))
        first = _finite_or_inf((c[0] + q[0]) * 1.001) if L else _finite_or_inf(q[0] * 1.001)
    return WeightErrorShifts(hidden, first)


def _finite_or_inf(x: float) -> float:
    return x if math.isfinite(x) else math.inf


def output_map_fits(output_map: Array | None, output_size: int) -> bool:
    """True iff ``output_map`` is None or a finite 2-D row block P with ``output_size``
    columns (a 1-D P would broadcast into the wrong LMI block and prove another function)."""
    if output_map is None:
        return True
    p = np.asarray(output_map)
    return p.ndim == 2 and p.shape[1] == output_size and bool(np.isfinite(p).all())


def certify_rho(lmi: Lmi, multipliers: Sequence[Array], *, rel_margin: float = REL_MARGIN) -> float:
    """Smallest verified rho for fixed multipliers T (design.md §3.3).

    rho = (lambda_max(Q) + c)(1 + rel_margin), confirmed by a Cholesky of the whole -M(rho,T) - cI.
    For an input block larger than LANCZOS_MIN_DIM, lambda_max(Q) is first taken from Lanczos
    (much cheaper than a dense eigvalsh); the confirming Cholesky is the same either way.

    Raises:
        CertificateError: if H(T) is not negative definite (with the float margin), or the
            confirmation fails (never happens for a correct factorisation; checked anyway).
    """
    f = _factorise_hidden(lmi, multipliers)
    n = f.q.shape[0]
    if n > LANCZOS_MIN_DIM:
        # candidate from Lanczos (a Ritz value, <= lambda_max); the Cholesky below is the proof,
        # and if the candidate was too low it fails and the full eigvalsh path runs
        try:
            top = float(sparse_linalg.eigsh(f.q, k=1, which="LA", tol=1e-12, ncv=40)[0][0])
        except sparse_linalg.ArpackError:  # no convergence: the dense path below decides
            top = -math.inf
        if math.isfinite(top):
            guess = max(top, 0.0)
            cand = (guess + _input_shift(f, guess)) * (1 + rel_margin) + float(
                np.finfo(np.float64).tiny
            )
            if _final_block_ok(f, cand):
                return float(cand)
    lam = float(linalg.eigvalsh(f.q, subset_by_index=[n - 1, n - 1])[0])
    rho = max(lam, 0.0)
    for _ in range(8):
        rho = (rho + _input_shift(f, rho)) * (1 + rel_margin) + np.finfo(np.float64).tiny
        if _final_block_ok(f, rho):
            return float(rho)
        rel_margin *= 10
    raise CertificateError("could not confirm rho(T) by Cholesky", code="certificate-unconfirmed")


def verify_certificate(lmi: Lmi, cert: Certificate) -> bool:
    """True iff M(cert.rho, T) <= 0 is confirmed in float64 (with the float shift).

    Uses only the network (``lmi``, already mapped by ``cert.output_map``) and (rho, T).
    """
    if not (math.isfinite(cert.rho) and cert.rho >= 0):
        return False
    try:
        f = _factorise_hidden(lmi, cert.multipliers)
    except CertificateError:
        return False
    return _final_block_ok(f, cert.rho)


def verify_on(net: Network, cert: Certificate) -> bool:
    """True iff ``cert`` proves its bound on ``net`` itself: the LMI of ``net``'s chain with the
    certificate's own output map P applied (``P f`` for a pairwise certificate), then
    :func:`verify_certificate`. False (never an exception) when ``net`` is not a chain or the
    shapes disagree with the certificate.

    Use this rather than :func:`verify_certificate` with a hand-built LMI: forgetting the
    output map makes a valid pairwise certificate fail, or checks the wrong function.
    The certificate's ``network_hash`` is not compared: the verification itself is the proof,
    whatever network the certificate was computed on.
    """
    if not net.is_chain or not output_map_fits(cert.output_map, net.output_size):
        return False
    try:
        lmi = Lmi.from_chain(net.chain(), output_map=cert.output_map)
    except (ValueError, NotApplicable):
        return False
    if len(cert.multipliers) != lmi.depth or any(
        np.shape(t) != (w.shape[0],) for t, w in zip(cert.multipliers, lmi.weights, strict=False)
    ):
        return False
    return verify_certificate(lmi, cert)


def layerwise_multipliers(lmi: Lmi, *, slack: float = 2.0) -> tuple[Array, ...]:
    """:func:`_layerwise_multipliers`; CertificateError (certificate-infeasible), not a bare
    ValueError, where a block overflows float64 (weights around 1e100: W^T W squared)."""
    try:
        with np.errstate(over="ignore", invalid="ignore"):
            return _layerwise_multipliers(lmi, slack=slack)
    except ValueError as e:  # scipy's check_finite on an overflowed block
        raise CertificateError(
            "the layer-wise certificate overflows float64 on this network's scales",
            code="certificate-infeasible",
        ) from e


def _layerwise_multipliers(lmi: Lmi, *, slack: float = 2.0) -> tuple[Array, ...]:
    """A feasible T built backwards, one scalar per layer (always exists; no solver).

    With S_L = 2 t_{L-1} I - W_L^T W_L and S_j = 2 t_{j-1} I + 2 W_j^T D_ab W_j - Y^T Y
    (Y = S_{j+1}^{-1/2} G_{j+1,j}),
    choose t_{j-1} = slack * max(lambda_max(Y^T Y - 2 W^T D W), 0) / 2
    so every S_j >= (1 - 1/slack) lambda I > 0. The result is a valid (loose) certificate
    and a strictly feasible point to repair solver output with.
    """
    W, al, be = lmi.weights, lmi.alpha, lmi.beta
    L = lmi.depth
    t: list[Array] = [np.zeros(0)] * L
    errs = lmi.errors()
    s_inv_coupling: Array | None = None
    for j in reversed(range(L)):
        blk = (
            -(W[L].T @ W[L])
            if j == L - 1
            else 2 * (W[j + 1].T * (al[j + 1] * be[j + 1] * t[j + 1])) @ W[j + 1]
        )
        if s_inv_coupling is not None:
            blk = blk - s_inv_coupling.T @ s_inv_coupling
        n = blk.shape[0]
        need = float(linalg.eigvalsh(-blk, subset_by_index=[n - 1, n - 1])[0]) if n else 0.0
        # weight errors (weight_error_shifts): the part of block j's shift known now, and its
        # own coupling term kappa t_j: 2 t_j - kappa t_j must exceed need + known
        known = _block_shift_known(lmi, t, j) if lmi.weight_errors else 0.0
        kappa = float(np.max(np.abs(al[j] + be[j]), initial=0.0)) * errs[j] * 1.01
        if kappa >= 1.0:
            raise CertificateError(
                "the network's composite weights are not known accurately enough to certify",
                code="certificate-infeasible",
            )
        need = (max(need, 0.0) + known) * 2 / (2 - kappa) if known or kappa else need
        scale = max(need, 0.0) * slack / 2
        scale = max(scale, 1e-12 * max(1.0, float(np.abs(blk).max(initial=0.0))))
        t[j] = np.full(W[j].shape[0], scale)
        blk[np.diag_indices_from(blk)] += 2 * scale
        r = linalg.cholesky(blk, lower=False)
        coupling = ((al[j] + be[j]) * t[j])[:, None] * W[j]
        s_inv_coupling = linalg.solve_triangular(r, coupling, trans="T", lower=False)
    return tuple(t)


def _block_shift_known(lmi: Lmi, t: Sequence[Array], j: int) -> float:
    """Hidden block j's weight-error shift without its own coupling term (which scales with
    t_j, not chosen yet): c_{j+1} + q_{j+1} of :func:`weight_error_shifts`, times 1.01."""
    L = lmi.depth
    probe = [np.zeros(n) for n in lmi.hidden_sizes]
    for k in range(j + 1, L):
        probe[k] = np.asarray(t[k], np.float64)
    return weight_error_shifts(lmi, probe).hidden[j] * 1.01


ZERO_LAYER_SCALE = 1e-200
"""Factor on (rho, t_1..t_k) of :func:`zero_layer_multipliers`: far below any bound that matters,
far above float64's smallest normal number so the rounding checks keep their relative margins."""


def first_zero_layer(lmi: Lmi) -> int | None:
    """Index k of the first all-zero weight matrix W_k known exactly (no weight error bound:
    the network is then constant), or None."""
    return next(
        (
            k
            for k, (w, e) in enumerate(zip(lmi.weights, lmi.errors(), strict=True))
            if not (np.any(w) or e)
        ),
        None,
    )


def zero_layer_multipliers(lmi: Lmi, k: int) -> tuple[Array, ...]:
    """Multipliers certifying a near-zero rho when W_k = 0 (the network is constant).

    W_k couples only (z_k, z_{k+1}) in M (z_0 = x), so with W_k = 0, M = blkdiag(M_up, M_low):
    M_up over (x, z_1..z_k) receives no W_L^T W_L term (k <= L), so it is linear and homogeneous
    in (rho, t_1..t_k); M_low over (z_{k+1}..z_L) does not contain rho. The layer-wise T
    (:func:`layerwise_multipliers`) makes both NSD at its rho, so scaling t_1..t_k by
    c = :data:`ZERO_LAYER_SCALE` keeps them NSD at c rho. The LMI's optimum is not attained
    (rho -> 0 needs t_1..t_k -> 0), which is why an interior-point method is not run on it:
    its iterates drift over hundreds of orders of magnitude until its Schur matrix loses its
    positive diagonal to rounding. As always, :func:`certify_rho` proves the rho.
    """
    t = layerwise_multipliers(lmi)
    return tuple(tj * ZERO_LAYER_SCALE if j < k else tj for j, tj in enumerate(t))


@dataclass(frozen=True)
class Repaired:
    """Outcome of :func:`certify_multipliers`: the verified rho, the T it holds for, and a note."""

    rho: float
    multipliers: tuple[Array, ...]
    note: str


def certify_multipliers(lmi: Lmi, multipliers: Sequence[Array]) -> Repaired:
    """Turn (possibly slightly infeasible) solver multipliers into a verified certificate.

    T is clipped to >= 0. If H(T) is not negative definite, T is mixed with the strictly
    feasible layer-wise T0: T(theta) = (1 - theta) T + theta s T0, for increasing theta;
    H is affine in T so a small theta suffices for a nearly feasible T. theta = 1 is the
    layer-wise certificate itself, which always verifies. The note says what happened.
    """
    t = tuple(
        np.clip(np.nan_to_num(np.asarray(ti, np.float64), nan=0.0, posinf=0.0), 0.0, None)
        for ti in multipliers
    )
    try:
        return Repaired(certify_rho(lmi, t), t, "verified solver multipliers")
    except CertificateError:
        pass
    t0 = layerwise_multipliers(lmi)
    norm_t = max(float(np.abs(np.concatenate(t)).max(initial=0.0)), 1e-300)
    norm_0 = max(float(np.abs(np.concatenate(t0)).max(initial=0.0)), 1e-300)
    s = norm_t / norm_0
    for theta in (1e-8, 1e-6, 1e-4, 1e-3, 1e-2, 3e-2, 0.1, 0.3, 0.6):
        tm = tuple((1 - theta) * a + theta * s * b for a, b in zip(t, t0, strict=True))
        try:
            return Repaired(
                certify_rho(lmi, tm),
                tm,
                f"solver multipliers infeasible; repaired with theta={theta:g}",
            )
        except CertificateError:
            continue
    return Repaired(certify_rho(lmi, t0), t0, "solver multipliers unusable; layer-wise certificate")
