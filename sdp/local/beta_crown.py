"""Branch and bound on the unstable ReLUs of every layer with optimised split multipliers
(beta-CROWN; Wang, Zhang, Xu, Lin, Jana, Hsieh, Kolter, "Beta-CROWN: Efficient Bound
Propagation with Per-neuron Split Constraints for Neural Network Robustness Verification",
NeurIPS 2021), on chains of dense / conv layers with relu or leaky relu (slope in [0, 1]).

Sub-domains. A split of the unstable pre-activation z_{k,i} (any hidden layer k) cuts the
ball B into B ∩ {z_{k,i} >= 0} and B ∩ {z_{k,i} <= 0}; a leaf of the split tree is
D = B ∩ {s_{k,i} z_{k,i}(x) >= 0 for its splits (s = +1 / -1)}, and the leaves of a complete
tree cover B, so min over leaves of a lower bound on each leaf bounds the margin on B.

Bound on a leaf (the paper's Theorem 1, derived again here). For beta >= 0 and x in D,
s_{k,i} z_{k,i}(x) >= 0, so for the margin row c

    c^T f(x) >= c^T f(x) - sum_{splits} beta_{k,i} s_{k,i} z_{k,i}(x)                 (*)

and the right-hand side is bounded from below over B by one CROWN backward pass whose
objective has the extra multipliers -beta s on the pre-activation nodes. On D the split neuron
is stable, so its relaxation is exact: its pre-activation interval is clipped to [max(l, 0), u]
or [l, min(u, 0)] (every other interval of the root is valid on D ⊂ B), and the layers after
the leaf's first split get their bounds recomputed on D on nets with 3+ splittable layers
(:func:`leaf_intervals`; Xu et al.,
"Fast and Complete: Enabling Complete Neural Network Verification with Rapid and Massively
Parallel Incomplete Verifiers", ICLR 2021, sec. 3). The bound is a concave
function of beta and, for fixed signs of the multipliers, of the lower slopes alpha; both are
optimised per leaf by projected Adam with gradients from the relaxed forward pass at the
minimising input x* = x0 - eps Lam_x / ||Lam_x|| (Danskin): d/d alpha_{k,i} = Lam_{k,i}
v_{k,i}(x*) where the lower line is in use, d/d beta_{k,i} = -s_{k,i} v_{k,i}(x*).

Algorithm per input and margin row (what CROWN, then alpha-CROWN left <= 0, the most
negative row first; inputs in order of CROWN's worst bound, each with an equal share of what
is left of the batch's budget): the root is alpha-CROWN (intermediate bounds tightened by
alpha-CROWN rows, :class:`sdp.local.alpha.IntermediateAlpha`; final slopes optimised), then
best-first rounds on
a batch of open domains: choose one neuron per domain (filtered smart branching, FSB: the
``FSB_TOP`` neurons of largest BaBSR intercept score -min(Lam, 0) t_up (the intercept the
upper line costs, Bunel et al., "Branch and Bound for Piecewise Linear Neural Network
Verification", JMLR 2020), each scored by the cheap bound of its two children with the
parent's alpha and beta, the best worst child wins; De Palma et al., "Improved Branch and Bound
for Neural Network Verification via Lagrangian Decomposition", 2021), optimise alpha and beta of
all children at once (one batched numpy pass per step over every domain) after recomputing
their intermediate bounds (3+ splittable layers only; there the earliest layers are split
first, see ``LAYER_BIAS``), keep the children whose float bound is positive as leaves, until every
domain is a leaf (certified), the budget is spent or a point x* of some domain is a real
counterexample (not certifiable).

Soundness in floating point. The float search only proposes leaves; each leaf's bound is then
recomputed in float64 by the rigorous :func:`sdp.local.propagate.backward` (Neumaier-Shcherbina
error absorption, outward rounding; design.md §4.1) with the leaf's rigorous intervals
(:func:`leaf_intervals`, a function of the root bounds and the leaf's signs only), the
objective ``{output: c, pre_k: -beta s}`` and the leaf's alphas; an empty leaf (contradictory
intervals) is +inf. The row's bound is the larger of
alpha-CROWN's and the minimum over the leaves. ``verify_local`` recomputes the root from the
stored intermediate alphas, checks that the leaves cover the ball (a complete split tree,
:func:`covers`) and recomputes every leaf.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import numpy as np
from numpy.typing import NDArray

import sdp.local.sdp_crown_method  # noqa: F401  (registers sdp-crown first: auto order)
from sdp._blas import one_thread
from sdp.errors import NotApplicable
from sdp.ir import Activation, Array, Dense
from sdp.local import clock
from sdp.local.alpha import InterAlphas, IntermediateAlpha
from sdp.local.graph import Graph, Node
from sdp.local.margins import (
    MarginBounds,
    MarginMethod,
    Payload,
    _decode_inter,
    _encode_inter,
    _finish,
    box_margins,
    get_method,
    objective_rows,
    register_method,
)
from sdp.local.propagate import (
    BallBounds,
    _affine_ibp,
    backward,
    compute_bounds,
    crown_node_bounds,
    node_objective,
    single,
)
from sdp.local.relax import relax

BUDGET_S = 1.0
"""Seconds per input (root included) for one certify-at-eps answer."""
MAX_SHARE = 2.0
"""One input's search gets at most this many ``BUDGET_S`` (of what easier inputs left): on
mnistfc-256x2 at eps 0.3 the uncapped share gave the few hopeless inputs all the time the
easy ones left (2.5 s per input in all, wall, loaded machine; 0.3 s before) for nothing."""
BATCH = 96
"""Open domains branched per round."""
BATCH_DEEP = 16
"""Open domains branched per round with intermediate bounds recomputed (3+ hidden layers):
each child costs about one CROWN pass, so fewer per round keeps best-first order."""
FSB_TOP = 3
"""Candidate neurons per domain scored by their children's bounds (FSB)."""
ITERATIONS = 6
"""Adam steps on alpha and beta per round."""
MAX_DOMAINS = 20000
"""Open domains plus leaves per row before giving up."""
REFRESH = True
"""Recompute the intermediate bounds on each sub-domain (:func:`leaf_intervals`) in the float
search, on nets with at least ``REFRESH_MIN_LAYERS`` splittable layers."""
REFRESH_MIN_LAYERS = 3
"""Splittable layers from which the intermediate bounds are recomputed on each sub-domain, in
the float search and in the rigorous leaf check alike (:func:`leaf_intervals`; a function of
the net, so ``verify_local`` re-derives the same). With 2 only the last layer can tighten, and
on mnistfc-256x2 it cost more than it gained: at eps 0.5 (100 images, 1 CPU s per input) 36 %
certified with the per-child CROWN pass in the search, 40 % without; the rigorous check of a
5674-leaf tree took 8 CPU s with it (a per-leaf backward pass per unstable layer-2 row), after
a 6 s search, and overran the radius search's probes by up to 7 s."""
LAYER_BIAS = 10.0
"""With 3+ splittable layers and ``REFRESH``: FSB candidates from the earliest layers first
(:func:`branch`). On mnistfc-256x6 (eps 0.3, test image 14) the worst open bound went from
-2.67 to -0.42 in 5 rounds with it, to -1.58 in 45 rounds without (splits in the last
layer, whose bounds stayed loose: 173 of 256 neurons unstable, 47 with it)."""
LEAF_CHUNK = 512
"""Leaves per rigorous pass (memory: every node's bounds per leaf, the input's included)."""
THRESHOLD = 1e-7
"""A float bound above this makes a leaf (the rigorous bound is recomputed anyway)."""
CROWN_PROBES = 10
"""CROWN bisection steps that start the radius search."""
CROWN_SHARE = 0.25
"""The radius search's CROWN start stops at this share of the batch's budget."""
RADIUS_STEP = 1.25
RADIUS_RTOL = 0.01
_now = clock.now  # the budgets' clock (sdp.local.clock: wall, or CPU seconds in a benchmark)


