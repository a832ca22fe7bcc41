"""certify_local / verify_local: per-input certification at eps, and largest-radius search.

Certified at eps (closed ball) by a method iff every rigorous lower bound of f_y - f_j on the
ball is > 0. Balls nest, so a certificate at eps covers every smaller eps, and the largest
certified radius can be bracketed and bisected. (A method's bound itself need not be monotone in
eps: adaptive relaxations may certify eps and fail a smaller eps'; the search only ever reports
a radius at which a full evaluation succeeded, so this costs tightness, never soundness.)
The global radius m / (sqrt 2 L) from a verified global bound L (:mod:`sdp.radius`) is a
floor: it is always certified (open ball) and the search only looks above it.

Radius search per input (vectorised over a batch; every probe is a full rigorous evaluation):
a first guess is the linearisation distance min_j m_j / ||grad m_j(x0)||, then the probe is
doubled / halved until bracketed [lo certified, hi not], then bisected until
hi - lo <= rtol * lo or the time budget (``time_budget_s`` per input, start-up included) is
spent; a probe that the last probe's time says would end past it is not begun. A method with
its own search (beta-crown) runs first with the whole budget; the others then run cheapest
first (crown, then alpha-crown, then registered ones), each starting from the radius already
certified. The reported radius is always a certified one (``lo``).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np

from sdp.errors import UnsupportedMethod
from sdp.ir import Array, Network
from sdp.local import clock
from sdp.local.graph import Graph, build_graph
from sdp.local.margins import MarginMethod, alpha_crown, auto_chain, get_method
from sdp.local.relax import _deriv
from sdp.local.types import LocalCertificate, LocalResult, SlopeOptimizer
from sdp.radius import certified_radius
from sdp.rounding import LogitErrorBound, logit_error_bound

_METHODS = ("ibp", "crown", "alpha-crown", "sdp-crown", "bab", "beta-crown", "auto")
_RTOL = 1e-3
_MAX_PROBES = 40
TIME_BUDGET_S = 10.0
""":func:`certify_local`'s default seconds per input, for library callers (no response
deadline around the call). Interfaces with one pass their own: the service's HTTP API and CLI
use ``service.settings.LOCAL_TIME_BUDGET_S`` = 5 s, which is also the server's maximum per
input (a 64-input local POST /certify within about 5 minutes). Not one shared value: the
service's comes from its request limits, which a library caller does not have."""


def input_hash(x0: Array) -> str:
    return hashlib.sha256(np.ascontiguousarray(x0, dtype="<f8").tobytes()).hexdigest()


def _check_inputs(net: Network, inputs: object) -> Array:
    x = np.asarray(inputs, dtype=np.float64)
    if x.ndim < 2:
        raise ValueError(f"inputs must be (batch, {net.input_size}), got shape {x.shape}")
    feats = math.prod(x.shape[1:])
    x = x.reshape(x.shape[0], feats)
    if x.shape[1] != net.input_size:
        raise ValueError(f"inputs have {x.shape[1]} features, the network expects {net.input_size}")
    if not np.isfinite(x).all():
        raise ValueError("inputs contain NaN or infinite values")
    return x


def _check_eps(epsilon: object, b: int) -> Array:
    e = np.asarray(epsilon, dtype=np.float64)
    if e.ndim > 1 or (e.ndim == 1 and e.shape[0] != b):
        raise ValueError(f"epsilon must be one number or one per input ({b}), got {e.shape}")
    if not np.isfinite(e).all() or (e < 0).any():
        raise ValueError("epsilon must be finite and >= 0")
    return np.array(np.broadcast_to(e, (b,)), dtype=np.float64)


def _methods(method: str) -> list[MarginMethod]:
    if method not in _METHODS:
        raise UnsupportedMethod(f"unknown local method {method!r}; choose one of {_METHODS}")
    return auto_chain() if method == "auto" else [get_method(method)]


