"""``eclipse-refined``: per-neuron LipSDP-Neuron multipliers for conv chains, certified.

The LMI and its notation are those of :mod:`sdp.certificate` (design.md §3.3); the method is
design.md §3.5. Blocks of -M(rho, T) over (x, z_0, ..., z_{L-1}), for D_j = diag(a_j b_j t_j),
C_j = diag((a_j + b_j) t_j) W_j:

    (-M)_xx = rho I + 2 W_0^T D_0 W_0,     (-M)_jj = 2 T_j + 2 W_{j+1}^T D_{j+1} W_{j+1},
    (-M)_{L-1,L-1} = 2 T_{L-1} - W_L^T W_L,  (-M)_{j,j-1} = -C_j   (z_{-1} = x).

Everything but the input block is the hidden matrix G(T), block tridiagonal and, for
convolutions, *sparse*: a conv layer's W_j has (kernel size x input channels) entries per row,
so G has a few hundred thousand entries where the unrolled dense blocks have tens of millions.

Value and gradient without dense blocks. For G(T) > 0 the smallest feasible rho is

    rho(T) = lambda_max(Q),  Q = C_0^T [G^{-1}]_00 C_0 - 2 W_0^T D_0 W_0,

(Schur complement onto x). G is factorised by a sparse LU with a symmetric fill-reducing
permutation and diagonal pivots (SuperLU, ``SymmetricMode``): that is LDL^T, and by Sylvester's
law of inertia G > 0 iff every pivot is positive. lambda_max(Q) comes from Lanczos (ARPACK)
with Q applied through sparse products and two triangular solves. rho(T) is convex (partial
minimisation over the convex LMI set) and, where its top eigenvalue is simple, differentiable:
with the top eigenvector x (|x| = 1) and z = G^{-1} [C_0 x; 0], u = (x, z) spans the null space
of -M(rho(T), T), and since M is affine in (rho, T) (envelope argument, -M u = 0),

    d rho / d t_{j,i} = -2 (z_{j,i} - a_{j,i} v_{j,i}) (z_{j,i} - b_{j,i} v_{j,i}),
    v_j = W_j z_{j-1}.

Start: ECLipsE-Fast's closed-form point (Xu & Sivaranjani, NeurIPS 2024; derivation in
:mod:`sdp.bounds.eclipse`): t_j = tau_j 1 with tau_j = 1 / lambda_max(C_j P_j^{-1} C_j^T), where
P_j is the Schur complement of -M(1, T') onto z_{j-1}, i.e. of its leading blocks, so P_j^{-1}
is one sparse solve; the scale k* = lambda_max(W_L P_L^{-1} W_L^T) makes (k*, k* T') feasible.

Refinement: L-BFGS on s = log t (one variable per neuron) with Armijo backtracking. rho is
not smooth where lambda_max(Q) is multiple, which it tends to be near the optimum, so the
descent minimises the smooth upper model F_mu = lambda_1 + mu log sum_i exp((lambda_i -
lambda_1) / mu) over the top few eigenvalues (gradient: the softmax-weighted eigenvector
gradients above), shrinking mu whenever a line search fails. A trial whose G is not positive
definite fails. It stops when mu is tiny or at the time limit; the best rho seen is kept.

Verification. Nothing above is trusted: the final (rho, T) is certified by
:func:`sdp.certificate.certify_rho` on the dense LMI of ``net.chain()`` (the same one
:func:`sdp.certificate.verify_on` rebuilds), with its rigorous float margins; if it does not
certify (a Lanczos value a little low, a pivot test fooled by rounding), T is scaled up (G(kT)
>= k G(T) for k >= 1, so feasibility only improves) and certified again, and the certified
ECLipsE-Fast start is the fallback. The reported bound is sqrt of a certified rho.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from scipy import sparse
from scipy.sparse import linalg as sla

from sdp.bounds.result import BoundResult
from sdp.certificate import Certificate, Lmi, certify_rho
from sdp.errors import CertificateError, LipcertError, NotApplicable
from sdp.ir import Affine, Array, Chain, Conv2d, Dense, Network

HIDDEN_CAP = 20_000
"""Refuse when the chain has more hidden neurons than this (the certificate is dense)."""
WIDTH_CAP = 8_192
"""Refuse when a hidden layer is wider than this (dense certificate blocks, width^2 floats)."""
DEFAULT_TIME_S = 100.0
"""Time limit (s) for the whole method when the caller gives none."""
START_SCALES = (1.02,)
"""Scalings f of the ECLipsE-Fast point (f k*, f k* T') tried before the descent starts."""
FIRST_STEP, MAX_STEP = 0.05, 0.5
"""Descent: the largest change of log t on a first (gradient) step, and on any step."""
EIGS, MU_START, MU_SHRINK, MU_MIN = 4, 1e-2, 0.1, 1e-7
"""Top eigenvalues in the smoothed objective, its smoothing mu (relative to rho) at the start,
the shrink after a failed line search, and the smallest mu before the descent stops."""
PATIENCE, STALL_TOL = 30, 1e-6
"""The descent stops after PATIENCE steps that lowered rho by less than STALL_TOL (relative)."""
MEMORY, LINE_TRIALS, BACKTRACK, ARMIJO, CURVATURE_TOL = 10, 12, 0.3, 1e-4, 1e-12
"""L-BFGS memory, line-search trials, backtracking factor, Armijo constant, and the curvature
s^T y a pair needs (relative to |s| |y|) to enter the memory."""
CERTIFY_SCALES = (1.0, 1.0 + 1e-4, 1.0 + 1e-2)
"""Scalings k of the refined T tried, in order, by the certificate check."""
CERTIFY_COST_SAFETY, CALIBRATION_N, LANCZOS_MATVECS = 1.5, 600, 150
"""The certificate check's estimated cost is its flop count over the rate of one
CALIBRATION_N-square matrix product, times this safety factor."""
LANCZOS_TOL = 1e-10
FIT_SHARE = 0.6
"""auto runs the method only when its certificate check is estimated at most this share of
the time it is given (:func:`refine_fits`)."""


def conv_sparse(conv: Conv2d) -> sparse.csr_matrix:
    """The (out_features, in_features) matrix of a convolution's linear part, sparse.

    Entry ((o, y, x), (c, r, s)) = w[o, c - g C_in/groups, i, j] for the tap (i, j) with
    r = y s_h + i d_h - p_top, s = x s_w + j d_w - p_left inside the image (C-order indices).
    """
    c_in, h, w = conv.in_shape
    co, cig, kh, kw = conv.weight.shape
    _, ho, wo = conv.out_shape
    pt, pl, _, _ = conv.padding
    (sh, sw), (dh, dw) = conv.stride, conv.dilation
    cog = co // conv.groups
    o, y, x = np.meshgrid(np.arange(co), np.arange(ho), np.arange(wo), indexing="ij")
    out_idx = (o * ho + y) * wo + x
    rows, cols, vals = [], [], []
    for i in range(kh):
        for j in range(kw):
            r = y * sh + i * dh - pt
            s = x * sw + j * dw - pl
            inside = (r >= 0) & (r < h) & (s >= 0) & (s < w)
            for c in range(cig):
                ch = (o // cog) * cig + c
                rows.append(out_idx[inside])
                cols.append(((ch * h + r) * w + s)[inside])
                vals.append(conv.weight[o, c, i, j][inside])
    mat = sparse.coo_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
        shape=(conv.out_features, c_in * h * w),
    )
    return mat.tocsr()


def affine_sparse(a: Affine) -> sparse.csr_matrix:
    """Sparse matrix of an affine layer's linear part (dense layers as they are)."""
    if isinstance(a, Conv2d):
        return conv_sparse(a)
    assert isinstance(a, Dense)
    return sparse.csr_matrix(a.weight)


@dataclass(frozen=True, eq=False)
class SparseChain:
    """LMI data with sparse W_0..W_L and per-neuron slope bounds (cf. :class:`Lmi`)."""

    weights: tuple[sparse.csr_matrix, ...]
    alpha: tuple[Array, ...]
    beta: tuple[Array, ...]

    @classmethod
    def from_chain(cls, chain: Chain) -> SparseChain:
        ws = tuple(affine_sparse(a) for a in chain.affines)
        sl = chain.slopes()
        al = tuple(np.full(w.shape[0], s[0]) for w, s in zip(ws[:-1], sl, strict=True))
        be = tuple(np.full(w.shape[0], s[1]) for w, s in zip(ws[:-1], sl, strict=True))
        return cls(ws, al, be)

    @classmethod
    def from_lmi(cls, lmi: Lmi) -> SparseChain:
        return cls(tuple(sparse.csr_matrix(w) for w in lmi.weights), lmi.alpha, lmi.beta)

    @property
    def depth(self) -> int:
        return len(self.weights) - 1

    @property
    def sizes(self) -> list[int]:
        return [int(w.shape[0]) for w in self.weights[:-1]]


@dataclass
class _Point:
    """rho(T) (Lanczos, unverified), T, d rho / dT and the top eigenvector x of Q."""

    rho: float
    t: tuple[Array, ...]
    grad: tuple[Array, ...]
    x: Array
    vals: Array
    grads: list[tuple[Array, ...]]

    def smoothed(self, mu: float) -> tuple[float, list[Array]]:
        """F = lambda_1 + mu log sum_i exp((lambda_i - lambda_1) / mu) over the computed top
        eigenvalues (a smooth upper model of rho) and its gradient sum_i w_i grad_i."""
        if mu <= 0 or len(self.vals) == 1:
            return self.rho, list(self.grad)
        e = np.exp((self.vals - self.vals[0]) / mu)
        w = e / e.sum()
        g = [
            sum(wi * gi[j] for wi, gi in zip(w, self.grads, strict=True))
            for j in range(len(self.t))
        ]
        return float(self.vals[0] + mu * math.log(e.sum())), g


class _Factor:
    """Sparse LDL^T of a symmetric matrix: SuperLU with diagonal pivots under a symmetric
    permutation. ``ok`` iff it ran with every pivot > 0, i.e. (Sylvester's law of inertia) iff
    the matrix is positive definite. The fill-reducing order (minimum degree on A + A^T) is
    computed once per sparsity pattern and reused (``order``)."""

    def __init__(self, g: sparse.spmatrix, order: NDArray[np.intp] | None = None) -> None:
        g = sparse.csc_matrix(g)
        n = g.shape[0]
        self.order = order
        self.lu: sla.SuperLU | None = None
        try:
            if order is None:  # SuperLU orders (and permutes) itself
                lu = sla.splu(
                    g,
                    permc_spec="MMD_AT_PLUS_A",
                    diag_pivot_thresh=0.0,
                    options={"SymmetricMode": True},
                )
                self.order = np.argsort(lu.perm_c)
                self._perm = False
            else:  # the known order, applied here; SuperLU keeps it
                p = order
                lu = sla.splu(
                    sparse.csc_matrix(g[p][:, p]),
                    permc_spec="NATURAL",
                    diag_pivot_thresh=0.0,
                    relax=20,
                    panel_size=12,
                    options={"SymmetricMode": True},
                )
                self._perm = True
        except RuntimeError:  # exactly singular
            return
        # diagonal pivots under one symmetric permutation: U's diagonal is D of LDL^T
        pivots = lu.U.diagonal()
        if np.array_equal(lu.perm_r, lu.perm_c) and pivots.shape == (n,) and np.all(pivots > 0):
            self.lu = lu

    @property
    def ok(self) -> bool:
        return self.lu is not None

    def solve(self, b: Array) -> Array:
        """G^{-1} b."""
        assert self.lu is not None and self.order is not None
        if not self._perm:
            return np.asarray(self.lu.solve(b))
        x = np.empty_like(b)
        x[self.order] = self.lu.solve(b[self.order])
        return x


def _top_eigs(
    n: int, matvec: Callable[[Array], Array], v0: Array | None, k: int
) -> tuple[Array, Array]:
    """The k largest eigenvalues (descending) and unit eigenvectors of a symmetric operator
    (Lanczos; dense below a few rows)."""
    op = sla.LinearOperator((n, n), matvec=matvec, dtype=np.float64)
    k = max(1, min(k, n))
    if n <= k + 2:
        dense = np.column_stack([op.matvec(e) for e in np.eye(n)])
        vals, vecs = np.linalg.eigh((dense + dense.T) / 2)
    else:
        start = v0 if v0 is not None and v0.shape == (n,) and np.any(v0) else np.ones(n)
        vals, vecs = sla.eigsh(op, k=k, which="LA", v0=start, tol=LANCZOS_TOL, maxiter=20 * n)
    order = np.argsort(vals)[::-1][:k]
    return vals[order], vecs[:, order]


class _Problem:
    """rho(T) and its gradient through the sparse hidden matrix G(T) (module docstring)."""

    def __init__(self, sc: SparseChain) -> None:
        self.sc = sc
        self.L = sc.depth
        self.n = sc.sizes
        self.n_in = int(sc.weights[0].shape[1])
        self.ab = [a * b for a, b in zip(sc.alpha, sc.beta, strict=True)]
        self.apb = [a + b for a, b in zip(sc.alpha, sc.beta, strict=True)]
        wl = sc.weights[-1]
        self.out_gram = sparse.csr_matrix(wl.T @ wl)
        self.offsets = np.concatenate([[0], np.cumsum(self.n)]).astype(int)
        self.order: NDArray[np.intp] | None = None  # G's fill-reducing order, found once

    def _own(self, j: int, t: Array) -> sparse.spmatrix | None:
        """2 W_j^T diag(a_j b_j t_j) W_j (None when a_j b_j = 0)."""
        if not np.any(self.ab[j]):
            return None
        w = self.sc.weights[j]
        return 2 * (w.T @ sparse.diags(self.ab[j] * t) @ w)

    def _coupling(self, j: int, t: Array) -> sparse.spmatrix:
        """C_j = diag((a_j + b_j) t_j) W_j."""
        return sparse.diags(self.apb[j] * t) @ self.sc.weights[j]

    def hidden(self, t: tuple[Array, ...]) -> sparse.csc_matrix:
        """G(T): the hidden blocks of -M(rho, T) (module docstring)."""
        L = self.L
        blocks: list[list[sparse.spmatrix | None]] = [[None] * L for _ in range(L)]
        for j in range(L):
            d = sparse.diags(2 * t[j])
            own = self._own(j + 1, t[j + 1]) if j + 1 < L else -self.out_gram
            blocks[j][j] = d if own is None else d + own
            if j + 1 < L:
                c = self._coupling(j + 1, t[j + 1])
                blocks[j + 1][j] = -c
                blocks[j][j + 1] = -c.T
        return sparse.csc_matrix(sparse.bmat(blocks, format="csc"))

    def evaluate(self, t: tuple[Array, ...], v0: Array | None = None, k: int = 1) -> _Point | None:
        """rho(T) with its gradient, or None when G(T) is not positive definite."""
        lu = _Factor(self.hidden(t), self.order)
        if not lu.ok:
            return None
        self.order = lu.order
        w0 = self.sc.weights[0]
        c0 = self.apb[0] * t[0]
        own0 = 2 * self.ab[0] * t[0]
        n_all = int(self.offsets[-1])
        n0 = self.n[0]

        def solve_first(y: Array) -> Array:
            rhs = np.zeros(n_all)
            rhs[:n0] = y
            return lu.solve(rhs)

        def q(x: Array) -> Array:
            v = w0 @ x
            z0 = solve_first(c0 * v)[:n0]
            return np.asarray(w0.T @ (c0 * z0 - own0 * v))

        vals, vecs = _top_eigs(self.n_in, q, v0, k)
        if not np.all(np.isfinite(vals)):
            return None
        grads = []
        for x in vecs.T:
            z_all = solve_first(c0 * (w0 @ x))
            grad = []
            prev = x
            for j in range(self.L):
                v = self.sc.weights[j] @ prev
                z = z_all[self.offsets[j] : self.offsets[j + 1]]
                grad.append(-2 * (z - self.sc.alpha[j] * v) * (z - self.sc.beta[j] * v))
                prev = z
            grads.append(tuple(grad))
        return _Point(
            rho=max(float(vals[0]), 0.0),
            t=tuple(t),
            grad=grads[0],
            x=vecs[:, 0],
            vals=vals,
            grads=grads,
        )

    def _leading(self, t: list[Array], k: int) -> sparse.csc_matrix:
        """-M(1, T) restricted to its leading blocks (x, z_0, ..., z_{k-2}), with the own
        terms of the layers whose multipliers are known (t[:k-1]... t[:len(t)])."""
        blocks: list[list[sparse.spmatrix | None]] = [[None] * k for _ in range(k)]
        own0 = self._own(0, t[0]) if t else None
        eye = sparse.identity(self.n_in, format="csr")
        blocks[0][0] = eye if own0 is None else eye + own0
        for j in range(k - 1):  # block j+1 is z_j
            d = sparse.diags(2 * t[j])
            own = self._own(j + 1, t[j + 1]) if j + 1 < len(t) else None
            blocks[j + 1][j + 1] = d if own is None else d + own
            c = self._coupling(j, t[j])
            blocks[j + 1][j] = -c
            blocks[j][j + 1] = -c.T
        return sparse.csc_matrix(sparse.bmat(blocks, format="csc"))

    def _gain(self, t: list[Array], c: sparse.spmatrix) -> float:
        """lambda_max(C P^{-1} C^T), P the Schur complement of the leading blocks onto the
        last one (z_{len(t)-1}, or x when t is empty)."""
        lead = self._leading(t, len(t) + 1)
        lu = _Factor(lead)
        if not lu.ok:
            raise LipcertError("eclipse-refined: closed-form stage not positive definite")
        size = lead.shape[0]
        last = int(c.shape[1])

        def mv(v: Array) -> Array:
            rhs = np.zeros(size)
            rhs[size - last :] = c.T @ v
            return np.asarray(c @ lu.solve(rhs)[size - last :])

        lam = _top_eigs(int(c.shape[0]), mv, None, 1)[0]
        return float(lam[0])

    def eclipse_start(self) -> tuple[float, tuple[Array, ...]]:
        """ECLipsE-Fast's closed-form point (k*, T') (module docstring, "Start")."""
        t: list[Array] = []
        for j in range(self.L):
            c = sparse.diags(self.apb[j]) @ self.sc.weights[j]
            lam = self._gain(t, c)
            tau = 1.0 / lam if lam > 0 and math.isfinite(lam) else 1.0
            t.append(np.full(self.n[j], tau))
        k_star = self._gain(t, self.sc.weights[-1])
        return k_star, tuple(t)


def refine(
    problem: _Problem, start: _Point, deadline: float, *, max_steps: int = 100_000
) -> tuple[_Point, int]:
    """The descent of the module docstring from ``start``: (the best point seen, steps).

    L-BFGS (Nocedal & Wright, "Numerical Optimization", 2nd ed., Alg. 7.4 and 7.5) on
    s = log t, one variable per neuron, for the smoothed F_mu of :meth:`_Point.smoothed` over
    the EIGS top eigenvalues (rho itself is non-smooth where lambda_max is multiple, as it
    tends to be near the optimum), with Armijo backtracking; a trial point whose G(T) is not
    positive definite counts as a failed trial. When a line search fails, mu shrinks by
    MU_SHRINK and the memory restarts; below MU_MIN rho, after PATIENCE steps without a
    relative gain of STALL_TOL, or at the deadline it stops.
    """
    sizes = [len(t) for t in start.t]
    cuts = np.cumsum(sizes)[:-1]

    def split(v: Array) -> tuple[Array, ...]:
        return tuple(np.split(v, cuts))

    def log_grad(p: _Point, mu: float) -> tuple[float, Array]:
        f, g = p.smoothed(mu)
        return f, np.concatenate(p.t) * np.concatenate(g)

    cur = best = start
    mu = MU_START * start.rho
    s = np.log(np.concatenate(start.t))
    f, g = log_grad(cur, mu)
    mem: list[tuple[Array, Array]] = []
    n = last_gain = 0
    while n < max_steps and time.perf_counter() < deadline and n - last_gain < PATIENCE:
        n += 1
        d = -_two_loop(g, mem)
        if g @ d >= 0:  # not a descent direction: restart from the scaled gradient
            mem.clear()
            d = -_two_loop(g, mem)
        d *= min(1.0, MAX_STEP / max(float(np.abs(d).max()), 1e-300))
        step, new = 1.0, None
        for _ in range(LINE_TRIALS):
            if time.perf_counter() >= deadline:
                break
            trial = problem.evaluate(split(np.exp(s + step * d)), v0=cur.x, k=EIGS)
            if trial is not None:
                f_new, g_new = log_grad(trial, mu)
                if f_new <= f + ARMIJO * step * float(g @ d):
                    new = trial
                    break
            step *= BACKTRACK
        if new is None:
            if mu <= MU_MIN * best.rho or time.perf_counter() >= deadline:
                break
            mu *= MU_SHRINK
            f, g = log_grad(cur, mu)
            mem.clear()
            continue
        s_new = s + step * d
        sy, yy = s_new - s, g_new - g
        # yy @ yy: the two-loop divides by it (0 when the gradient change underflows)
        if sy @ yy > CURVATURE_TOL * np.linalg.norm(sy) * np.linalg.norm(yy) and yy @ yy > 0:
            mem.append((sy, yy))
            del mem[:-MEMORY]
        s, f, g, cur = s_new, f_new, g_new, new
        if new.rho < best.rho * (1 - STALL_TOL):
            last_gain = n
        if new.rho < best.rho:
            best = new
    return best, n


def _two_loop(g: Array, mem: list[tuple[Array, Array]]) -> Array:
    """H g for the L-BFGS inverse-Hessian model of the pairs ``mem`` (Nocedal & Wright,
    Alg. 7.4); with no pairs, g scaled to a largest entry of FIRST_STEP."""
    if not mem:
        return g * (FIRST_STEP / max(float(np.abs(g).max()), 1e-300))
    q = g.copy()
    alphas = []
    for sv, yv in reversed(mem):
        r = 1.0 / float(yv @ sv)
        a = r * float(sv @ q)
        alphas.append((a, r))
        q -= a * yv
    sv, yv = mem[-1]
    q *= float(sv @ yv) / float(yv @ yv)
    for (sv, yv), (a, r) in zip(mem, reversed(alphas), strict=True):
        q += (a - r * float(yv @ q)) * sv
    return q


def check_refine_size(net: Network) -> None:
    """NotApplicable unless ``net`` is a chain within :data:`HIDDEN_CAP` / :data:`WIDTH_CAP`."""
    if not net.is_chain:
        raise NotApplicable(
            "eclipse-refined needs a chain; this residual network is bounded compositionally "
            "(method naive or auto)"
        )
    sizes = net.chain().hidden_sizes
    if sum(sizes) > HIDDEN_CAP or max(sizes, default=0) > WIDTH_CAP:
        raise NotApplicable(
            f"network too large for eclipse-refined ({sum(sizes)} hidden neurons, widest "
            f"{max(sizes, default=0)}; caps {HIDDEN_CAP} / {WIDTH_CAP})",
            code="too-large-for-eclipse-refined",
        )


def _certify_scaled(lmi: Lmi, t: tuple[Array, ...]) -> tuple[float, tuple[Array, ...]] | None:
    """certify_rho of k T for the first k in CERTIFY_SCALES that certifies (None if none)."""
    for k in CERTIFY_SCALES:
        mults = tuple(k * tj for tj in t)
        try:
            return certify_rho(lmi, mults), mults
        except CertificateError:
            continue
    return None


def certify_cost_s(sizes: list[int], n_in: int, n_out: int) -> float:
    """Rough seconds of one dense :func:`certify_rho` here: its flop count (block Cholesky,
    couplings, the input block's product, Lanczos and Cholesky) over a measured matrix
    product rate, times CERTIFY_COST_SAFETY."""
    flops = 0.0
    nxt = n_out
    for n in reversed(sizes):
        flops += n**3 / 3 + nxt * n * n + nxt * nxt * n
        nxt = n
    # input block: triangular solve, product, Lanczos (~LANCZOS_MATVECS products), Cholesky
    flops += nxt * nxt * n_in + n_in * n_in * nxt + n_in**3 / 3 + 2 * LANCZOS_MATVECS * n_in**2
    a = np.ones((CALIBRATION_N, CALIBRATION_N))
    t = time.perf_counter()
    a @ a
    rate = 2 * CALIBRATION_N**3 / max(time.perf_counter() - t, 1e-9)
    return CERTIFY_COST_SAFETY * flops / rate


def eclipse_refined_bound(net: Network, *, timeout_s: float | None = None) -> BoundResult:
    """Verified l2 Lipschitz bound of a chain by refined per-neuron multipliers (module
    docstring). ``timeout_s`` bounds the whole call (default :data:`DEFAULT_TIME_S`): the
    descent stops early enough for the final certificate check (its cost estimated by
    :func:`certify_cost_s`); with no time left it is skipped and the ECLipsE-Fast start is
    certified instead.

    Raises:
        NotApplicable: not a chain, too large, or slopes with a b < 0.
        LipcertError: nothing certified (never seen; reported as such).
    """
    check_refine_size(net)
    limit = DEFAULT_TIME_S if timeout_s is None else float(timeout_s)
    t0 = time.perf_counter()
    chain = net.chain()
    if any(lo * hi < 0 for lo, hi in chain.slopes()):
        raise NotApplicable("eclipse-refined needs slope bounds with a*b >= 0 on every neuron")
    sc = SparseChain.from_chain(chain)
    # the dense LMI that verify_on rebuilds (Lmi.from_chain): the sparse matrices are the
    # unrolled ones entry for entry (tested), and densifying them is much cheaper
    lmi = Lmi(tuple(w.toarray() for w in sc.weights), sc.alpha, sc.beta, chain.weight_errors)
    if lmi.depth == 0:
        rho = certify_rho(lmi, ())
        return _result(net, rho, (), {"total_s": time.perf_counter() - t0}, [], 0.0)
    problem = _Problem(sc)
    k_star, t_prime = problem.eclipse_start()
    starts = [
        (f, problem.evaluate(tuple(f * k_star * tj for tj in t_prime), k=EIGS))
        for f in START_SCALES
    ]
    ok = [(p.rho, f, p) for f, p in starts if p is not None]
    if not ok:
        raise LipcertError("eclipse-refined: the closed-form start is infeasible")
    _, f_best, start = min(ok, key=lambda r: r[0])
    t1 = time.perf_counter()
    cost = certify_cost_s(lmi.hidden_sizes, lmi.input_size, int(lmi.weights[-1].shape[0]))
    best, steps = refine(problem, start, t0 + limit - cost)
    t2 = time.perf_counter()
    found = _certify_scaled(lmi, best.t)
    if found is None and best is not start:
        found = _certify_scaled(lmi, start.t)
    t3 = time.perf_counter()
    if found is None:
        raise LipcertError("eclipse-refined multipliers did not certify", code="eclipse-unverified")
    rho, mults = found
    notes = [
        f"ECLipsE-Fast start: closed-form rho {k_star:.9g}, best scaling {f_best:g} "
        f"(estimated sqrt(rho) {math.sqrt(start.rho):.9g}); {steps} descent steps on "
        f"per-neuron multipliers (estimated {math.sqrt(best.rho):.9g}); certified "
        f"{math.sqrt(rho):.9g}; certificate check estimated {cost:.3g} s"
    ]
    timings = {"start_s": t1 - t0, "refine_s": t2 - t1, "verify_s": t3 - t2, "total_s": t3 - t0}
    return _result(net, rho, mults, timings, notes, k_star)


def _result(
    net: Network,
    rho: float,
    mults: tuple[Array, ...],
    timings: dict[str, float],
    notes: list[str],
    k_star: float,
) -> BoundResult:
    cert = Certificate(
        rho=rho,
        multipliers=mults,
        network_hash=net.content_hash(),
        meta={"method": "eclipse-refined", "closed_form_rho": k_star},
    )
    # certify_rho returned rho only after its Cholesky of all of -M(rho, T) - cI: that is
    # verify_certificate's own check, not repeated here (it costs as much again)
    return BoundResult(
        value=cert.lipschitz_bound,
        method="eclipse-refined",
        verified=True,
        certificate=cert,
        timings=timings,
        notes=(
            "per-neuron LipSDP-Neuron multipliers refined from ECLipsE-Fast's point on the "
            "sparse hidden matrix, certified by block Cholesky (design.md §3.5)",
            *notes,
        ),
    )


def refine_fits(net: Network, limit_s: float) -> bool:
    """Whether the certificate check of ``net`` (estimated by :func:`certify_cost_s`) takes at
    most FIT_SHARE of ``limit_s``: the start and some descent need the rest."""
    sizes = net.chain().hidden_sizes
    return certify_cost_s(sizes, net.input_size, net.output_size) <= FIT_SHARE * limit_s