ROOT_INTER_ITERATIONS = 10
ROOT_ITERATIONS = 20
LR_ALPHA = 0.1
LR_ROOT = 0.5
LR_BETA = 0.05


# ----------------------------------------------------------------------------- the chain


@dataclass(frozen=True, eq=False)
class Chain:
    """A chain graph: ``pre[k]`` feeds the relu-like act node ``act[k]`` (negative slope
    ``slope[k]``); ``split[k]`` says whether its neurons may be split (not for identity)."""

    graph: Graph
    pre: tuple[int, ...]
    act: tuple[int, ...]
    slope: tuple[float, ...]
    gram: Array | None = None  # W_1 W_1^T for a dense first layer (float search only)

    @property
    def split(self) -> tuple[bool, ...]:
        return tuple(p < 1.0 for p in self.slope)


def chain_of(graph: Graph) -> Chain:
    """The relu-like chain of ``graph`` (NotApplicable otherwise)."""
    pre, act, slope = [], [], []
    for nd in graph.nodes[1:]:
        if nd.kind not in ("affine", "act") or nd.parents != (nd.index - 1,):
            raise NotApplicable("beta-crown handles chains of dense/conv layers only")
        if nd.kind == "act":
            op = nd.op
            assert isinstance(op, Activation)
            if op.name == "relu":
                p = 0.0
            elif op.name == "leaky_relu" and 0.0 <= op.param <= 1.0:
                p = float(op.param)
            elif op.name == "identity":
                p = 1.0
            else:
                raise NotApplicable(f"beta-crown handles relu / leaky relu, not {op.name}")
            pre.append(nd.parents[0])
            act.append(nd.index)
            slope.append(p)
    if not any(p < 1.0 for p in slope):
        raise NotApplicable("beta-crown needs a hidden ReLU-like layer to split")
    first = graph.nodes[1] if len(graph.nodes) > 1 else None
    gram = None
    if first is not None and first.kind == "affine" and isinstance(first.op, Dense):
        w = first.op.weight
        if w.shape[0] < w.shape[1]:
            gram = _GRAMS.get(first)
            if gram is None:
                gram = _GRAMS[first] = np.asarray(w @ w.T)
    return Chain(graph, tuple(pre), tuple(act), tuple(slope), gram)


_GRAMS: weakref.WeakKeyDictionary[Node, Array] = weakref.WeakKeyDictionary()


def applies(graph: Graph) -> bool:
    try:
        chain_of(graph)
    except NotApplicable:
        return False
    return True


# ------------------------------------------------------------------ float bound (search only)


Signs: TypeAlias = NDArray[np.int8]
"""Split signs of one act node's neurons, (L, n) per leaf or domain: +1 for z >= 0, -1 for
z <= 0, 0 not split."""


@dataclass(eq=False)
class Domains:
    """D sub-domains of one (input, margin row): per act k, (D, n_k) arrays."""

    lo: list[Array]
    hi: list[Array]
    alpha: list[Array]
    beta: list[Array]
    sgn: list[Signs]
    bound: Array  # (D,)
    c: Array  # (D, K) the margin row of each domain
    row: np.ndarray  # (D,) its index j

    @property
    def size(self) -> int:
        return int(self.bound.shape[0])

    def take(self, idx: np.ndarray) -> Domains:
        return Domains(
            [a[idx] for a in self.lo],
            [a[idx] for a in self.hi],
            [a[idx] for a in self.alpha],
            [a[idx] for a in self.beta],
            [a[idx] for a in self.sgn],
            self.bound[idx],
            self.c[idx],
            self.row[idx],
        )

    @staticmethod
    def cat(parts: list[Domains]) -> Domains:
        k = len(parts[0].lo)

        def join(name: str) -> list[NDArray[Any]]:  # each field keeps its dtype
            return [np.concatenate([getattr(p, name)[j] for p in parts]) for j in range(k)]

        return Domains(
            join("lo"),
            join("hi"),
            join("alpha"),
            join("beta"),
            join("sgn"),
            np.concatenate([p.bound for p in parts]),
            np.concatenate([p.c for p in parts]),
            np.concatenate([p.row for p in parts]),
        )


Lines = list[tuple[Array, Array, Array, np.ndarray]]


def lines_of(ch: Chain, d: Domains) -> Lines:
    """Per act: (stable lower slope, upper slope, upper intercept, unstable) of each domain."""
    out = []
    for k in range(len(d.lo)):
        l, u, p = d.lo[k], d.hi[k], ch.slope[k]
        unst = (l < 0) & (u > 0)
        w = np.where(unst, u - l, 1.0)
        su = np.where(unst, (u - p * l) / w, np.where(l >= 0, 1.0, p))
        tu = np.where(unst, (p - su) * l, 0.0)
        out.append((np.where(l >= 0, 1.0, p), su, tu, unst))
    return out


@dataclass(eq=False)
class _Pass:
    bound: Array
    lam_base: Array  # multipliers on the base node (the input, or z_1 with a Gram matrix)
    lam_act: list[Array]
    slope: list[Array]
    icpt: list[Array]
    pos: list[np.ndarray]
    quad: Array  # ||lam_x||_2 (D,)
    glam: Array | None  # G lam_base (Gram form) or None


def float_bound(
    ch: Chain,
    x0: Array,
    eps: float,
    d: Domains,
    lines: Lines | None = None,
    top: int | None = None,
) -> _Pass:
    """Float lower bound of c^T f - sum beta s z over B with each domain's lines (a guide).

    ``top`` (default the output): the node whose value d.c multiplies (an intermediate bound).
    With a dense first layer z_1 = W_1 x + b_1 the input stage stays in z_1's space:
    lam_x = W_1^T mu, so lam_x^T x0 = mu^T W_1 x0 and ||lam_x|| = sqrt(mu^T G mu), G = W_1 W_1^T.
    """
    g = ch.graph
    n = d.size
    kmap = {a: k for k, a in enumerate(ch.act)}
    if lines is None:
        lines = lines_of(ch, d)
    lam = np.array(d.c)
    const = np.zeros(n)
    nk = len(ch.act)
    lam_act: list[Array] = [np.zeros(0)] * nk
    slope: list[Array] = [np.zeros(0)] * nk
    icpt: list[Array] = [np.zeros(0)] * nk
    pos: list[np.ndarray] = [np.zeros(0, dtype=bool)] * nk
    for idx in range(g.output if top is None else top, 0, -1):
        nd = g.nodes[idx]
        if nd.kind == "affine":
            const += lam @ nd.full_bias
            if idx == 1 and ch.gram is not None:
                break
            lam = nd.transpose(lam)
        else:
            k = kmap[idx]
            fixed, su, tu, unst = lines[k]
            ps = lam >= 0
            s = np.where(ps, np.where(unst, d.alpha[k], fixed), su)
            t = np.where(ps, 0.0, tu)
            lam_act[k], slope[k], icpt[k], pos[k] = lam, s, t, ps
            const += (lam * t).sum(axis=1)
            lam = lam * s - d.beta[k] * d.sgn[k]
    if ch.gram is not None:
        glam = lam @ ch.gram
        nrm = np.sqrt(np.maximum((lam * glam).sum(axis=1), 0.0))
        lin = lam @ g.nodes[1].linear(x0)
    else:
        glam = None
        nrm = np.linalg.norm(lam, axis=1)
        lin = lam @ x0
    bound = lin - eps * nrm + const
    return _Pass(bound, lam, lam_act, slope, icpt, pos, nrm, glam)