def _margin_gradients(graph: Graph, x0: Array, pred: np.ndarray) -> Array:
    """Approximate ||grad (f_y - f_j)(x0)||_2 (B, K) in float (only a first guess)."""
    vals = [x0]
    derivs: dict[int, Array] = {}
    for nd in graph.nodes[1:]:
        if nd.kind == "affine":
            vals.append(nd.linear(vals[nd.parents[0]]) + nd.full_bias)
        elif nd.kind == "act":
            v = vals[nd.parents[0]]
            assert nd.op is not None
            name = nd.op.name  # type: ignore[union-attr]
            if name == "relu":
                derivs[nd.index] = (v > 0).astype(np.float64)
            elif name == "identity":
                derivs[nd.index] = np.ones_like(v)
            else:
                derivs[nd.index] = _deriv(nd.op, v)  # type: ignore[arg-type]
            vals.append(nd.op(v))  # type: ignore[operator]
        else:
            vals.append(vals[nd.parents[0]] + vals[nd.parents[1]])
    b, k = len(pred), graph.output_size
    c = np.zeros((b, k, k))
    c[np.arange(b), :, pred] = 1.0
    c[:, np.arange(k), np.arange(k)] -= 1.0
    pending: dict[int, Array] = {graph.output: c}
    for idx in range(graph.output, 0, -1):
        lam = pending.pop(idx, None)
        if lam is None:
            continue
        nd = graph.nodes[idx]
        if nd.kind == "affine":
            outs = [(nd.parents[0], nd.transpose(lam))]
        elif nd.kind == "act":
            outs = [(nd.parents[0], lam * derivs[idx][:, None, :])]
        else:
            outs = [(p, lam) for p in nd.parents]
        for p, v in outs:
            pending[p] = pending[p] + v if p in pending else v
    return np.asarray(np.linalg.norm(pending[0], axis=-1))


@dataclass
class _State:
    """Per-input search state."""

    lo: float  # certified radius so far
    method: str
    cert_lower: Array | None
    payload: tuple[tuple[str, Array], ...]
    lo_is_local: bool


def _evaluate(
    m: MarginMethod,
    graph: Graph,
    x: Array,
    eps: Array,
    pred: np.ndarray,
    net: Network,
    optimizer: SlopeOptimizer | None,
    deadline: float | None = None,
) -> tuple[np.ndarray, Array, tuple[tuple[tuple[str, Array], ...], ...]]:
    """One full rigorous evaluation of method ``m``; alpha-crown's optimisation stops at
    ``deadline`` (the caller's budget, :func:`sdp.local.margins.alpha_crown`), as does a
    method with a ``budgeted`` form (beta-crown)."""
    if m.name == "alpha-crown":
        res = alpha_crown(graph, x, eps, pred, optimizer=optimizer, net=net, deadline=deadline)
    elif m.budgeted is not None:
        res = m.budgeted(graph, x, eps, pred, deadline)
    else:
        res = m.compute(graph, x, eps, pred)
    ok = np.all(res.lower > 0, axis=1)
    return ok, res.lower, res.payloads


def forward_margins(
    net: Network, x: Array, global_bound: float | None, classes: int
) -> tuple[np.ndarray, Array, Array]:
    """(prediction, rigorous margin, global radius floor) of the rows ``x`` (B, n0).

    margin = f_y - max_{j != y} f_j - sqrt(2) E (E: the rounding bound of the computed logits,
    -inf where it is not finite); the floor is max(m - sqrt 2 E, 0) / (sqrt 2 L) for a VERIFIED
    ``global_bound`` L (:func:`sdp.radius.certified_radius`), else 0 (design.md §4.1). The
    forward pass runs on the whole batch (another batch size may round differently), and the
    floor is also no more than the one a single-row pass gives (:func:`_single_row_floor`,
    what :func:`verify_local` recomputes): both are rigorous, and a floor 1 ulp above the
    single row's made ~30% of the global certificates of a 5-row batch fail to re-verify.
    """
    b = x.shape[0]
    logits = net.forward(x) if b else np.zeros((0, classes))
    err_of = logit_error_bound(net, 2.0**-53)
    err = err_of(x) if b else np.zeros(0)
    rr = certified_radius(logits, global_bound or 1.0, logit_error=err) if b else None
    pred = np.argmax(logits, axis=1).astype(np.int64) if b else np.zeros(0, np.int64)
    top = logits[np.arange(b), pred]
    others = logits.copy()
    others[np.arange(b), pred] = -np.inf
    margin_raw = top - others.max(axis=1) if b else np.zeros(0)
    margin = np.where(np.isfinite(err), margin_raw - math.sqrt(2.0) * err * (1 + 1e-12), -np.inf)
    grad = np.zeros(b) if rr is None else rr.radius
    glob = np.zeros(b)
    if global_bound is not None:
        glob = np.minimum(grad, _single_row_floor(net, x, global_bound, err_of))
    return pred, np.asarray(margin, dtype=np.float64), np.asarray(glob, dtype=np.float64)


