"""Optimised lower slopes (alpha-CROWN; Xu et al., "Fast and Complete: Enabling Complete
Neural Network Verification with Rapid and Massively Parallel Incomplete Verifiers", ICLR 2021).

For every unstable ReLU-like neuron the lower line alpha z is valid for any alpha in
[alpha_min, alpha_max] (:class:`sdp.local.relax.Relaxation`); the CROWN bound of each objective row
is a function of the alphas of that row only. We maximise it by projected Adam (Kingma & Ba,
ICLR 2015) with gradients computed by hand, and keep, per row, the best iterate: every iterate's
bound is computed by the rigorous :func:`sdp.local.propagate.backward`, so the maximum over
iterates is a sound bound and the stored alphas reproduce it.

Gradient (for a fixed sign pattern of the multipliers, a.e.): the bound of row r equals the
relaxed network evaluated at the minimiser x*_r = x0 - eps Lambda_x / ||Lambda_x|| of the input
stage (Danskin's theorem), so d bound / d alpha_{k,i} = Lambda_{k,i} v_{k,i}(x*_r) where
Lambda_{k,i} >= 0 (lower line in use) and v is the pre-activation of the relaxed forward pass
from x*_r, z_k = s z + t with the lines selected by the sign of Lambda_k.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from sdp.ir import Array
from sdp.local.propagate import BallBounds, backward, node_objective, single


def _relaxed_forward(
    st: BallBounds,
    lam_x: Array,
    lam_act: dict[int, Array],
    alphas: dict[int, Array],
    top: int,
) -> dict[int, Array]:
    """Pre-activation values v (B, m, n) of every act node below ``top`` from x*_r, per row."""
    g = st.graph
    nrm = np.linalg.norm(lam_x, axis=-1, keepdims=True)
    xs = st.x0[:, None, :] - st.eps[:, None, None] * lam_x / np.where(nrm > 0, nrm, 1.0)
    vals: dict[int, Array] = {0: xs}
    pre: dict[int, Array] = {}
    for node in g.nodes[1 : top + 1]:
        if node.kind == "affine":
            vals[node.index] = node.linear(vals[node.parents[0]]) + node.full_bias
        elif node.kind == "act":
            v = vals[node.parents[0]]
            pre[node.index] = v
            rel = st.relax[node.index]
            lam = lam_act.get(node.index)
            sl = rel.lower_slope[:, None, :]
            a = alphas.get(node.index)
            if a is not None:
                sl = np.where(rel.alpha_mask[:, None, :], a, sl)
            if lam is None:
                lam = np.ones_like(v)
            pos = lam >= 0
            s = np.where(pos, sl, rel.upper_slope[:, None, :])
            t = np.where(pos, rel.lower_icpt[:, None, :], rel.upper_icpt[:, None, :])
            vals[node.index] = s * v + t
        elif node.kind == "add":
            a_, b_ = node.parents
            vals[node.index] = vals[a_] + vals[b_]
    return pre


def optimise_alphas(
    st: BallBounds,
    init: dict[int, Array],
    c0: Array,
    *,
    iterations: int = 20,
    lr: float = 0.5,
    start: dict[int, Array] | None = None,
) -> tuple[Array, dict[int, Array]]:
    """Best rigorous lower bounds (B, m) over projected-Adam iterates, and their alphas.

    ``start`` (act node -> (B, m, n)) seeds the alphas; CROWN's adaptive choice otherwise, so the
    result is never below the CROWN bound with the same intermediate bounds.
    """
    g = st.graph
    b, m = c0.shape
    top = max(init)
    acts = [
        nd.index
        for nd in g.act_nodes()
        if nd.index <= top and nd.index in st.relax and st.relax[nd.index].alpha_mask.any()
    ]
    alphas: dict[int, Array] = {}
    for k in acts:
        rel = st.relax[k]
        base = np.broadcast_to(rel.lower_slope[:, None, :], (b, m, rel.lower_slope.shape[1]))
        a0 = start.get(k) if start is not None else None
        alphas[k] = np.array(base if a0 is None else a0, dtype=np.float64)
    best = np.full((b, m), -np.inf)
    best_alpha = {k: v.copy() for k, v in alphas.items()}
    if not acts:
        res = backward(st, init, c0)
        return res.lower, best_alpha
    mom = {k: np.zeros_like(v) for k, v in alphas.items()}
    vel = {k: np.zeros_like(v) for k, v in alphas.items()}
    b1, b2, tiny = 0.9, 0.999, 1e-12
    for it in range(iterations + 1):
        res = backward(st, init, c0, alphas=alphas, record=True)
        better = res.lower > best
        if better.any():
            best = np.where(better, res.lower, best)
            for k in acts:
                best_alpha[k] = np.where(better[:, :, None], alphas[k], best_alpha[k])
        if it == iterations:
            break
        assert res.lam_x is not None and res.lam_act is not None
        pre = _relaxed_forward(st, res.lam_x, res.lam_act, alphas, top)
        for k in acts:
            rel = st.relax[k]
            lam = res.lam_act[k]
            grad = np.where((lam >= 0) & rel.alpha_mask[:, None, :], lam * pre[k], 0.0)
            mom[k] = b1 * mom[k] + (1 - b1) * grad
            vel[k] = b2 * vel[k] + (1 - b2) * grad * grad
            mh = mom[k] / (1 - b1 ** (it + 1))
            vh = vel[k] / (1 - b2 ** (it + 1))
            step = lr * mh / (np.sqrt(vh) + tiny)
            alphas[k] = np.clip(alphas[k] + step, rel.alpha_min, rel.alpha_max)
    return best, best_alpha


# Per input b: target node -> (rows, {act node: (2 r, n) alphas}); rows r of the target node
# get +-e_i objectives (first r rows: lower bounds of z_i, last r: of -z_i).
InterAlphas = dict[int, tuple[np.ndarray, dict[int, Array]]]


@dataclass(eq=False)
class IntermediateAlpha:
    """A ``node_hook`` for :func:`sdp.local.propagate.compute_bounds`: tightens the bounds of
    every node that feeds an activation with alpha-CROWN rows, input by input.

    ``given`` (per input) replays stored alphas (one rigorous backward pass, for verification);
    otherwise the rows of neurons unstable under a ReLU-like consumer are optimised for
    ``iterations`` steps and the best alphas are kept in ``found``. Each row's bound only
    replaces the current one where it is tighter, so the result is never looser than CROWN.
    """

    iterations: int = 10
    given: list[InterAlphas] | None = None
    found: list[InterAlphas] = field(default_factory=list)

    def __call__(self, st: BallBounds, idx: int) -> None:
        if not self.found:
            self.found = [{} for _ in range(st.batch)]
        for b in range(st.batch):
            sub = single(st, b)
            if self.given is not None:
                if idx not in self.given[b]:
                    continue
                rows, alph = self.given[b][idx]
                init, c0 = node_objective(sub, idx, rows)
                lower = backward(sub, init, c0, alphas={k: a[None] for k, a in alph.items()}).lower
            else:
                rows = self._rows(st, idx, b)
                if rows.size == 0:
                    continue
                init, c0 = node_objective(sub, idx, rows)
                lower, best = optimise_alphas(sub, init, c0, iterations=self.iterations)
                if not best:
                    continue
                self.found[b][idx] = (rows, {k: a[0] for k, a in best.items()})
            r = rows.size
            st.lo[idx][b, rows] = np.maximum(st.lo[idx][b, rows], lower[0, :r])
            st.hi[idx][b, rows] = np.minimum(st.hi[idx][b, rows], -lower[0, r:])

    @staticmethod
    def _rows(st: BallBounds, idx: int, b: int) -> np.ndarray:
        g = st.graph
        relu_like = any(
            g.nodes[c].kind == "act" and getattr(g.nodes[c].op, "name", "") in _RELU_LIKE
            for c in g.consumers[idx]
        )
        if not relu_like:
            return np.zeros(0, dtype=np.intp)
        lo, hi = st.lo[idx][b], st.hi[idx][b]
        return np.flatnonzero((lo < 0) & (hi > 0))


_RELU_LIKE = ("relu", "leaky_relu")