def _minimisers(ch: Chain, x0: Array, eps: float, pas: _Pass) -> Array:
    """The base node's value at the minimising input x* = x0 - eps lam_x / ||lam_x||."""
    inv = eps / np.where(pas.quad > 0, pas.quad, 1.0)[:, None]
    if pas.glam is None:
        return np.asarray(x0[None, :] - inv * pas.lam_base)
    first = ch.graph.nodes[1]
    return np.asarray((first.linear(x0) + first.full_bias)[None, :] - inv * pas.glam)


def _base(ch: Chain) -> int:
    return 1 if ch.gram is not None else 0


def _relaxed_pre(ch: Chain, v: Array, pas: _Pass, top: int | None = None) -> list[Array]:
    """Pre-activations of the relaxed network (each domain's lines) from the base values v."""
    g = ch.graph
    kmap = {a: k for k, a in enumerate(ch.act)}
    pre: list[Array] = [np.zeros(0)] * len(ch.act)
    for nd in g.nodes[_base(ch) + 1 : g.output + 1 if top is None else top]:
        if nd.kind == "affine":
            v = nd.linear(v) + nd.full_bias
        else:
            k = kmap[nd.index]
            pre[k] = v
            v = pas.slope[k] * v + pas.icpt[k]
    return pre


def _true_margin(ch: Chain, c: Array, v: Array) -> Array:
    """c_d^T f(x_d) per domain d (float) from the base node's values v."""
    g = ch.graph
    kmap = {a: k for k, a in enumerate(ch.act)}
    for nd in g.nodes[_base(ch) + 1 :]:
        if nd.kind == "affine":
            v = nd.linear(v) + nd.full_bias
        else:
            p = ch.slope[kmap[nd.index]]
            v = np.where(v >= 0, v, p * v)
    return np.asarray((v * c).sum(axis=1))


def optimise(
    ch: Chain,
    x0: Array,
    eps: float,
    d: Domains,
    iters: int,
    *,
    top: int | None = None,
    stop_at: float | None = THRESHOLD,
    lr: float = LR_ALPHA,
    deadline: float | None = None,
) -> tuple[Domains, Array]:
    """Projected Adam on alpha (in [p, 1]) and beta (>= 0); the best iterate per domain.

    Stops early once every bound is above ``stop_at``, or when the last step's measured time
    says the next would end past ``deadline`` (:func:`sdp.local.clock.fits`; the start is
    always evaluated). Also returns the base node's values at the minimising inputs x* of the
    last pass (candidate counterexamples)."""
    alpha = [a.copy() for a in d.alpha]
    beta = [b.copy() for b in d.beta]
    best = np.full(d.size, -np.inf)
    best_a = [a.copy() for a in alpha]
    best_b = [b.copy() for b in beta]
    ma = [np.zeros_like(a) for a in alpha]
    va = [np.zeros_like(a) for a in alpha]
    mb = [np.zeros_like(b) for b in beta]
    vb = [np.zeros_like(b) for b in beta]
    b1, b2 = 0.9, 0.999
    xs = np.zeros(0)
    lines = lines_of(ch, d)
    split = [bool(np.any(sg != 0)) for sg in d.sgn]
    last = 0.0  # seconds of the last whole step
    for it in range(iters + 1):
        t_it = _now()
        cur = Domains(d.lo, d.hi, alpha, beta, d.sgn, d.bound, d.c, d.row)
        pas = float_bound(ch, x0, eps, cur, lines, top)
        better = pas.bound > best
        best = np.where(better, pas.bound, best)
        for k in range(len(alpha)):
            best_a[k][better] = alpha[k][better]
            best_b[k][better] = beta[k][better]
        xs = _minimisers(ch, x0, eps, pas)
        if it == iters or (stop_at is not None and bool(np.all(best > stop_at))):
            break
        if not clock.fits(deadline, last or 2.0 * (_now() - t_it)):
            break
        pre = _relaxed_pre(ch, xs, pas, top)
        lr_a = lr * 0.98**it
        lr_b = LR_BETA * 0.98**it
        t = it + 1
        for k in range(len(alpha)):
            ga = np.where(pas.pos[k] & lines[k][3], pas.lam_act[k] * pre[k], 0.0)
            ma[k] = b1 * ma[k] + (1 - b1) * ga
            va[k] = b2 * va[k] + (1 - b2) * ga * ga
            sa = lr_a * (ma[k] / (1 - b1**t)) / (np.sqrt(va[k] / (1 - b2**t)) + 1e-12)
            alpha[k] = np.clip(alpha[k] + sa, ch.slope[k], 1.0)
            if not split[k]:
                continue
            gb = -d.sgn[k] * pre[k]
            mb[k] = b1 * mb[k] + (1 - b1) * gb
            vb[k] = b2 * vb[k] + (1 - b2) * gb * gb
            sb = lr_b * (mb[k] / (1 - b1**t)) / (np.sqrt(vb[k] / (1 - b2**t)) + 1e-12)
            beta[k] = np.where(d.sgn[k] != 0, np.maximum(beta[k] + sb, 0.0), 0.0)
        last = _now() - t_it
    out = Domains(d.lo, d.hi, best_a, best_b, d.sgn, best, d.c, d.row)
    return out, xs


def _children(d: Domains, k_of: np.ndarray, i_of: np.ndarray, side: np.ndarray) -> Domains:
    """Copies of the domains with neuron (layer k_of[j], index i_of[j]) split to ``side``."""
    out = Domains(
        [a.copy() for a in d.lo],
        [a.copy() for a in d.hi],
        [a.copy() for a in d.alpha],
        [a.copy() for a in d.beta],
        [a.copy() for a in d.sgn],
        d.bound.copy(),
        d.c,
        d.row,
    )
    rows = np.arange(d.size)
    for k in range(len(d.lo)):
        m = k_of == k
        if not m.any():
            continue
        r, i, s = rows[m], i_of[m], side[m]
        out.lo[k][r, i] = np.where(s > 0, np.maximum(out.lo[k][r, i], 0.0), out.lo[k][r, i])
        out.hi[k][r, i] = np.where(s < 0, np.minimum(out.hi[k][r, i], 0.0), out.hi[k][r, i])
        out.sgn[k][r, i] = s
    return out


