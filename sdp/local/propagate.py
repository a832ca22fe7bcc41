"""Interval (IBP) and linear (CROWN / alpha-CROWN) bounds over l2 balls, rigorous in float64.

Setting: a batch of balls B_b = {x : ||x - x0_b||_2 <= eps_b}; a graph (:mod:`sdp.local.graph`)
of affine, activation and add nodes. For a node k and objective rows Lambda (B, m, n_k) we want
rigorous lower bounds of Lambda_r^T z_k(x) over the ball.

Backward pass (Zhang et al., CROWN, NeurIPS 2018): the objective Lambda^T z_k is rewritten
node by node towards the input. Through an affine node v = W z + b,
Lambda^T v = (W^T Lambda)^T z + Lambda^T b; through an activation z = phi(v) with sound lines
(:mod:`sdp.local.relax`), Lambda_i z_i >= Lambda_i (s_i v_i + t_i) with the lower line where
Lambda_i >= 0 and the upper line where Lambda_i < 0; through an add node both parents receive
Lambda. At the input, Lambda_x^T x + c has the exact minimum Lambda_x^T x0 - eps ||Lambda_x||_2 + c
over the l2 ball (Cauchy-Schwarz; the dual of l2 is l2).

Floating point (the scheme of Neumaier & Shcherbina 2004, "Safe bounds in linear and
mixed-integer linear programming"): the coefficients Lambda are whatever floats the pass
computes, they need not be exact; every rounding error is moved into the constant. If the
computed multiplier at node p is L^ and the exact product would be L with |L - L^| <= D, then
L^T z >= L^^T z - D^T |z|max, and |z|max comes from rigorous interval bounds of node p on the
ball (IBP, tightened by earlier CROWN passes). Error terms: products and sums via gamma_n
(Higham §3.1, :mod:`sdp.local.fp`), W^T Lambda via gamma_t |W|^T |Lambda| with t the terms per
entry (so D^T |z|max = gamma_t |Lambda|^T (|W| |z|max)), elementwise Lambda s_i via u |.|, sums
of multipliers at a node with several consumers via u |.|. The constant c and the error sum e
are accumulated separately; the final bound lin - eps ||Lambda_x||^ + c - e is rounded downward
(:func:`sdp.local.fp.down`) with ||Lambda_x||^ an upper bound of the row norm
(:func:`sdp.rounding.row_norm_upper_bounds`). So: every bound returned here holds in exact
arithmetic for the network as imported (float64 weights taken as exact reals), for every x in
the closed ball, assuming activation library functions accurate to 16 ulps (see relax).

Intermediate bounds: every node that feeds an activation gets CROWN bounds (objective rows
+-e_i; an affine node starts from +-W directly), intersected with its interval bounds; for
ReLU-like consumers only the neurons unstable for that input are re-bounded, input by input
(design.md §4.1.2: per-input rows, skipped all-zero columns, 2-D GEMMs, and a dense first
layer concretised through its Gram matrix W W^T, :func:`_concretise_gram`).

Extension point: :func:`backward` takes ``act_rule``, a callable that may replace the default
CROWN step of any activation node (``(node, rel, lam, alpha) -> ActStep | None``; None keeps the
default). A method such as SDP-CROWN supplies its own multipliers and offset there; it must
return the rigorous error term of its own step (see :class:`ActStep`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import lru_cache

import numpy as np

from sdp._blas import one_thread
from sdp.ir import Array, Conv2d, Dense
from sdp.local.fp import ETA, U, down, err_scale, sum_down, sum_up, up, widen_up
from sdp.local.graph import Graph, Node
from sdp.local.relax import Relaxation, relax
from sdp.rounding import row_norm_upper_bounds

_CHUNK_ELEMS = 1 << 23  # floats per objective chunk in intermediate passes (~64 MB)


@dataclass(eq=False)
class BallBounds:
    """Bounds of every node of ``graph`` over a batch of balls (B inputs)."""

    graph: Graph
    x0: Array  # (B, n0)
    eps: Array  # (B,)
    lo: list[Array] = field(default_factory=list)  # per node (B, n)
    hi: list[Array] = field(default_factory=list)
    relax: dict[int, Relaxation] = field(default_factory=dict)  # act node -> lines
    _absw: dict[int, Array] = field(default_factory=dict)
    _centre: dict[int, tuple[Array, Array]] = field(default_factory=dict)

    @property
    def batch(self) -> int:
        return int(self.x0.shape[0])

    def zmax(self, idx: int) -> Array:
        return np.maximum(np.abs(self.lo[idx]), np.abs(self.hi[idx]))

    def absw_zmax(self, node: Node) -> Array:
        """Upper bound of |W| |z_parent|max (B, n_out), cached."""
        q = self._absw.get(node.index)
        if q is None:
            q = widen_up(node.abs_linear(self.zmax(node.parents[0])), node.terms_forward)
            self._absw[node.index] = q
        return q

    def centre(self, node: Node) -> tuple[Array, Array]:
        """(y0, ey0) for an affine node on the input: y0 = fl(W x0 + b) (B, n) and ey0 >= its
        rounding error |y0 - (W x0 + b)| entrywise (Higham §3.5, doubled), cached."""
        got = self._centre.get(node.index)
        if got is None:
            t = node.terms_forward
            y0 = node.linear(self.x0) + node.full_bias
            ey = 2.0 * err_scale(t) * (node.abs_linear(np.abs(self.x0)) + np.abs(node.full_bias))
            got = (np.asarray(y0), np.asarray(ey + (t + 2) * ETA))
            self._centre[node.index] = got
        return got


@dataclass(frozen=True, eq=False)
class ActStep:
    """One backward step through an activation node: multipliers ``mu`` (B, m, n) on the
    pre-activation, a constant ``const`` (B, m) (computed in float) and ``err`` (B, m), an upper
    bound of |exact - computed| of everything in this step, such that in exact arithmetic
    lam^T phi(v) >= mu^T v + const - err for all v in the node's pre-activation bounds.
    """

    mu: Array
    const: Array
    err: Array


@dataclass(frozen=True, eq=False)
class RowLines:
    """Per-row lines of one activation node, (B, m, n) each (or broadcastable), that replace
    the node's relaxation in :func:`backward`: s_lo v + t_lo <= phi(v) <= s_up v + t_up must
    hold in exact arithmetic on the node's pre-activation bounds for every row (build them
    with :func:`sdp.local.relax.line_intercepts`, which is rigorous for any slopes)."""

    lower_slope: Array
    lower_icpt: Array
    upper_slope: Array
    upper_icpt: Array


ActRule = Callable[[Node, Relaxation, Array, "Array | None", BallBounds], ActStep | None]


@dataclass(frozen=True, eq=False)
class BackwardResult:
    lower: Array  # (B, m) rigorous lower bounds
    lam_x: Array | None = None  # (B, m, n0) input multipliers (recorded)
    lam_act: dict[int, Array] | None = None  # act node -> (B, m, n) multipliers on its output


def crown_act_step(
    rel: Relaxation,
    lam: Array,
    alpha: Array | None,
    vmax: Array,
    lines: RowLines | None = None,
) -> ActStep:
    """The default step: lower line where lam >= 0, upper line where lam < 0.

    ``alpha`` (B, m, n) or None replaces the lower slope of ``rel.alpha_mask`` neurons (clipped
    to [alpha_min, alpha_max], where the line alpha z is valid).

    Neurons whose two lines are both 0 z + 0 in every input of the batch (stably inactive
    ReLUs) and that have no alpha give mu = 0 and no constant: only the other columns are
    computed (the sums then have fewer terms than n, so the error bounds still hold).
    ``lines`` (per-row sound lines) replaces the relaxation altogether.
    """
    b, m, n = lam.shape
    if lines is not None:
        pos = lam >= 0
        mu = lam * np.where(pos, lines.lower_slope, lines.upper_slope)
        ci = lam * np.where(pos, lines.lower_icpt, lines.upper_icpt)
        const = ci.sum(axis=-1)
        err = 2.0 * (U * np.einsum("bmn,bn->bm", np.abs(mu), vmax) + ETA * vmax.sum(-1)[:, None])
        err = err + err_scale(n) * np.abs(ci).sum(axis=-1) + (n + 2) * ETA
        return ActStep(mu, const, err)
    live = np.any(
        (rel.lower_slope != 0)
        | (rel.upper_slope != 0)
        | (rel.lower_icpt != 0)
        | (rel.upper_icpt != 0)
        | (rel.alpha_mask if alpha is not None else False),
        axis=0,
    )
    cols = None if live.all() else np.flatnonzero(live)
    if cols is not None and cols.size > 0.75 * n:
        cols = None

    def pick(a: Array) -> Array:
        return a if cols is None else a[..., cols]

    sl = pick(rel.lower_slope)[:, None, :]
    if alpha is not None:
        a = np.clip(pick(alpha), rel.alpha_min, rel.alpha_max)
        sl = np.where(pick(rel.alpha_mask)[:, None, :], a, sl)
    lc = pick(lam)
    pos = lc >= 0
    slope = np.where(pos, sl, pick(rel.upper_slope)[:, None, :])
    mu_c = lc * slope
    lo_i, up_i = pick(rel.lower_icpt), pick(rel.upper_icpt)
    if not lo_i.any():  # ReLU-like: only the upper line has an intercept
        ci = np.minimum(lc, 0.0) * up_i[:, None, :]
    else:
        ci = lc * np.where(pos, lo_i[:, None, :], up_i[:, None, :])
    k = mu_c.shape[-1]
    const = ci.sum(axis=-1)
    vm = pick(vmax)
    err = 2.0 * (U * np.einsum("bmn,bn->bm", np.abs(mu_c), vm) + ETA * vm.sum(-1)[:, None])
    err = err + err_scale(k) * np.abs(ci).sum(axis=-1) + (k + 2) * ETA
    if cols is None:
        mu = mu_c
    else:
        mu = np.zeros((b, m, n))
        mu[..., cols] = mu_c
    return ActStep(mu, const, err)


def backward(
    st: BallBounds,
    init: dict[int, Array],
    c0: Array,
    *,
    alphas: dict[int, Array] | None = None,
    act_rule: ActRule | None = None,
    box_at: int | None = None,
    record: bool = False,
    lines: dict[int, RowLines] | None = None,
) -> BackwardResult:
    """Rigorous lower bounds of sum_k init[k]^T z_k + c0 over the balls.

    Args:
        st: bounds of every node that ``init`` depends on (and relaxations of its act nodes).
        init: node -> multipliers (B, m, n_node), float (any values).
        c0: (B, m) exact constants.
        alphas: act node -> lower slopes (B, m, n) for alpha-CROWN (None: CROWN's choice).
        act_rule: optional replacement of activation steps (module docstring).
        box_at: concretise with the interval box of this node instead of going further (IBP).
        record: keep the multipliers (for gradients of alpha).
        lines: act node -> per-row sound lines (optimised tangents of smooth activations).
    """
    g = st.graph
    pending: dict[int, Array] = {}
    b = st.batch
    m = c0.shape[1]
    e = np.zeros((b, m))
    c = np.array(c0, dtype=np.float64)
    cabs = np.abs(c)
    lam_act: dict[int, Array] = {}
    lam_x: Array | None = None

    def push(idx: int, lam: Array) -> None:
        nonlocal e
        if idx in pending:
            s = pending[idx] + lam
            e = e + 2.0 * U * np.einsum("bmn,bn->bm", np.abs(s), st.zmax(idx))
            pending[idx] = s
        else:
            pending[idx] = lam

    for k, lam in init.items():
        push(k, np.broadcast_to(lam, (b, m, g.nodes[k].size)))
    for idx in range(max(init), -1, -1):
        if idx not in pending:
            continue
        lam = pending.pop(idx)
        node = g.nodes[idx]
        if idx == box_at or node.kind == "input":
            if node.kind == "input":
                lam_x = lam
            lo, hi = st.lo[idx], st.hi[idx]
            if node.kind == "input" and box_at != 0:
                x0 = st.x0
                n0 = x0.shape[1]
                lin = np.einsum("bmn,bn->bm", lam, x0)
                elin = err_scale(n0) * np.einsum("bmn,bn->bm", np.abs(lam), np.abs(x0))
                nrm = row_norm_upper_bounds(lam.reshape(b * m, n0)).reshape(b, m)
                en = st.eps[:, None] * nrm
                en = up(en, en)
                part = lin - en
                e = e + elin + (n0 + 2) * ETA
            else:  # box: min over z in [lo, hi] of lam^T z, through centre and radius
                ctr = 0.5 * lo + 0.5 * hi
                rad = np.maximum(
                    up(hi - ctr, np.abs(hi) + np.abs(ctr)), up(ctr - lo, np.abs(ctr) + np.abs(lo))
                )
                n = node.size
                lin = np.einsum("bmn,bn->bm", lam, ctr)
                en = np.einsum("bmn,bn->bm", np.abs(lam), rad)
                e = e + err_scale(n) * (np.einsum("bmn,bn->bm", np.abs(lam), np.abs(ctr)) + en)
                e = e + (n + 2) * ETA
                part = lin - en
            etot = 2.0 * (e + err_scale(len(g.nodes) + 2) * cabs)
            total = part + c - etot
            lower = down(total, np.abs(lin) + np.abs(en) + np.abs(c) + etot)
            pending.clear()
            return BackwardResult(lower, lam_x if record else None, lam_act if record else None)
        if node.kind == "affine" and not record and box_at not in (idx, 0) and _gram_ok(node):
            lin, en, eg = _concretise_gram(st, node, lam)
            e = e + eg
            etot = 2.0 * (e + err_scale(len(g.nodes) + 2) * cabs)
            total = lin - en + c - etot
            lower = down(total, np.abs(lin) + np.abs(en) + np.abs(c) + etot)
            pending.clear()
            return BackwardResult(lower)
        if node.kind == "act":
            rel = st.relax[idx]
            if record:
                lam_act[idx] = lam
            alpha = None if alphas is None else alphas.get(idx)
            p = node.parents[0]
            step = None if act_rule is None else act_rule(node, rel, lam, alpha, st)
            if step is None:
                ln = None if lines is None else lines.get(idx)
                step = crown_act_step(rel, lam, alpha, st.zmax(p), ln)
            c = c + step.const
            cabs = cabs + np.abs(step.const)
            e = e + step.err
            push(p, step.mu)
        elif node.kind == "affine":
            p = node.parents[0]
            t = node.terms_transpose
            q = st.absw_zmax(node)
            al = np.abs(lam)
            e = e + err_scale(t) * np.einsum("bmn,bn->bm", al, q)
            e = e + t * ETA * st.zmax(p).sum(-1)[:, None]
            bias = node.full_bias
            cb = np.asarray(lam @ bias)
            e = e + err_scale(node.size) * (al @ np.abs(bias)) + (node.size + 2) * ETA
            c = c + cb
            cabs = cabs + np.abs(cb)
            push(p, _transpose_sparse(node, lam))
        else:  # add
            for p in node.parents:
                push(p, lam)
    raise AssertionError("backward pass did not reach the input")


def row_norms_up(node: Node) -> Array:
    """Upper bounds of the l2 norms of the rows of an affine node's matrix (n_out,).

    Dense: the rows themselves; conv: the norm of the output channel's kernel (padding only
    drops taps, so it bounds every position's row).
    """
    op = node.op
    if isinstance(op, Conv2d):
        _, ho, wo = op.out_shape
        k = row_norm_upper_bounds(op.weight.reshape(op.weight.shape[0], -1))
        return np.repeat(k, ho * wo)
    assert isinstance(op, Dense)
    return row_norm_upper_bounds(op.weight)


@lru_cache(maxsize=16)
def _row_norms_cached(node: Node) -> Array:
    return row_norms_up(node)


def _transpose_sparse(node: Node, lam: Array) -> Array:
    """W^T lam, skipping the columns of lam that are zero everywhere (stably inactive ReLUs).

    Dropping exact zeros from a sum leaves fewer terms than ``terms_transpose``, so the error
    bound used for the full product still holds. Dense products run as one 2-D GEMM over all
    (input, row) pairs (a stacked 3-D matmul is several times slower for few rows per input).
    """
    op = node.op
    if isinstance(op, Dense):
        lead = lam.shape[:-1]
        flat = lam.reshape(-1, lam.shape[-1])
        nz = np.flatnonzero(np.any(flat != 0, axis=0))
        sparse = nz.size < 0.75 * op.out_features
        out = flat[:, nz] @ op.weight[nz] if sparse else flat @ op.weight
        return np.asarray(out).reshape(*lead, op.in_features)
    return node.transpose(lam)


def _gram_ok(node: Node) -> bool:
    """Concretise at this node through its Gram matrix: a dense layer on the input with fewer
    outputs than inputs (then W W^T is smaller than W)."""
    op = node.op
    return node.parents[0] == 0 and isinstance(op, Dense) and op.out_features < op.in_features


@lru_cache(maxsize=16)
def _gram(node: Node) -> tuple[Array, float]:
    """(Gf, rho) for the first dense layer W (n1, n0): Gf = fl(W W^T) and rho >= the largest
    row sum of M = err_scale(n0) |W| |W|^T + 2.1 err_scale(n1) |Gf|, so that for every float
    vector L with k <= n1 nonzeros, L^T (W W^T) L <= fl(L^T Gf L) + ||L||^2 rho in exact
    arithmetic (|Gf - W W^T| <= gamma_n0 |W||W|^T; the two nested k-term sums of
    fl(L^T Gf L) err by at most 2 gamma_{k+1} |L|^T |Gf| |L|; a symmetric non-negative
    matrix's largest eigenvalue is at most its largest row sum). Cached per node."""
    op = node.op
    assert isinstance(op, Dense)
    w = op.weight
    n1, n0 = w.shape
    gf = w @ w.T
    aw = np.abs(w)
    m = err_scale(n0) * (aw @ aw.T) + 2.1 * err_scale(n1) * np.abs(gf)
    rho = float(widen_up(np.max(m.sum(axis=1)), n1))
    return np.asarray(gf), rho * (1.0 + 16 * U) + n1 * ETA


def _concretise_gram(st: BallBounds, node: Node, lam: Array) -> tuple[Array, Array, Array]:
    """Exact-ball minimum of lam^T (W x + b) for the first dense layer, via its Gram matrix.

    min over ||x - x0|| <= eps of lam^T (W x + b) = lam^T y0* - eps ||W^T lam||_2 with
    y0* = W x0 + b exactly (Cauchy-Schwarz); ||W^T lam||^2 = lam^T (W W^T) lam is bounded with
    :func:`_gram` (so W^T lam, n0 wide, is never formed). Returns (lin, en, err) (B, m):
    lin = fl(lam^T y0), en >= eps ||W^T lam|| (exact), err >= |lin - lam^T y0*|; the bound is
    lin - en - err. Only the columns of lam that are nonzero somewhere are used (exact zeros).
    """
    b, m, n1 = lam.shape
    y0, ey0 = st.centre(node)
    flat = lam.reshape(b * m, n1)
    nz = np.flatnonzero(np.any(flat != 0, axis=0))
    k = int(nz.size)
    gf, rho = _gram(node)
    lc = lam[..., nz]
    yc, ec = y0[:, nz], ey0[:, nz]
    alc = np.abs(lc)
    lin = np.einsum("bmn,bn->bm", lc, yc)
    err = err_scale(k) * np.einsum("bmn,bn->bm", alc, np.abs(yc))
    err = err + np.einsum("bmn,bn->bm", alc, ec) * (1.0 + err_scale(k)) + 2 * (k + 2) * ETA
    fc = lc.reshape(b * m, k)
    q = np.einsum("pk,pk->p", fc @ gf[np.ix_(nz, nz)], fc).reshape(b, m)
    l2 = widen_up(np.einsum("pk,pk->p", fc, fc).reshape(b, m), k)
    sq = q + l2 * rho
    sq = np.maximum(up(sq, np.abs(q) + l2 * rho + (k + 2) ** 2 * ETA), 0.0)
    nrm = np.sqrt(sq)
    nrm = up(nrm, nrm)
    en = st.eps[:, None] * nrm
    en = up(en, en)
    return lin, en, err


def _affine_ibp(st: BallBounds, node: Node) -> tuple[Array, Array]:
    p = node.parents[0]
    t = node.terms_forward
    if p == 0:  # exact ball bounds: W x0 + b -+ eps ||W_i||_2 (row norms computed once)
        mid, err = st.centre(node)
        r = st.eps[:, None] * _row_norms_cached(node)[None, :]
        r = up(r, r)
        mag = np.abs(mid) + r + err
        return down(mid - r - err, mag), up(mid + r + err, mag)
    lo, hi = st.lo[p], st.hi[p]
    ctr = 0.5 * lo + 0.5 * hi
    rad = np.maximum(up(hi - ctr, np.abs(hi) + np.abs(ctr)), up(ctr - lo, np.abs(ctr) + np.abs(lo)))
    mid = node.linear(ctr) + node.full_bias
    r = node.abs_linear(rad)
    err = 2.0 * err_scale(t) * (node.abs_linear(np.abs(ctr)) + np.abs(node.full_bias) + r)
    err = err + (t + 2) * ETA
    mag = np.abs(mid) + r + err
    return down(mid - r - err, mag), up(mid + r + err, mag)


def _feeds_act(g: Graph, idx: int) -> bool:
    return any(g.nodes[c].kind == "act" for c in g.consumers[idx])


def _needs_tightening(g: Graph, st: BallBounds, idx: int) -> np.ndarray:
    """(B, n): neurons of node idx worth re-bounding, per input (unstable for ReLU-like
    consumers; every neuron with a nonzero width otherwise).

    Per input, not per batch: which neurons are re-bounded must not depend on the other
    inputs of its batch, or a certificate found in a batch would not re-verify alone
    (verify_local). The bounds' last bits still may: BLAS sums a batch's products in another
    order than one row's (up to ~2e-15 absolute seen, review10), so a certificate whose worst
    margin bound is within that of 0 can be refused alone (never accepted wrongly).
    """
    lo, hi = st.lo[idx], st.hi[idx]
    need = np.zeros(lo.shape, dtype=bool)
    for cidx in g.consumers[idx]:
        nd = g.nodes[cidx]
        if nd.kind != "act":
            continue
        assert nd.op is not None
        name = getattr(nd.op, "name", "")
        if name in ("relu", "leaky_relu"):
            need |= (lo < 0) & (hi > 0)
        elif name != "identity":
            need |= hi > lo
    return need


def node_objective(st: BallBounds, idx: int, sel: np.ndarray) -> tuple[dict[int, Array], Array]:
    """Objective rows (+e_i, -e_i for i in sel) of node idx as backward-pass inputs.

    For an affine node the rows start at its parent as +-W_i with the constants +-b_i (exact
    copies: ``transpose`` of a unit vector sums one product by 1.0 and zeros).
    """
    node = st.graph.nodes[idx]
    b, k = st.batch, sel.size
    if node.kind == "affine":
        if isinstance(node.op, Dense):
            w = node.op.weight[sel]
        else:
            unit = np.zeros((k, node.size))
            unit[np.arange(k), sel] = 1.0
            w = node.transpose(unit)
        bias = node.full_bias[sel]
        c0 = np.broadcast_to(np.concatenate([bias, -bias])[None], (b, 2 * k))
        return {node.parents[0]: np.concatenate([w, -w])[None]}, np.array(c0)
    eye = np.zeros((k, node.size))
    eye[np.arange(k), sel] = 1.0
    return {idx: np.concatenate([eye, -eye])[None]}, np.zeros((b, 2 * k))


def crown_node_bounds(
    st: BallBounds,
    idx: int,
    rows: np.ndarray,
    *,
    act_rule: ActRule | None = None,
    need: np.ndarray | None = None,
) -> tuple[Array, Array]:
    """CROWN lower and upper bounds of z_idx[rows] over the balls, (B, len(rows)) each.

    ``need`` (B, len(rows)) bool: bound only these (input, row) pairs (the others get -inf /
    +inf). Without an ``act_rule`` the inputs are bounded one by one, each with only its own
    rows: then the backward pass drops the columns that are zero for that input (its stably
    inactive neurons) and concretises the first dense layer through its Gram matrix, which is
    much cheaper than the rows of the whole batch on the full width. The rigorous error terms
    are those of :func:`backward` in every case (any batch composition gives a sound bound).
    """
    g = st.graph
    b = st.batch
    r = rows.size
    lows = np.full((b, r), -np.inf)
    highs = np.full((b, r), np.inf)
    width = max(nd.size for nd in g.nodes)
    if act_rule is None:
        for nd in g.nodes[: idx + 1]:  # fill the |W| |z|max caches once for the whole batch
            if nd.kind == "affine" and nd.index < idx:
                st.absw_zmax(nd)
        with one_thread():  # small per-input GEMMs: BLAS threads only add synchronisation
            _per_input_rows(st, idx, rows, need, lows, highs, width)
        return lows, highs
    chunk = max(1, _CHUNK_ELEMS // max(1, 2 * b * width))
    for s in range(0, r, chunk):
        sel = rows[s : s + chunk]
        k = sel.size
        init, c0 = node_objective(st, idx, sel)
        res = backward(st, init, c0, act_rule=act_rule)
        lows[:, s : s + k] = res.lower[:, :k]
        highs[:, s : s + k] = -res.lower[:, k:]
    return lows, highs


def _per_input_rows(
    st: BallBounds,
    idx: int,
    rows: np.ndarray,
    need: np.ndarray | None,
    lows: Array,
    highs: Array,
    width: int,
) -> None:
    """The per-input CROWN passes of :func:`crown_node_bounds` (results written in place)."""
    r = rows.size
    chunk = max(1, _CHUNK_ELEMS // max(1, 2 * width))
    for bi in range(st.batch):
        pos = np.arange(r) if need is None else np.flatnonzero(need[bi])
        if pos.size == 0:
            continue
        sub = single(st, bi)
        for s in range(0, pos.size, chunk):
            ps = pos[s : s + chunk]
            k = ps.size
            init, c0 = node_objective(sub, idx, rows[ps])
            res = backward(sub, init, c0)
            lows[bi, ps] = res.lower[0, :k]
            highs[bi, ps] = -res.lower[0, k:]


def compute_bounds(
    graph: Graph,
    x0: Array,
    eps: Array,
    *,
    linear: bool = True,
    act_rule: ActRule | None = None,
    node_hook: Callable[[BallBounds, int], None] | None = None,
) -> BallBounds:
    """Bounds of every node over the balls: IBP, tightened by CROWN where ``linear``.

    Note on the row W_i of an affine node: ``transpose(e_i)`` copies the weights exactly (a sum
    of one product by 1.0 and zeros), so the first layer's bounds are the exact-ball bounds
    W_i x0 + b_i -+ eps ||W_i||_2 (rounded outward).

    ``node_hook(st, idx)`` runs after the CROWN bounds of each node that feeds an activation
    and may tighten ``st.lo[idx]`` / ``st.hi[idx]`` further with any sound bound (e.g.
    intermediate alpha-CROWN); the relaxation of the consuming activation is built afterwards.
    """
    st = BallBounds(graph, x0, eps)
    for node in graph.nodes:
        if node.kind == "input":
            lo = down(x0 - eps[:, None], np.abs(x0) + eps[:, None])
            hi = up(x0 + eps[:, None], np.abs(x0) + eps[:, None])
        elif node.kind == "affine":
            lo, hi = _affine_ibp(st, node)
        elif node.kind == "act":
            p = node.parents[0]
            assert node.op is not None
            rel = relax(node.op, st.lo[p], st.hi[p])  # type: ignore[arg-type]
            st.relax[node.index] = rel
            lo, hi = rel.post_lo, rel.post_hi
        else:
            a, bb = node.parents
            lo, hi = sum_down(st.lo[a], st.lo[bb]), sum_up(st.hi[a], st.hi[bb])
        st.lo.append(np.array(lo, dtype=np.float64))
        st.hi.append(np.array(hi, dtype=np.float64))
        first = node.kind == "affine" and node.parents[0] == 0  # already exact on the ball
        if linear and node.kind != "input" and not first and _feeds_act(graph, node.index):
            need = _needs_tightening(graph, st, node.index)
            rows = np.flatnonzero(need.any(axis=0))
            if rows.size:
                sel = need[:, rows]
                cl, ch = crown_node_bounds(st, node.index, rows, act_rule=act_rule, need=sel)
                st.lo[-1][:, rows] = np.where(
                    sel, np.maximum(st.lo[-1][:, rows], cl), st.lo[-1][:, rows]
                )
                st.hi[-1][:, rows] = np.where(
                    sel, np.minimum(st.hi[-1][:, rows], ch), st.hi[-1][:, rows]
                )
            if node_hook is not None:
                node_hook(st, node.index)
    return st


def single(st: BallBounds, b: int) -> BallBounds:
    """The bounds of input b alone, as views (writes to lo/hi reach ``st``)."""
    sl = slice(b, b + 1)
    rel = {
        k: replace(
            r,
            lower_slope=r.lower_slope[sl],
            lower_icpt=r.lower_icpt[sl],
            upper_slope=r.upper_slope[sl],
            upper_icpt=r.upper_icpt[sl],
            post_lo=r.post_lo[sl],
            post_hi=r.post_hi[sl],
            alpha_mask=r.alpha_mask[sl],
        )
        for k, r in st.relax.items()
    }
    return BallBounds(
        st.graph,
        st.x0[sl],
        st.eps[sl],
        [a[sl] for a in st.lo],
        [a[sl] for a in st.hi],
        rel,
        {k: a[sl] for k, a in st._absw.items()},
        {k: (y[sl], e[sl]) for k, (y, e) in st._centre.items()},
    )