def _single_row_floor(net: Network, x: Array, global_bound: float, err: LogitErrorBound) -> Array:
    """(B,) global radius floor of each row from its own forward pass and logit error
    bound ``err``, as :func:`verify_local` computes it (same shapes, so the same rounding)."""
    out = np.zeros(x.shape[0])
    for i in range(x.shape[0]):
        row = x[i : i + 1]
        out[i] = certified_radius(net.forward(row), global_bound, logit_error=err(row)).radius[0]
    return out


def certify_local(
    net: Network,
    inputs: Array,
    *,
    labels: np.ndarray | None = None,
    epsilon: float | Array | None = None,
    method: str = "auto",
    global_bound: float | None = None,
    time_budget_s: float = TIME_BUDGET_S,
    optimizer: SlopeOptimizer | None = None,
    batch_size: int = 32,
) -> LocalResult:
    """Certify the prediction of each input on an l2 ball (at ``epsilon``) or find the largest
    certified radius (``epsilon=None``).

    Args:
        net: the network (any IR: chains, convolutions, residual blocks, every activation).
        inputs: (B, n0) float64 rows in the IR layout (or (B, *input_shape)).
        labels: optional (B,) integer labels (``correct`` = prediction == label).
        epsilon: one radius or one per input; None searches the largest certified radius.
        method: ``ibp``, ``crown``, ``alpha-crown``, a registered method, or ``auto`` (crown,
            then alpha-crown, then registered methods on what is still uncertified).
        global_bound: a VERIFIED global l2 Lipschitz bound of the logits (radius floor).
        time_budget_s: seconds per input (default :data:`TIME_BUDGET_S`): the radius
            search's budget, and at one ``epsilon`` the deadline of alpha-crown's
            optimisation and of sdp-crown's inputs, and a cap on beta-crown's own
            ``BUDGET_S`` per input (never an extension).
        optimizer: candidate alpha-CROWN slopes (re-verified here).
        batch_size: inputs propagated together.

    Returns:
        :class:`LocalResult`; every certified (input, radius) holds in exact arithmetic.

    Raises:
        ValueError: NaN/inf inputs, wrong shapes, epsilon < 0 or not finite, bad labels,
            batch_size not an integer >= 1.
        UnsupportedMethod: an unknown or unavailable method.

    Budget: a radius search returns within about ``time_budget_s`` seconds per input (wall
    clock), start-up included: the batches of the first k inputs end by start + k *
    time_budget_s, and no probe starts that the last one's time says would end later. At one
    eps the same deadlines stop alpha-crown's optimisation, keep sdp-crown from beginning
    another input, and cap beta-crown's own budget (``BUDGET_S`` per input); the answer is
    then the best rigorous bound so far (CROWN's own passes still run past a deadline).
    """
    start = clock.now()
    x = _check_inputs(net, inputs)
    b = x.shape[0]
    chain = _methods(method)
    eps_arr = None if epsilon is None else _check_eps(epsilon, b)
    if global_bound is not None and not (math.isfinite(global_bound) and global_bound > 0):
        raise ValueError("global_bound must be a finite positive number")
    if not (math.isfinite(time_budget_s) and time_budget_s > 0):
        raise ValueError("time_budget_s must be a finite positive number")
    if (
        isinstance(batch_size, bool)
        or not isinstance(batch_size, (int, np.integer))
        or batch_size < 1
    ):
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    lab = None
    if labels is not None:
        lab = np.asarray(labels).reshape(-1)
        if lab.shape[0] != b:
            raise ValueError(f"{lab.shape[0]} labels for {b} inputs")
        if not np.issubdtype(lab.dtype, np.integer) and not (
            np.all(np.isfinite(lab)) and np.all(lab == np.round(lab))
        ):
            raise ValueError("labels must be integers")
        lab = lab.astype(np.int64)
    graph = build_graph(net)
    if graph.output_size < 2:
        raise ValueError("local certification needs at least two logits")
    if method == "auto":
        chain = [m for m in chain if m.applies is None or m.applies(graph)]
    pred, margin, glob = forward_margins(net, x, global_bound, graph.output_size)
    h = net.content_hash()
    states = [
        _State(float(glob[i]), "global" if glob[i] > 0 else "none", None, (), False)
        for i in range(b)
    ]
    certified = None if eps_arr is None else np.zeros(b, dtype=bool)
    for s in range(0, b, batch_size):
        idx = np.arange(s, min(b, s + batch_size))
        deadline = start + time_budget_s * (s + idx.size)  # earlier batches' savings carry
        if eps_arr is None:
            _search(net, graph, x, pred, margin, idx, chain, states, deadline, optimizer)
        else:
            assert certified is not None
            _at_eps(
                net,
                graph,
                x,
                pred,
                margin,
                idx,
                chain,
                states,
                eps_arr,
                certified,
                optimizer,
                deadline,
            )
    certs = []
    for i, stt in enumerate(states):
        certs.append(
            LocalCertificate(
                stt.method,
                stt.lo,
                int(pred[i]),
                h,
                input_hash(x[i]),
                stt.cert_lower,
                tuple((int(k.split(":")[1]), a) for k, a in stt.payload if k.startswith("alpha:")),
                global_bound if stt.method == "global" else None,
                stt.payload,
            )
        )
    radius = np.array([st.lo for st in states], dtype=np.float64)
    return LocalResult(
        prediction=pred,
        margin=np.asarray(margin, dtype=np.float64),
        radius=radius,
        radius_method=tuple(st.method for st in states),
        global_radius=np.asarray(glob, dtype=np.float64),
        epsilon=eps_arr,
        certified=certified,
        correct=None if lab is None else (pred == lab),
        certificates=tuple(certs),
    )