def branch(
    ch: Chain, x0: Array, eps: float, d: Domains, bias: float | None = None
) -> Domains | None:
    """Split every domain on its FSB-chosen neuron: 2 D children (None: nothing to split).

    ``bias``: the BaBSR scores of act layer k are multiplied by bias^(K - 1 - k), so the FSB
    candidates come from the earliest layers first (with intermediate bounds recomputed per
    sub-domain an early split tightens every later layer, which the score does not see)."""
    scores = []
    lines = lines_of(ch, d)
    pas = float_bound(ch, x0, eps, d, lines)
    for k in range(len(d.lo)):
        l, u = d.lo[k], d.hi[k]
        _, _, tu, unst = lines[k]
        ok = unst & (d.sgn[k] == 0) & ch.split[k]
        lam = pas.lam_act[k]
        sc = -np.minimum(lam, 0.0) * tu + 1e-3 * np.abs(lam) * np.minimum(u, -l)
        if bias is not None:
            sc = sc * bias ** (len(d.lo) - 1 - k)
        scores.append(np.where(ok, sc, -np.inf))
    flat = np.concatenate(scores, axis=1)
    offs = np.cumsum([0] + [s.shape[1] for s in scores])
    top = min(FSB_TOP, flat.shape[1])
    cand = np.argsort(-flat, axis=1)[:, :top]  # (D, top)
    valid = np.take_along_axis(flat, cand, axis=1) > -np.inf
    if not valid[:, 0].all():
        return None
    n = d.size
    k_of = np.searchsorted(offs, cand, side="right") - 1
    i_of = cand - offs[k_of]
    rep = d.take(np.repeat(np.arange(n), 2 * top))
    ks = np.repeat(k_of.reshape(-1), 2)
    is_ = np.repeat(i_of.reshape(-1), 2)
    side = np.tile(np.array([1, -1], dtype=np.int8), n * top)
    kids = _children(rep, ks, is_, side)
    val = float_bound(ch, x0, eps, kids).bound.reshape(n, top, 2).min(axis=2)
    val = np.where(valid, val, -np.inf)
    pick = np.argmax(val, axis=1)
    kk = np.repeat(k_of[np.arange(n), pick], 2)
    ii = np.repeat(i_of[np.arange(n), pick], 2)
    two = d.take(np.repeat(np.arange(n), 2))
    return _children(two, kk, ii, np.tile(np.array([1, -1], dtype=np.int8), n))


def refresh(
    ch: Chain, st1: BallBounds, d: Domains, inter: InterAlphas | None = None
) -> tuple[Domains, np.ndarray]:
    """The domains with their pre-activation intervals recomputed on each sub-domain by
    :func:`leaf_intervals` (rigorous, so the float search branches on what the leaf check
    will see), and which of them are empty."""
    st, empty = leaf_intervals(ch, st1, d.sgn, inter)
    lo = [np.array(st.lo[p]) for p in ch.pre]
    hi = [np.array(st.hi[p]) for p in ch.pre]
    return Domains(lo, hi, d.alpha, d.beta, d.sgn, d.bound, d.c, d.row), empty


def search(
    ch: Chain,
    x0: Array,
    eps: float,
    root: Domains,
    deadline: float,
    st1: BallBounds | None = None,
    inter: InterAlphas | None = None,
) -> tuple[Domains | None, str]:
    """Float branch and bound of the root domains (one per margin row, all rows in one batch):
    the leaves (all float-positive) and "ok", or None and why ("timeout", "counterexample":
    the margin is negative at a point of the ball, "no-split"). With the root bounds ``st1``
    (one input) each child's intermediate intervals are recomputed (:func:`refresh`); an
    empty child is a leaf (bound +inf)."""
    open_ = root
    leaves: list[Domains] = []
    n_leaves = 0
    deep = st1 is not None and sum(ch.split) > 2
    batch = BATCH_DEEP if deep else BATCH
    bias = LAYER_BIAS if deep else None
    per_kid = 0.0  # seconds per child in the last round (deep nets: a round must fit)
    while open_.size:
        t_round = _now()
        take = batch
        if deep:  # a first round of 4 measures the cost of a child
            guess = (deadline - t_round) / (2.0 * per_kid) if per_kid > 0 else 4
            take = int(max(1, min(batch, guess)))
        # no round begun that the last round's time per child says would end past the deadline
        est = 2.0 * per_kid * min(take, open_.size)
        if not clock.fits(deadline, est) or open_.size + n_leaves > MAX_DOMAINS:
            return None, "timeout"
        order = np.argsort(open_.bound)
        now, rest = open_.take(order[:take]), open_.take(order[take:])
        kids = branch(ch, x0, eps, now, bias)
        if kids is None:
            return None, "no-split"
        if st1 is not None:
            kids, empty = refresh(ch, st1, kids, inter)
            if empty.any():
                gone = kids.take(np.flatnonzero(empty))
                gone.bound = np.full(gone.size, np.inf)
                leaves.append(gone)
                n_leaves += gone.size
                kids = kids.take(np.flatnonzero(~empty))
                if kids.size == 0:
                    open_ = rest
                    continue
        kids, xs = optimise(ch, x0, eps, kids, ITERATIONS)
        if bool(np.any(_true_margin(ch, kids.c, xs) < 0)):
            return None, "counterexample"
        per_kid = (_now() - t_round) / max(1, 2 * now.size)
        done = kids.bound > THRESHOLD
        if done.any():
            leaves.append(kids.take(np.flatnonzero(done)))
            n_leaves += int(done.sum())
        left = kids.take(np.flatnonzero(~done))
        open_ = Domains.cat([left, rest]) if rest.size else left
    return (Domains.cat(leaves), "ok") if leaves else (None, "no-split")


# ------------------------------------------------------------------------ rigorous leaves


@dataclass(frozen=True, eq=False)
class LeafProblem:
    """The rigorous backward pass of L leaves: bounds valid on each leaf (root intervals
    clipped by its splits, relaxations rebuilt), the objective ``{output: c, pre_k: -beta s}``,
    the alphas, and which leaves are empty (a split contradicting the root intervals)."""

    bounds: BallBounds
    init: dict[int, Array]
    alphas: dict[int, Array]
    empty: np.ndarray


def _alpha_rows(
    ch: Chain,
    st: BallBounds,
    idx: int,
    rows: np.ndarray,
    need: np.ndarray,
    got: tuple[np.ndarray, dict[int, Array]],
) -> tuple[Array, Array]:
    """Bounds of z_idx[rows] on each leaf (where ``need``; -inf / +inf elsewhere) by one
    rigorous backward pass per leaf with the root's intermediate alphas ``got`` of those rows
    (CROWN's slopes for a row or an act node without any)."""
    stored, al = got
    stored = np.asarray(stored, dtype=np.intp).reshape(-1)
    n_st = stored.size
    pos = np.full(st.graph.nodes[idx].size, -1, dtype=np.intp)
    pos[stored] = np.arange(n_st)  # a row's place among the stored rows (-1: none)
    b, r = need.shape
    lows = np.full((b, r), -np.inf)
    highs = np.full((b, r), np.inf)
    for nd in st.graph.nodes[:idx]:  # the |W| |z|max caches, once for all leaves
        if nd.kind == "affine":
            st.absw_zmax(nd)
    acts = [a for a in ch.act if a < idx]
    with one_thread():
        for bi in range(b):
            mine = np.flatnonzero(need[bi])
            if mine.size == 0:
                continue
            sub = single(st, bi)
            sel = rows[mine]
            m = sel.size
            init, c0 = node_objective(sub, idx, sel)
            q = pos[sel]
            has = np.flatnonzero(q >= 0)
            alphas: dict[int, Array] = {}
            for a in acts:
                base = st.relax[a].lower_slope[bi]
                obj = np.broadcast_to(base, (2 * m, base.shape[0])).copy()
                arr = al.get(a)
                if arr is not None and arr.shape == (2 * n_st, base.shape[0]):
                    obj[has] = arr[q[has]]
                    obj[m + has] = arr[n_st + q[has]]
                alphas[a] = obj[None]
            low = backward(sub, init, c0, alphas=alphas).lower[0]
            lows[bi, mine] = low[:m]
            highs[bi, mine] = -low[m:]
    return lows, highs


