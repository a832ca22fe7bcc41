"""Rigorous lower bounds of the margins f_y - f_j over l2 balls, per method.

A method maps (inputs x0 (B, n0), radii eps (B,), predictions y (B,)) to lower bounds (B, K)
of f_y - f_j on each ball (+inf at j = y) and a per-input payload that lets
:func:`recheck` recompute the same bound. Built-in: ``ibp``, ``crown``, ``alpha-crown``;
other modules add methods with :func:`register_method` (e.g. ``sdp-crown``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import numpy as np

from sdp._blas import one_thread
from sdp.errors import UnsupportedMethod
from sdp.ir import Array
from sdp.local import clock
from sdp.local.alpha import (
    MARGIN_SLOPE_DTYPE,
    SLOPE_DTYPE,
    InterAlphas,
    InterLines,
    IntermediateAlpha,
    optimise_alphas,
    optimise_tangents,
    rigorous_lines,
    round_margin_slopes,
    tangent_nodes,
)
from sdp.local.graph import Graph
from sdp.local.propagate import BallBounds, RowLines, backward, compute_bounds
from sdp.local.relax import OPTIMISABLE
from sdp.local.types import SlopeOptimizer, SlopeProblem

Payload = tuple[tuple[str, Array], ...]


@dataclass(frozen=True, eq=False)
class MarginBounds:
    lower: Array  # (B, K), +inf at j = y
    payloads: tuple[Payload, ...]  # per input


MarginFn = Callable[[Graph, Array, Array, np.ndarray], MarginBounds]
RecheckFn = Callable[[Graph, Array, float, int, Payload], Array]
SearchFn = Callable[
    [Graph, Array, np.ndarray, Array, float], tuple[Array, Array, tuple[Payload, ...]]
]
BudgetedFn = Callable[[Graph, Array, Array, np.ndarray, float | None], MarginBounds]


@dataclass(frozen=True)
class MarginMethod:
    """``compute(graph, x0, eps, pred)`` -> MarginBounds; ``recheck(graph, x0 (n0,), eps, y,
    payload)`` -> (K,) rigorous lower bounds recomputed from the payload; ``applies(graph)``
    (None: always) says whether ``auto`` may run it (``compute`` raises NotApplicable else).
    ``search(graph, x0, pred, lo, budget_s)`` (optional) replaces the generic radius search:
    per input a radius it certified (<= lo: nothing new), its (K,) bounds and payload.
    ``budgeted(graph, x0, eps, pred, deadline)`` (optional): ``compute`` that also ends by the
    caller's ``deadline`` (a :func:`sdp.local.clock.now` time; None: its own budget only)."""

    name: str
    compute: MarginFn
    recheck: RecheckFn
    in_auto: bool = True
    applies: Callable[[Graph], bool] | None = None
    search: SearchFn | None = None
    budgeted: BudgetedFn | None = None


_REGISTRY: dict[str, MarginMethod] = {}


def register_method(method: MarginMethod) -> None:
    """Add (or replace) a local method; ``in_auto`` methods run after alpha-CROWN in ``auto``."""
    _REGISTRY[method.name] = method


def get_method(name: str) -> MarginMethod:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnsupportedMethod(
            f"local method {name!r} is not available (have: {', '.join(_REGISTRY)})"
        ) from None


def auto_chain() -> list[MarginMethod]:
    """Methods of ``auto``, cheapest first."""
    first = [_REGISTRY["crown"], _REGISTRY["alpha-crown"]]
    return first + [
        m for n, m in _REGISTRY.items() if m.in_auto and n not in ("ibp", "crown", "alpha-crown")
    ]


def objective_rows(pred: np.ndarray, k: int) -> Array:
    """(B, K, K): row j is e_y - e_j (row y is zero)."""
    b = pred.shape[0]
    c = np.zeros((b, k, k))
    c[np.arange(b), :, pred] = 1.0
    c[:, np.arange(k), np.arange(k)] -= 1.0
    c[np.arange(b), pred, :] = 0.0
    return c


def _finish(lower: Array, pred: np.ndarray) -> Array:
    out = np.array(lower, dtype=np.float64)
    out[np.arange(len(pred)), pred] = np.inf
    return out