def _at_eps(
    net: Network,
    graph: Graph,
    x: Array,
    pred: np.ndarray,
    margin: Array,
    idx: np.ndarray,
    chain: list[MarginMethod],
    states: list[_State],
    eps: Array,
    certified: np.ndarray,
    optimizer: SlopeOptimizer | None,
    deadline: float,
) -> None:
    """Certify ``idx`` at ``eps`` with each method of ``chain`` in turn, on what is still
    uncertified; alpha-crown's optimisation stops at ``deadline`` (its answer is then the
    best rigorous bound found by then: uncertified, never an unverified certificate)."""
    # the global radius certifies the open ball: eps < lo
    todo = np.array([i for i in idx if not eps[i] < states[i].lo and margin[i] > 0], dtype=int)
    for i in idx:
        certified[i] = eps[i] < states[i].lo
    done: set[str] = set()
    for m in chain:
        if todo.size == 0:
            break
        if m.name == "alpha-crown" and "crown" in done and not clock.fits(deadline):
            continue  # begun past its deadline, alpha-crown is exactly CROWN: refused already
        done.add(m.name)
        ok, lower, payloads = _evaluate(
            m, graph, x[todo], eps[todo], pred[todo], net, optimizer, deadline
        )
        for j, i in enumerate(todo):
            if ok[j]:
                certified[i] = True
                states[i] = _State(float(eps[i]), m.name, lower[j], payloads[j], True)
        todo = todo[~ok]