def leaf_intervals(
    ch: Chain,
    root: BallBounds,
    sgn: list[Signs],
    inter: InterAlphas | None = None,
    recompute: bool | None = None,
) -> tuple[BallBounds, np.ndarray]:
    """Rigorous bounds of every node on each leaf D (batch L), and which leaves are empty.

    A function of the root bounds and the leaf's split signs only (so ``verify_local``
    re-derives it; nothing stored is trusted). Node by node, in order: the root interval
    (valid on D ⊂ B), intersected for a later affine node with its interval propagation from
    the leaf's bounds so far, and (on nets with ``REFRESH_MIN_LAYERS`` splittable layers or
    more, or whenever ``recompute`` is True), for the pre-activations of every layer after
    the leaf's first split layer, with CROWN bounds
    (:func:`sdp.local.propagate.crown_node_bounds`, rows of the neurons still unstable on
    the leaf) computed through the leaf's relaxations, in
    which each split neuron's interval is clipped to its side and so its relaxation is exact
    (Xu et al., "Fast and Complete", ICLR 2021, sec. 3: intermediate bounds recomputed in
    each sub-domain); split neurons are then clipped, [max(l, 0), u] / [l, min(u, 0)]. Every
    bound holds for all x in D by induction over the nodes (CROWN's bound holds wherever the
    intervals it relaxed on hold). A leaf with lo > hi somewhere is empty (no point of B
    satisfies its splits).

    ``inter``: the root's intermediate alphas (``node -> (rows, {act: (2 r, n) alphas})``, as
    alpha-CROWN found them and the payload stores them); the recomputed rows use the lower
    slopes of their row there (any slope in [p, 1] is sound; ``backward`` clips), CROWN's
    own where a row has none. Without them a deep net's recomputed bounds are mostly looser
    than the root's alpha-CROWN bounds and change little."""
    g = ch.graph
    n_leaf = sgn[0].shape[0] if sgn else 1
    rep = np.zeros(n_leaf, dtype=np.intp)
    st = BallBounds(g, np.array(root.x0[rep]), np.array(root.eps[rep]))
    kmap = {p: k for k, p in enumerate(ch.pre)}
    has = np.stack([np.any(s != 0, axis=1) for s in sgn], axis=1)  # (L, n_act)
    first = np.where(has.any(axis=1), np.argmax(has, axis=1), len(ch.pre))
    empty = np.zeros(n_leaf, dtype=bool)
    deep = sum(ch.split) >= REFRESH_MIN_LAYERS if recompute is None else recompute
    for node in g.nodes:
        idx = node.index
        rlo, rhi = root.lo[idx][rep], root.hi[idx][rep]
        if node.kind == "affine" and node.parents[0] != 0:
            blo, bhi = _affine_ibp(st, node)
            lo, hi = np.maximum(blo, rlo), np.minimum(bhi, rhi)
        elif node.kind == "act":
            op = node.op
            assert isinstance(op, Activation)
            p = node.parents[0]
            rel = relax(op, st.lo[p], np.maximum(st.hi[p], st.lo[p]))
            st.relax[idx] = rel
            lo, hi = np.maximum(rel.post_lo, rlo), np.minimum(rel.post_hi, rhi)
        else:  # the input and the first affine layer: the root's (exact on the ball)
            lo, hi = np.array(rlo), np.array(rhi)
        st.lo.append(np.array(lo, dtype=np.float64))
        st.hi.append(np.array(hi, dtype=np.float64))
        k = kmap.get(idx)
        if k is None:
            continue
        if deep and ch.split[k] and node.kind == "affine" and node.parents[0] != 0:
            need = (st.lo[idx] < 0) & (st.hi[idx] > 0) & (first < k)[:, None] & ~empty[:, None]
            rows = np.flatnonzero(need.any(axis=0))
            if rows.size:
                sel = need[:, rows]
                got = None if inter is None else inter.get(idx)
                if got is None:
                    cl, cu = crown_node_bounds(st, idx, rows, need=sel)
                else:
                    cl, cu = _alpha_rows(ch, st, idx, rows, sel, got)
                cur_lo, cur_hi = st.lo[idx][:, rows], st.hi[idx][:, rows]
                st.lo[idx][:, rows] = np.where(sel, np.maximum(cur_lo, cl), cur_lo)
                st.hi[idx][:, rows] = np.where(sel, np.minimum(cur_hi, cu), cur_hi)
        s = sgn[k]
        st.lo[idx] = np.where(s > 0, np.maximum(st.lo[idx], 0.0), st.lo[idx])
        st.hi[idx] = np.where(s < 0, np.minimum(st.hi[idx], 0.0), st.hi[idx])
        empty |= np.any(~(st.lo[idx] <= st.hi[idx]), axis=1)
    return st, empty


def leaf_problem(
    ch: Chain,
    root: BallBounds,
    c: Array,
    sgn: list[Signs],
    alpha: list[Array],
    beta: list[Array],
    inter: InterAlphas | None = None,
    recompute: bool | None = None,
) -> LeafProblem:
    """See :class:`LeafProblem`; ``root`` holds rigorous bounds of one input's ball (batch 1),
    ``c`` the objective row (K,) or one per leaf (L, K), ``sgn``/``alpha``/``beta`` (L, n_k) per
    act node (negative or non-finite beta count as 0). The leaf bounds are
    :func:`leaf_intervals` (intermediate bounds recomputed on each leaf)."""
    g = ch.graph
    st, empty = leaf_intervals(ch, root, sgn, inter, recompute)
    n_leaf = empty.shape[0]
    c = np.broadcast_to(c, (n_leaf, g.output_size))
    init: dict[int, Array] = {g.output: c[:, None, :]}
    alphas: dict[int, Array] = {}
    for k, (p, a) in enumerate(zip(ch.pre, ch.act, strict=True)):
        b: Array = np.maximum(np.nan_to_num(beta[k], nan=0.0, posinf=0.0, neginf=0.0), 0.0)
        mult = -(b * sgn[k])
        if np.any(mult != 0):
            init[p] = mult[:, None, :]
        alphas[a] = alpha[k][:, None, :]
    return LeafProblem(st, init, alphas, empty)