def box_margins(st: BallBounds, c: Array) -> Array:
    """Interval lower bounds (B, m) of the objective rows c (B, m, K) on the logits: the rows
    folded into the last affine layer, then its input box (IBP's margin bound)."""
    graph = st.graph
    out = graph.nodes[graph.output]
    box = out.parents[0] if out.kind == "affine" else out.index
    return backward(st, {graph.output: c}, np.zeros(c.shape[:2]), box_at=box).lower


def _ibp(graph: Graph, x0: Array, eps: Array, pred: np.ndarray) -> MarginBounds:
    st = compute_bounds(graph, x0, eps, linear=False)
    c = objective_rows(pred, graph.output_size)
    return MarginBounds(_finish(box_margins(st, c), pred), tuple(() for _ in pred))


def _crown(graph: Graph, x0: Array, eps: Array, pred: np.ndarray) -> MarginBounds:
    """CROWN; each margin's bound is the larger of the linear and the interval bound (both are
    sound; the linear one is not always the tighter at large eps). BLAS runs on one thread:
    the products are small (per input, or a few rows per input), threads only add
    synchronisation (design.md §4.1.2); parallelism comes from processes (jobs in chunks)."""
    with one_thread():
        st = compute_bounds(graph, x0, eps)
        c = objective_rows(pred, graph.output_size)
        res = backward(st, {graph.output: c}, np.zeros(c.shape[:2]))
        lower = np.maximum(res.lower, box_margins(st, c))
    return MarginBounds(_finish(lower, pred), tuple(() for _ in pred))


def _single(x0: Array, eps: float) -> tuple[Array, Array]:
    return np.asarray(x0, dtype=np.float64).reshape(1, -1), np.array([float(eps)])


def _recheck_plain(name: str) -> RecheckFn:
    def recheck(graph: Graph, x0: Array, eps: float, y: int, payload: Payload) -> Array:
        xs, es = _single(x0, eps)
        fn = _ibp if name == "ibp" else _crown
        return fn(graph, xs, es, np.array([y])).lower[0]

    return recheck


ALPHA_ITERATIONS = 20
INTER_ITERATIONS = 10
TANGENT_INTER_ITERATIONS = 10
"""Adam steps on the tangent points of the intermediate rows of sigmoid / tanh networks
(design.md §4.1.3)."""


def alpha_crown(
    graph: Graph,
    x0: Array,
    eps: Array,
    pred: np.ndarray,
    *,
    optimizer: SlopeOptimizer | None = None,
    net: object = None,
    iterations: int = ALPHA_ITERATIONS,
    deadline: float | None = None,
) -> MarginBounds:
    """alpha-CROWN: intermediate bounds tightened by per-neuron alphas (input by input), then
    the final margins optimised; the payload stores every alpha used (for ``recheck``).

    ``deadline`` (a :func:`sdp.local.clock.now` time, from the caller's time budget): every
    optimisation stops there (:func:`sdp.local.clock.fits`: no step begun that would end past
    it), nodes reached after it keep CROWN's bounds, and the margins get their start (CROWN's
    slopes) and the best iterate so far, bounded rigorously as always; what remains past the
    deadline is CROWN's own cost (the intermediate and final passes). The optional
    ``optimizer`` is not called past the deadline."""
    hook = IntermediateAlpha(
        iterations=INTER_ITERATIONS,
        tangent_iterations=TANGENT_INTER_ITERATIONS,
        deadline=deadline,
    )
    st = compute_bounds(graph, x0, eps, node_hook=hook)
    c = objective_rows(pred, graph.output_size)
    c0 = np.zeros(c.shape[:2])
    init = {graph.output: c}
    lower, alphas = optimise_alphas(st, init, c0, iterations=iterations, deadline=deadline)
    rig: dict[int, RowLines] | None = None
    slopes: dict[int, tuple[Array, Array]] = {}
    if tangent_nodes(st, graph.output):
        # rigorous bounds of the chosen lines (optimised tangents where they beat CROWN's):
        # exactly what _alpha_recheck recomputes from the stored slopes
        lower, slopes, rig = optimise_tangents(
            st, init, c0, alphas=alphas, base=lower, iterations=iterations, deadline=deadline
        )
    lower = np.maximum(lower, box_margins(st, c))
    if optimizer is not None and net is not None and clock.fits(deadline):
        acts = tuple(sorted(alphas))
        # copies: the optimiser may write into what it is given (e.g. torch.from_numpy shares
        # memory); st.x0 / st.eps / st.lo are what the re-check below is computed on
        problem = SlopeProblem(
            net,  # type: ignore[arg-type]
            x0.copy(),
            eps.copy(),
            c.copy(),
            acts,
            tuple(st.lo[graph.nodes[k].parents[0]].copy() for k in acts),
            tuple(st.hi[graph.nodes[k].parents[0]].copy() for k in acts),
            tuple(alphas[k].copy() for k in acts),
            tuple(st.relax[k].alpha_mask.copy() for k in acts),
            tuple(st.relax[k].alpha_min for k in acts),
            tuple(st.relax[k].alpha_max for k in acts),
        )
        got = list(optimizer(problem))
        if len(got) != len(acts):
            got = [alphas[k] for k in acts]  # unusable answer: keep our own alphas
        cand: dict[int, Array] = {}
        for k, a in zip(acts, got, strict=True):
            arr = np.asarray(a, dtype=np.float64)
            ok = arr.shape == alphas[k].shape and bool(np.isfinite(arr).all())
            cand[k] = arr if ok else alphas[k]  # candidates only; clipped in backward
        theirs = backward(st, init, c0, alphas=cand, lines=rig).lower  # recomputed, not trusted
        theirs = np.maximum(theirs, box_margins(st, c))
        better = theirs > lower
        lower = np.where(better, theirs, lower)
        for k in acts:
            alphas[k] = np.where(better[:, :, None], cand[k], alphas[k])
    payloads = tuple(
        tuple((f"alpha:{k}", alphas[k][i]) for k in sorted(alphas))
        + tuple(
            (f"{tag}:{k}", slopes[k][j][i].astype(MARGIN_SLOPE_DTYPE))  # exact: rounded
            for k in sorted(slopes)
            for j, tag in enumerate(("slo", "sup"))
        )
        + _encode_inter(hook.found[i] if hook.found else {})
        + _encode_inter_lines(hook.found_lines[i] if hook.found_lines else {})
        for i in range(len(pred))
    )
    return MarginBounds(_finish(lower, pred), payloads)