def _search(
    net: Network,
    graph: Graph,
    x: Array,
    pred: np.ndarray,
    margin: Array,
    idx: np.ndarray,
    chain: list[MarginMethod],
    states: list[_State],
    deadline: float,
    optimizer: SlopeOptimizer | None,
) -> None:
    """Raise ``states[idx]`` to the largest radii certified by ``chain`` before ``deadline``
    (a :func:`sdp.local.clock.now` time): a probe starts only while the last probe's time still
    fits (before the first: the margin-gradient pass's, one backward pass, less than a probe)."""
    # a method with its own search (beta-crown: a CROWN bisection, then branch-and-bound
    # probes) gets the budget first; the bisections of the others only ever raise its radii
    chain = sorted(chain, key=lambda m: m.search is None)
    live = idx[margin[idx] > 0]
    if live.size == 0:
        return
    t = clock.now()
    gn = _margin_gradients(graph, x[live], pred[live])
    last = clock.now() - t  # seconds of the last probe (so far: the gradient pass)
    raw = margin[live][:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        d = np.where(gn > 0, raw / gn, np.inf)
    d[np.arange(live.size), pred[live]] = np.inf
    guess = np.where(np.isfinite(d.min(axis=1)), d.min(axis=1), 1.0)
    for mi, m in enumerate(chain):
        lo = np.array([states[i].lo for i in live])
        if m.search is not None:  # the method's own search (every radius a full evaluation)
            left = max(0.0, deadline - clock.now()) / live.size
            if left <= 0.0:  # the earlier methods spent the budget
                continue
            rad, low, pays = m.search(graph, x[live], pred[live], lo, left)
            for q, i in enumerate(live):
                if rad[q] > states[i].lo:
                    states[i] = _State(float(rad[q]), m.name, low[q], pays[q], True)
            continue
        hi = np.full(live.size, np.inf)
        # f = smallest margin lower bound at lo / hi (guides the next probe; heuristic only)
        f_lo = margin[live].astype(np.float64)
        f_hi = np.full(live.size, -np.inf)
        p0, f0 = np.zeros(live.size), margin[live].astype(np.float64)
        probe = _first_probe(guess, lo, mi == 0)
        for _ in range(_MAX_PROBES):
            act = np.flatnonzero(hi - lo > _RTOL * np.maximum(lo, 1e-12))
            t = clock.now()
            if act.size == 0 or t + last > deadline:
                break
            ids = live[act]
            ok, lower, payloads = _evaluate(
                m, graph, x[ids], probe[act], pred[ids], net, optimizer, deadline
            )
            last = clock.now() - t
            fmin = np.min(np.where(np.isnan(lower), -np.inf, lower), axis=1)
            for j, a in enumerate(act):
                i = live[a]
                if ok[j]:
                    p0[a], f0[a] = lo[a], f_lo[a]
                    lo[a], f_lo[a] = probe[a], fmin[j]
                    states[i] = _State(float(probe[a]), m.name, lower[j], payloads[j], True)
                else:
                    hi[a], f_hi[a] = probe[a], fmin[j]
                probe[a] = _next_probe(lo[a], f_lo[a], hi[a], f_hi[a], p0[a], f0[a])
                if hi[a] < 1e-9:
                    hi[a] = lo[a]  # nothing certifiable above 1e-9: stop
        if clock.now() + last > deadline:
            break


def _first_probe(guess: Array, lo: Array, first: bool) -> Array:
    """First radius a bisection method tries, per input: above what is certified already
    (``lo``; twice it for the first method of the chain, 1.25 times it after another method),
    or the linearisation distance ``guess`` halved where nothing is certified yet. (Starting
    a later method at 1e-12 when beta-crown's own search certified nothing, its budget spent
    on its CROWN start, cost ~20 probes of at most 4x growth: ``auto`` ended at radius 1e-12
    where ``crown`` alone reached 0.5.) Only a guess: every probe is a full evaluation."""
    start = np.maximum(guess * 0.5, lo * 2) if first else np.maximum(lo * 1.25, 1e-12)
    probe = np.where(lo > 0, start, guess * 0.5)
    return np.where(probe > 0, probe, 1e-3)


def _next_probe(lo: float, f_lo: float, hi: float, f_hi: float, p0: float, f0: float) -> float:
    """Next radius to try, from the bracket [lo certified, hi not] and the bound values there.

    The margin bound decreases with eps, roughly linearly near its root, so a secant
    (regula falsi) estimate of the root is tried a little below it, guarded towards bisection;
    close to an end the probe jumps to within rtol of it to close the bracket. Unbracketed
    (hi = inf): a secant extrapolation from the last two certified points, in [1.25, 4] x lo.
    Any probe is only a guess: each one is certified or refused by a full evaluation.
    """
    tol = _RTOL * max(lo, 1e-12)
    if math.isinf(hi):
        est = 2.0 * lo
        if math.isfinite(f_lo) and f0 > f_lo > 0 and lo > p0:
            est = lo + f_lo * (lo - p0) / (f0 - f_lo)
        return float(min(max(est, 1.25 * lo), 4.0 * lo)) if lo > 0 else 1e-3
    if lo <= 0:
        return 0.25 * hi
    w = hi - lo
    if hi > 4.0 * lo or not (math.isfinite(f_hi) and f_lo > 0 > f_hi):
        return math.sqrt(lo * hi) if hi > 4.0 * lo else lo + 0.5 * w
    est = lo + w * f_lo / (f_lo - f_hi)
    target = est - 0.25 * tol
    if target - lo < tol:
        return lo + 0.9 * tol
    if hi - target < tol:
        return max(hi - 0.9 * tol, lo + 0.5 * w)
    return min(max(target, lo + 0.02 * w), hi - 0.02 * w)


def verify_local(
    net: Network, x0: Array, cert: LocalCertificate, *, lipschitz_bound: float | None = None
) -> bool:
    """Re-check a certificate independently: recompute its bounds in float64 with rounding.

    True iff the certificate's network and input hashes match and, for a local method, every
    recomputed lower bound of f_y - f_j (j != y) on the closed ball of radius cert.epsilon is
    > 0; for ``global`` iff epsilon <= the global radius (rounding-shrunk margin / (sqrt 2 L),
    a claim about the open ball of radius epsilon) for ``lipschitz_bound``, a VERIFIED l2
    Lipschitz bound the caller trusts (the certificate's own ``global_bound`` is never taken
    on its word: a global certificate without ``lipschitz_bound`` is refused); ``none``
    certifies nothing (True iff epsilon == 0).
    """
    x = np.asarray(x0, dtype=np.float64).reshape(-1)
    if x.shape[0] != net.input_size or not np.isfinite(x).all():
        return False
    if cert.network_hash != net.content_hash() or cert.input_hash != input_hash(x):
        return False
    eps = float(cert.epsilon)
    if not (math.isfinite(eps) and eps >= 0):
        return False
    logits = net.forward(x[None])
    y = int(np.argmax(logits[0]))
    if cert.method == "none":
        return eps == 0.0
    if y != cert.prediction:
        return False
    if cert.method == "global":
        trusted = lipschitz_bound
        if trusted is None or not (math.isfinite(trusted) and trusted > 0):
            return False
        err = logit_error_bound(net, 2.0**-53)(x[None])
        r = certified_radius(logits, trusted, logit_error=err).radius[0]
        return bool(eps <= r)  # the global radius certifies the open ball of radius r
    try:
        m = get_method(cert.method)
    except UnsupportedMethod:
        return False
    graph = build_graph(net)
    try:
        lower = m.recheck(graph, x, eps, y, cert.payload)
    except ValueError:
        return False
    others = np.delete(lower, y)
    return bool(np.all(others > 0))