def leaf_bounds(
    ch: Chain,
    root: BallBounds,
    c: Array,
    sgn: list[Signs],
    alpha: list[Array],
    beta: list[Array],
    inter: InterAlphas | None = None,
    recompute: bool | None = None,
) -> Array:
    """Rigorous lower bounds (L,) of c^T f on each leaf (+inf for an empty leaf): one
    :func:`sdp.local.propagate.backward` pass of :func:`leaf_problem` (bound (*) above), in
    chunks of ``LEAF_CHUNK`` leaves (each leaf's bounds are its own: memory stays modest)."""
    n_leaf = sgn[0].shape[0] if sgn else 1
    if n_leaf > LEAF_CHUNK:
        cs = np.broadcast_to(c, (n_leaf, ch.graph.output_size))
        parts = []
        for a in range(0, n_leaf, LEAF_CHUNK):
            sl = slice(a, a + LEAF_CHUNK)
            parts.append(
                leaf_bounds(
                    ch,
                    root,
                    cs[sl],
                    [v[sl] for v in sgn],
                    [v[sl] for v in alpha],
                    [v[sl] for v in beta],
                    inter,
                    recompute,
                )
            )
        return np.concatenate(parts)
    lp = leaf_problem(ch, root, c, sgn, alpha, beta, inter, recompute)
    low = backward(lp.bounds, lp.init, np.zeros((n_leaf, 1)), alphas=lp.alphas).lower[:, 0]
    return np.where(lp.empty, np.inf, low)


def covers(sgn: Signs) -> bool:
    """Whether leaves with these sign rows (L, N) cover every sign pattern (so the ball).

    A leaf with no split covers all; else pick the neuron split in most leaves (a tree's
    root): the leaves with + or 0 there must cover its + side and those with - or 0 its - side
    (recursively). Refuses (False) after 4 L + 16 parts, more than any split tree needs.
    """
    if sgn.shape[0] == 0:
        return False
    stack = [sgn]
    work = 4 * sgn.shape[0] + 16
    while stack:
        s = stack.pop()
        work -= 1
        if s.shape[0] == 0 or work < 0:
            return False
        nz = s != 0
        if (~nz).all(axis=1).any():
            continue  # a leaf without splits covers this part
        j = int(np.argmax(nz.sum(axis=0)))
        for side in (1, -1):
            part = s[(s[:, j] == side) | (s[:, j] == 0)].copy()
            part[:, j] = 0
            stack.append(part)
    return True


# ------------------------------------------------------------------------ the method


def _default_alpha(ch: Chain, lo: list[Array], hi: list[Array]) -> list[Array]:
    """CROWN's adaptive lower slopes: 1 where u >= -l, the negative slope p otherwise."""
    return [np.where(h >= -lw, 1.0, p) for lw, h, p in zip(lo, hi, ch.slope, strict=False)]


@dataclass(eq=False)
class FastIntermediateAlpha:
    """A ``node_hook`` of :func:`sdp.local.propagate.compute_bounds` like
    :class:`sdp.local.alpha.IntermediateAlpha` (same ``found`` records, replayed by it in
    ``verify_local``): the alphas of the +-e_i rows of the unstable neurons are optimised by
    the float search's Adam (Gram form, no rigorous pass per step), then ONE rigorous
    backward pass with the best alphas gives the bounds, used where tighter. ``deadline``:
    the Adam stops there (:func:`optimise`), and past it the remaining (node, input) pairs
    keep their CROWN bounds and record nothing (the replay then does nothing either)."""

    ch: Chain
    iterations: int = ROOT_INTER_ITERATIONS
    found: list[InterAlphas] = field(default_factory=list)
    deadline: float | None = None

    def __call__(self, st: BallBounds, idx: int) -> None:
        ch = self.ch
        if not self.found:
            self.found = [{} for _ in range(st.batch)]
        if idx not in ch.pre or ch.slope[ch.pre.index(idx)] >= 1.0:
            return  # not relu-like (identity): nothing unstable to tighten
        n_act = sum(1 for a in ch.act if a < idx)
        if n_act == 0:
            return
        for b in range(st.batch):
            sub = single(st, b)
            lo_i, hi_i = st.lo[idx][b], st.hi[idx][b]
            rows = np.flatnonzero((lo_i < 0) & (hi_i > 0))
            r = rows.size
            if r == 0 or not clock.fits(self.deadline):
                continue
            unit = np.zeros((2 * r, st.graph.nodes[idx].size))
            unit[np.arange(r), rows] = 1.0
            unit[r + np.arange(r), rows] = -1.0
            rep = np.zeros(2 * r, dtype=np.intp)
            lo = [np.array(sub.lo[ch.pre[k]][rep]) for k in range(n_act)]
            hi = [np.array(sub.hi[ch.pre[k]][rep]) for k in range(n_act)]
            d = Domains(
                lo,
                hi,
                _default_alpha(ch, lo, hi),
                [np.zeros_like(a) for a in lo],
                [np.zeros(a.shape, dtype=np.int8) for a in lo],
                np.full(2 * r, -np.inf),
                unit,
                np.arange(2 * r),
            )
            best, _ = optimise(
                ch,
                st.x0[b],
                float(st.eps[b]),
                d,
                self.iterations,
                top=idx,
                stop_at=None,
                lr=LR_ROOT,
                deadline=self.deadline,
            )
            found = {ch.act[k]: best.alpha[k] for k in range(n_act)}
            init, c0 = node_objective(sub, idx, rows)
            lower = backward(sub, init, c0, alphas={a: v[None] for a, v in found.items()}).lower
            self.found[b][idx] = (rows, found)
            st.lo[idx][b, rows] = np.maximum(st.lo[idx][b, rows], lower[0, :r])
            st.hi[idx][b, rows] = np.minimum(st.hi[idx][b, rows], -lower[0, r:])


def _root(
    graph: Graph, x0: Array, eps: Array, pred: np.ndarray, deadline: float | None = None
) -> tuple[BallBounds, Array, dict[int, Array], FastIntermediateAlpha, Array]:
    """alpha-CROWN at the root: intermediate bounds by :class:`FastIntermediateAlpha`, the
    margins' slopes by the float search's Adam, then one rigorous pass (and IBP's margins).
    Every Adam stops at ``deadline`` (its best iterate so far; CROWN's where none ran): the
    root counts against the caller's budget, and its bound is rigorous either way."""
    ch = chain_of(graph)
    hook = FastIntermediateAlpha(ch, deadline=deadline)
    st = compute_bounds(graph, x0, eps, node_hook=hook)
    k_out = graph.output_size
    c = objective_rows(pred, k_out)
    alphas = {a: np.zeros((x0.shape[0], k_out, graph.nodes[a].size)) for a in ch.act}
    for b in range(x0.shape[0]):
        rep = np.zeros(k_out, dtype=np.intp)
        lo = [np.array(st.lo[p][b][None][rep]) for p in ch.pre]
        hi = [np.array(st.hi[p][b][None][rep]) for p in ch.pre]
        d = Domains(
            lo,
            hi,
            _default_alpha(ch, lo, hi),
            [np.zeros_like(a) for a in lo],
            [np.zeros(a.shape, dtype=np.int8) for a in lo],
            np.full(k_out, -np.inf),
            c[b],
            np.arange(k_out),
        )
        best, _ = optimise(
            ch,
            x0[b],
            float(eps[b]),
            d,
            ROOT_ITERATIONS,
            stop_at=None,
            lr=LR_ROOT,
            deadline=deadline,
        )
        for k, a in enumerate(ch.act):
            alphas[a][b] = best.alpha[k]
    lower = backward(st, {graph.output: c}, np.zeros(c.shape[:2]), alphas=alphas).lower
    lower = np.maximum(lower, box_margins(st, c))
    return st, _finish(lower, pred), alphas, hook, c