def _encode_inter(found: InterAlphas) -> Payload:
    out: list[tuple[str, Array]] = []
    for t in sorted(found):
        rows, al = found[t]
        out.append((f"irows:{t}", np.asarray(rows, dtype=np.float64)))
        out.extend((f"ialpha:{t}:{k}", al[k]) for k in sorted(al))
    return tuple(out)


_ValuesFn = Callable[[Graph, int, np.ndarray, dict[str, np.ndarray]], Array]


@dataclass(frozen=True)
class _RowsKind:
    """One kind of intermediate-row payload: ``<rows>:<t>`` holds the row codes of target node
    t and ``<tag>:<t>:<k>`` (tag in ``values``) what its rows use at act node k below t.

    :func:`_decode_rows` checks for every kind: t and k index the graph, k > 0 is an act node;
    row codes are finite integers in [0, ``codes`` * size of t); no values without the rows of
    their node. Per kind: ``empty_rows`` (may t have no rows), ``at_target`` (may k equal t,
    else k < t), ``acts`` (activation names k may have; None: any), and ``assemble(graph, k,
    rows, entries)``, which validates the entries of one (t, k) by tag and returns the values
    of k for those rows (ValueError if malformed)."""

    rows: str
    values: tuple[str, ...]
    codes: int
    empty_rows: bool
    at_target: bool
    acts: tuple[str, ...] | None
    assemble: _ValuesFn


def _rows_ok(graph: Graph, kind: _RowsKind, t: int, r: np.ndarray) -> bool:
    """Row codes r (float64, flat) of target node t: finite integers in [0, codes n_t)."""
    if not (0 <= t < len(graph.nodes)) or not np.isfinite(r).all() or np.any(r != np.round(r)):
        return False
    if r.size == 0:
        return kind.empty_rows
    return bool(r.min() >= 0 and r.max() < kind.codes * graph.nodes[t].size)


def _node_ok(graph: Graph, kind: _RowsKind, t: int, k: int) -> bool:
    """Act node k may hold values for target t: below it, with an allowed activation."""
    top = t if kind.at_target else t - 1
    if not (0 < k <= top and t < len(graph.nodes)) or graph.nodes[k].kind != "act":
        return False
    return kind.acts is None or getattr(graph.nodes[k].op, "name", "") in kind.acts