def _root_domains(
    ch: Chain, st1: BallBounds, alphas: dict[int, Array], b: int, c: Array, lower: Array
) -> Domains:
    """One root domain per margin row j with lower[j] <= 0 (input b; ``c`` its (K, K) rows)."""
    rows = np.flatnonzero(lower <= 0)
    n = rows.size
    lo = [np.repeat(np.array(st1.lo[p]), n, axis=0) for p in ch.pre]
    hi = [np.repeat(np.array(st1.hi[p]), n, axis=0) for p in ch.pre]
    al = []
    for k, a in enumerate(ch.act):
        if a in alphas:
            al.append(np.array(alphas[a][b, rows]))
        else:
            al.append(np.where(hi[k] >= -lo[k], 1.0, ch.slope[k]))
    return Domains(
        lo,
        hi,
        al,
        [np.zeros_like(x) for x in lo],
        [np.zeros(x.shape, dtype=np.int8) for x in lo],
        np.array(lower[rows]),
        np.array(c[rows]),
        rows,
    )


def _branch_input(
    ch: Chain,
    st: BallBounds,
    lower: Array,
    alphas: dict[int, Array],
    hook: FastIntermediateAlpha,
    c: Array,
    x0: Array,
    eps: Array,
    b: int,
    deadline: float,
) -> tuple[Payload, str]:
    """Branch and bound of input b's rows still <= 0 in ``lower`` (updated in place); its
    payload (alpha-CROWN's and the leaves of every row proven) and the search status."""
    base: Payload = tuple((f"alpha:{k}", alphas[k][b]) for k in sorted(alphas)) + (
        _encode_inter(hook.found[b] if hook.found else {})
    )
    neg = lower[b] <= 0
    if not neg.any():
        return base, "ok"
    if not np.all(np.isfinite(lower[b][neg])):
        return base, "no-split"
    st1 = single(st, b)
    roots = _root_domains(ch, st1, alphas, b, c[b], lower[b])
    inter = hook.found[b] if hook.found else None
    fresh = REFRESH and sum(ch.split) >= REFRESH_MIN_LAYERS
    leaves, status = search(
        ch, x0[b], float(eps[b]), roots, deadline, st1 if fresh else None, inter
    )
    extra: list[tuple[str, Array]] = []
    if leaves is not None:
        val = leaf_bounds(ch, st1, leaves.c, leaves.sgn, leaves.alpha, leaves.beta, inter)
        for j in roots.row:
            mine = leaves.row == j
            low = float(np.min(val[mine])) if mine.any() else -np.inf
            if low > 0:
                lower[b, j] = max(lower[b, j], low)
                extra += _encode_leaves(int(j), leaves.take(np.flatnonzero(mine)))
    return base + tuple(extra), status


def _compute(graph: Graph, x0: Array, eps: Array, pred: np.ndarray) -> MarginBounds:
    """beta-crown at one eps per input with its own budget (:func:`_compute_by`)."""
    return _compute_by(graph, x0, eps, pred, None)


def _compute_by(
    graph: Graph, x0: Array, eps: Array, pred: np.ndarray, deadline: float | None
) -> MarginBounds:
    """beta-crown at one eps per input, ending by the caller's ``deadline`` (None: no caller
    budget) and within ``BUDGET_S`` seconds per input, whichever comes first (the caller's
    budget caps the method's, never extends it; ``certify_local``'s default budget is the
    radius search's, ten times this). The batch has those seconds in all:
    CROWN first for every input (what it certifies is done: its payload is empty, which the
    re-check replays as CROWN); then, most promising first (CROWN's worst margin bound), the
    alpha-CROWN root of each other input, followed by its branch and bound with an equal share
    of what is left of the batch's budget (time an input leaves unused passes to the next), at
    most ``MAX_SHARE`` times ``BUDGET_S``.
    The roots run while the budget lasts, and their optimisation counts against the input's
    share (it stops at the share computed before the root; :func:`_root`): on a small net the
    root finishes well inside it (never less than alpha-crown's root then), on a big one
    (oval21 cifar_deep_kw) it stops with its best rigorous bound so far instead of running for
    minutes; an input whose share is nothing (CROWN alone spent the budget) keeps CROWN's
    bound and its empty payload (a root would only repeat CROWN's passes)."""
    t0 = _now()
    ch = chain_of(graph)
    n = x0.shape[0]
    lower = np.array(get_method("crown").compute(graph, x0, eps, pred).lower)
    payloads: list[Payload] = [() for _ in range(n)]
    todo = np.flatnonzero(~np.all(lower > 0, axis=1))
    worst = np.nan_to_num(lower[todo].min(axis=1), nan=-np.inf)
    todo = todo[np.argsort(-worst, kind="stable")]
    end = t0 + BUDGET_S * n if deadline is None else min(t0 + BUDGET_S * n, deadline)
    for pos, b in enumerate(todo):
        sl = slice(int(b), int(b) + 1)
        share = min(max(end - _now(), 0.0) / (todo.size - pos), MAX_SHARE * BUDGET_S)
        if share <= 0.0:  # the budget is spent (CROWN alone took it): CROWN's answer stands
            continue
        st, low, alphas, hook, c = _root(graph, x0[sl], eps[sl], pred[sl], _now() + share)
        share = min(max(end - _now(), 0.0) / (todo.size - pos), MAX_SHARE * BUDGET_S)
        payloads[b], _ = _branch_input(
            ch, st, low, alphas, hook, c, x0[sl], eps[sl], 0, _now() + share
        )
        lower[b] = low[0]
    return MarginBounds(lower, tuple(payloads))


def _crown_start(
    graph: Graph, x0: Array, pred: np.ndarray, lo: Array, stop: float
) -> tuple[Array, Array, Array]:
    """CROWN bisection of the whole batch (``CROWN_PROBES`` steps, doubling from ``2 lo`` or
    0.1 until refused, then halving the bracket): the first step always (the floor of every
    answer, as at one eps), no later one that the last one's time says would end after
    ``stop``. Returns the largest radius CROWN certified per input (0: none),
    its margin lower bounds there, and the smallest refused radius (inf: none)."""
    b = x0.shape[0]
    crown = get_method("crown")
    c_lo, c_hi = np.zeros(b), np.full(b, np.inf)
    c_low = np.full((b, graph.output_size), -np.inf)
    probe = np.where(lo > 0, 2.0 * lo, 0.1)
    step = 0.0  # seconds of the last CROWN step
    for k in range(CROWN_PROBES):
        if k and not clock.fits(stop, step):
            break
        t = _now()
        low = np.asarray(crown.compute(graph, x0, probe, pred).lower)
        step = _now() - t
        ok = np.all(low > 0, axis=1)
        c_lo = np.where(ok, probe, c_lo)
        c_low[ok] = low[ok]
        c_hi = np.where(ok, c_hi, probe)
        probe = np.where(np.isinf(c_hi), 2.0 * probe, 0.5 * (c_lo + c_hi))
    return c_lo, c_low, c_hi