def _decode_rows(
    graph: Graph, payload: Payload, kind: _RowsKind
) -> dict[int, tuple[np.ndarray, dict[int, Array]]]:
    """The ``kind`` entries of an untrusted payload, validated (see :class:`_RowsKind`); other
    entries are left to the caller. Raises ValueError on any malformed entry."""
    rows: dict[int, np.ndarray] = {}
    got: dict[tuple[int, int], dict[str, np.ndarray]] = {}
    for key, arr in payload:
        parts = key.split(":")
        if parts[0] == kind.rows and len(parts) == 2:
            t = int(parts[1])
            r = np.asarray(arr, dtype=np.float64).reshape(-1)
            if not _rows_ok(graph, kind, t, r):
                raise ValueError(f"bad payload entry {key!r}")
            rows[t] = r.astype(np.intp)
        elif parts[0] in kind.values and len(parts) == 3:
            t, k = int(parts[1]), int(parts[2])
            if not _node_ok(graph, kind, t, k):
                raise ValueError(f"bad payload entry {key!r}")
            got.setdefault((t, k), {})[parts[0]] = np.asarray(arr)
    if any(t not in rows for t, _ in got):
        raise ValueError(f"{'/'.join(kind.values)} entries without their {kind.rows}")
    out: dict[int, tuple[np.ndarray, dict[int, Array]]] = {t: (r, {}) for t, r in rows.items()}
    for (t, k), entries in got.items():
        out[t][1][k] = kind.assemble(graph, k, rows[t], entries)
    return out


def _alpha_values(graph: Graph, k: int, rows: np.ndarray, got: dict[str, np.ndarray]) -> Array:
    """``ialpha``: finite (2 r, n_k) alphas for r rows (lower rows, then upper rows)."""
    a = np.asarray(got["ialpha"], dtype=np.float64)
    if a.shape != (2 * rows.size, graph.nodes[k].size) or not np.isfinite(a).all():
        raise ValueError(f"ialpha of node {k} has shape {a.shape} or non-finite values")
    return a


_ALPHA_ROWS = _RowsKind("irows", ("ialpha",), 1, True, True, None, _alpha_values)
"""Intermediate alpha-CROWN rows (:data:`InterAlphas`): neuron indices r < n_t (may be none),
alphas of any act node up to t."""


def _decode_inter(graph: Graph, payload: Payload) -> InterAlphas:
    """The intermediate alphas of a payload, validated (:data:`_ALPHA_ROWS`)."""
    return _decode_rows(graph, payload, _ALPHA_ROWS)


def _encode_inter_lines(found: InterLines) -> Payload:
    """Per target node t: ``trows:t`` (the row codes) and per sigmoid / tanh node k below it
    ``tsm:t:k`` (np.packbits of the (q, n) mask of the entries with a slope of their own, row
    major) and ``tsl:t:k`` (those slopes, :data:`sdp.local.alpha.SLOPE_DTYPE`, in mask
    order); the other entries used the relaxation's own line, which the verifier re-derives
    (design.md §4.1.3). A node none of whose entries has a slope of its own is left out (the
    verifier's default for an absent node is that same line); certificates written before
    2026-12-07 hold it as an all-zero mask and empty slopes, which still decode."""
    out: list[tuple[str, Array]] = []
    for t in sorted(found):
        obj, sl = found[t]
        out.append((f"trows:{t}", np.asarray(obj, dtype=np.float64)))
        for k in sorted(sl):
            a = np.asarray(sl[k], dtype=SLOPE_DTYPE)
            own = ~np.isnan(a)
            if not own.any():
                continue
            # payload arrays may be of any numeric dtype (the certificate's type says float64)
            out.append((f"tsm:{t}:{k}", cast(Array, np.packbits(own.reshape(-1)))))
            out.append((f"tsl:{t}:{k}", cast(Array, a[own])))
    return tuple(out)