def _search_radius(
    graph: Graph, x0: Array, pred: np.ndarray, lo: Array, budget: float
) -> tuple[Array, Array, tuple[Payload, ...]]:
    """Largest radius certified by beta-crown per input, above ``lo`` (certified already).

    A start from CROWN (batched bisection, :func:`_crown_start`, at most ``CROWN_SHARE`` of the
    batch's ``budget * b`` seconds); CROWN's radius is reported as it is (an empty payload,
    which the re-check replays as CROWN) unless beta-crown does better. Then per input
    beta-crown probes from ``RADIUS_STEP`` times the best certified radius: up by
    ``RADIUS_STEP`` while certified, bisection once refused, each probe with at least 1 s or
    40% of what is left of the input's share. Every reported radius is a full rigorous
    evaluation (its certificate); a refused probe (timeout or counterexample) is only an upper
    end of the bracket. What the start leaves is shared equally: input i ends by
    t1 + (i + 1) (end - t1) / b (t1: the start's end, end: start + b ``budget``; time an input
    leaves unused passes on), and no probe begins that the last one's time says would end
    later; a probe's branch and bound stops early by the largest overrun seen. (Before, the
    start could run to the batch's end, so later inputs met their first probe past their own
    deadline and reported 0, CROWN's radius included.)"""
    t0 = _now()
    ch = chain_of(graph)
    b = x0.shape[0]
    end = t0 + budget * b
    c_lo, c_low, c_hi = _crown_start(graph, x0, pred, lo, t0 + CROWN_SHARE * budget * b)
    radius = np.where(c_lo > lo, c_lo, 0.0)
    lower = np.where((c_lo > lo)[:, None], c_low, -np.inf)
    payloads: list[Payload] = [() for _ in range(b)]
    t1 = _now()
    root_s = over = 0.0  # the last probe's root pass; the largest overrun of a stop (round, leaves)
    for i in range(b):
        deadline = t1 + (end - t1) * (i + 1) / b
        r_lo, r_hi = max(float(c_lo[i]), float(lo[i])), np.inf
        if r_lo > 0:
            eps = RADIUS_STEP * r_lo
        else:
            eps = 0.5 * float(c_hi[i]) if np.isfinite(c_hi[i]) else 1e-3
        while deadline - _now() > max(0.1 * budget, root_s + over):
            left = deadline - _now()
            t = _now()
            stop = min(deadline - over, t + max(1.0, 0.4 * left))
            st, low, alphas, hook, c = _root(
                graph, x0[i : i + 1], np.array([eps]), pred[i : i + 1], stop
            )
            root_s = _now() - t
            stop = min(deadline - over, _now() + max(1.0, 0.4 * left))
            pay, _ = _branch_input(
                ch, st, low, alphas, hook, c, x0[i : i + 1], np.array([eps]), 0, stop
            )
            over = max(over, _now() - stop)
            if np.all(low[0] > 0):
                r_lo = eps
                radius[i], lower[i], payloads[i] = eps, low[0], pay
            else:
                r_hi = eps
            if r_hi - r_lo <= RADIUS_RTOL * max(r_lo, 1e-12):
                break
            eps = RADIUS_STEP * eps if np.isinf(r_hi) else 0.5 * (r_lo + r_hi)
    return radius, lower, tuple(payloads)


def _encode_leaves(j: int, d: Domains) -> list[tuple[str, Array]]:
    out: list[tuple[str, Array]] = []
    for k in range(len(d.lo)):
        out += [
            (f"bc:{j}:sgn:{k}", d.sgn[k].astype(np.float64)),
            (f"bc:{j}:alpha:{k}", np.array(d.alpha[k])),
            (f"bc:{j}:beta:{k}", np.array(d.beta[k])),
        ]
    return out


def _decode_leaves(
    ch: Chain, payload: Payload, n_classes: int
) -> dict[int, tuple[list[Signs], list[Array], list[Array]]]:
    """Row j -> (sgn, alpha, beta) lists of (L, n_k) arrays, with shape / value checks; the
    signs (stored as floats) checked to be -1, 0 or 1 and returned as :data:`Signs`."""
    data: dict[int, dict[str, dict[int, Array]]] = {}
    for key, arr in payload:
        parts = str(key).split(":")
        if len(parts) != 4 or parts[0] != "bc" or parts[2] not in ("sgn", "alpha", "beta"):
            raise ValueError(f"bad beta-crown payload entry {key!r}")
        j, k = int(parts[1]), int(parts[3])
        if not (0 <= j < n_classes and 0 <= k < len(ch.act)):
            raise ValueError(f"beta-crown payload entry {key!r} out of range")
        a = np.asarray(arr, dtype=np.float64)
        if a.ndim != 2 or a.shape[1] != ch.graph.nodes[ch.act[k]].size:
            raise ValueError(f"beta-crown payload {key!r} has shape {a.shape}")
        if not np.isfinite(a).all():
            raise ValueError(f"beta-crown payload {key!r} is not finite")
        data.setdefault(j, {}).setdefault(parts[2], {})[k] = a
    out: dict[int, tuple[list[Signs], list[Array], list[Array]]] = {}
    for j, fields in data.items():
        got = []
        for name in ("sgn", "alpha", "beta"):
            per = fields.get(name, {})
            if sorted(per) != list(range(len(ch.act))):
                raise ValueError(f"beta-crown payload row {j} lacks {name} entries")
            got.append([per[k] for k in range(len(ch.act))])
        sgn, alpha, beta = got
        n_leaf = sgn[0].shape[0]
        if n_leaf == 0 or any(a.shape[0] != n_leaf for f in got for a in f):
            raise ValueError(f"beta-crown payload row {j}: leaf counts differ")
        if any(not np.isin(s, (-1.0, 0.0, 1.0)).all() for s in sgn):
            raise ValueError("beta-crown split signs must be -1, 0 or 1")
        if any((b < 0).any() for b in beta):
            raise ValueError("beta-crown multipliers must be >= 0")
        out[j] = ([s.astype(np.int8) for s in sgn], alpha, beta)
    return out


def _recheck(graph: Graph, x0: Array, eps: float, y: int, payload: Payload) -> Array:
    try:
        ch = chain_of(graph)
    except NotApplicable as exc:
        raise ValueError(str(exc)) from exc
    plain = tuple((k, v) for k, v in payload if not str(k).startswith("bc:"))
    trees = _decode_leaves(
        ch, tuple((k, v) for k, v in payload if str(k).startswith("bc:")), graph.output_size
    )
    x = np.asarray(x0, dtype=np.float64).reshape(1, -1)
    e = np.array([float(eps)])
    base = np.array(get_method("alpha-crown").recheck(graph, x[0], eps, y, plain))
    if not trees:
        return base
    if y in trees:
        raise ValueError("beta-crown payload splits the predicted class's row")
    inter = _decode_inter(graph, plain)
    hook = IntermediateAlpha(given=[inter])
    st = compute_bounds(graph, x, e, node_hook=hook)
    c = objective_rows(np.array([y]), graph.output_size)[0]
    for j, (sgn, alpha, beta) in trees.items():
        if not covers(np.concatenate(sgn, axis=1)):
            raise ValueError("beta-crown leaves do not cover the ball")
        val = leaf_bounds(ch, st, c[j], sgn, alpha, beta, inter)
        if np.min(val) <= 0 and sum(ch.split) < REFRESH_MIN_LAYERS:
            # certificates made before the per-leaf recomputation was limited to deep nets
            # (2026-12-07) relied on it: both bounds are rigorous, so their maximum is too
            again = leaf_bounds(ch, st, c[j], sgn, alpha, beta, inter, True)
            val = np.maximum(val, again)
        base[j] = max(base[j], float(np.min(val)))
    return base


register_method(
    MarginMethod(
        "beta-crown",
        _compute,
        _recheck,
        applies=applies,
        search=_search_radius,
        budgeted=_compute_by,
    )
)