def _tangent_values(graph: Graph, k: int, rows: np.ndarray, got: dict[str, np.ndarray]) -> Array:
    """``tsm`` (np.packbits of the (q, n_k) mask of entries with a slope of their own) and
    ``tsl`` (those slopes, finite, in mask order) for q row codes; NaN marks the other
    entries (the relaxation's own line, re-derived by the verifier). Any finite slope gives a
    sound line (its intercept is recomputed rigorously), so nothing else needs trusting."""
    if set(got) != {"tsm", "tsl"}:
        raise ValueError(f"tangent slopes of node {k} without their mask")
    packed, v = got["tsm"], got["tsl"]
    if packed.ndim != 1 or packed.dtype != np.uint8 or v.ndim != 1:
        raise ValueError(f"tangent mask or slopes of node {k} malformed")
    v = v.astype(np.float64)
    if not np.isfinite(v).all():
        raise ValueError(f"tangent slopes of node {k} not finite")
    q, n = rows.size, graph.nodes[k].size
    if packed.size != -(-q * n // 8):
        raise ValueError(f"tangent mask of node {k} does not match its rows")
    own = np.unpackbits(packed, count=q * n).astype(bool)
    if int(own.sum()) != v.size:
        raise ValueError(f"tangent slopes of node {k} do not match their mask")
    a = np.full(q * n, np.nan)
    a[own] = v
    return a.reshape(q, n)


_TANGENT_ROWS = _RowsKind("trows", ("tsm", "tsl"), 2, False, True, OPTIMISABLE, _tangent_values)
"""Intermediate tangent rows (:data:`InterLines`): signed row codes o < 2 n_t (at least one),
slopes of sigmoid / tanh nodes up to t (t itself when t is an act node whose output a residual
net bounds: its rows run through its own relaxation; any finite slope is sound)."""


def _decode_inter_lines(graph: Graph, payload: Payload) -> InterLines:
    """The intermediate tangent slopes of a payload (NaN: the relaxation's own line),
    validated (:data:`_TANGENT_ROWS`)."""
    return _decode_rows(graph, payload, _TANGENT_ROWS)


def _alpha_compute(graph: Graph, x0: Array, eps: Array, pred: np.ndarray) -> MarginBounds:
    return alpha_crown(graph, x0, eps, pred)


def _alpha_recheck(graph: Graph, x0: Array, eps: float, y: int, payload: Payload) -> Array:
    xs, es = _single(x0, eps)
    hook = IntermediateAlpha(
        given=[_decode_inter(graph, payload)], given_lines=[_decode_inter_lines(graph, payload)]
    )
    st = compute_bounds(graph, xs, es, node_hook=hook)
    c = objective_rows(np.array([y]), graph.output_size)
    alphas: dict[int, Array] = {}
    tangents: dict[int, dict[str, Array]] = {}
    for key, arr in payload:
        kind, _, idx = key.partition(":")
        if kind in ("irows", "ialpha", "trows", "tsm", "tsl"):
            continue
        node = int(idx)
        if kind in ("slo", "sup"):
            ok_node = node in st.relax and node in tangent_nodes(st, graph.output)
            a = np.asarray(arr, dtype=np.float64)
            shape = (c.shape[1], graph.nodes[node].size) if ok_node else None
            if a.shape != shape:
                raise ValueError(f"bad tangent payload entry {key!r}")
            rel = st.relax[node]
            s_rel = rel.lower_slope if kind == "slo" else rel.upper_slope
            s = round_margin_slopes(a[None], s_rel[:, None, :])
            if not np.isfinite(s).all():  # NaN, inf, or a finite float64 past float32's range
                raise ValueError(f"bad tangent payload entry {key!r}")
            tangents.setdefault(node, {})[kind] = s
            continue
        if kind != "alpha" or node not in st.relax:
            raise ValueError(f"unknown alpha-crown payload entry {key!r}")
        a = np.asarray(arr, dtype=np.float64)
        if a.shape != (c.shape[1], graph.nodes[node].size) or not np.isfinite(a).all():
            raise ValueError(f"alpha payload {key!r} has shape {a.shape}")
        alphas[node] = a[None]
    rig: dict[int, RowLines] | None = None
    if tangents:
        if any(len(v) != 2 for v in tangents.values()):
            raise ValueError("tangent payload needs both slo and sup per node")
        rig = {k: rigorous_lines(st, k, v["slo"], v["sup"]) for k, v in tangents.items()}
    res = backward(st, {graph.output: c}, np.zeros(c.shape[:2]), alphas=alphas, lines=rig)
    return _finish(np.maximum(res.lower, box_margins(st, c)), np.array([y]))[0]


register_method(MarginMethod("ibp", _ibp, _recheck_plain("ibp"), in_auto=False))
register_method(MarginMethod("crown", _crown, _recheck_plain("crown")))
register_method(MarginMethod("alpha-crown", _alpha_compute, _alpha_recheck))
