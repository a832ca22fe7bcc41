"""Branch and bound on the unstable ReLUs of the last hidden layer, on top of SDP-CROWN.

For a margin row that SDP-CROWN cannot prove positive, the ball is split by the sign of one
unstable pre-activation ``z_i`` of the last hidden layer: ``B = (B ∩ {z_i >= 0}) ∪ (B ∩ {z_i
<= 0})``. On each part the neuron is stable, which is enforced soundly by clipping its box to
``[max(l_i, 0), u_i]`` or ``[l_i, min(u_i, 0)]`` (every other fact of the geometry -- boxes,
centres, the l2 coupling -- holds on the whole ball, hence on each part); the row's bound on
the ball is the minimum over the leaves of the split tree (an empty part, l > u, gives +inf).
Best-first: the leaf with the lowest bound is split next, on the unstable neuron with the
largest ``|Lam_i| * (-l_i u_i / (u_i - l_i))`` (the coefficient of the neuron in the margin
times the largest gap of its triangle relaxation; BaBSR-like, Bunel et al., "Branch and Bound
for Piecewise Linear Neural Network Verification", JMLR 2020), until every leaf is positive
or the branch budget is spent; rows closest to 0 first, and once one stays unproven the others
keep their SDP-CROWN bounds (the input cannot be certified anyway). Each leaf's bound is an
SDP-CROWN bound re-checked rigorously.

Only the last hidden layer is split, so the intermediate bounds are computed once (deeper
splits would need them per branch, as in beta-CROWN, Wang et al., NeurIPS 2021).
"""

from __future__ import annotations

import copy
import heapq
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from sdp.ir import Array
from sdp.local._ereal import EReal, U, upper
from sdp.local.sdp_crown import (
    Candidate,
    Geometry,
    Layer,
    Payload,
    Record,
    _bound_rows,
    decode_record,
    encode_record,
    geometry,
    margin_lower_bounds,
)

BRANCHES = 24
"""Leaf evaluations per margin row."""
ITERATIONS = 30


@dataclass(frozen=True)
class Leaf:
    """Signed splits (neuron i, sign: +1 means z_i >= 0, -1 means z_i <= 0) and a candidate."""

    splits: tuple[tuple[int, int], ...]
    cand: Candidate


def _split_geos(geos: list[Geometry], splits: tuple[tuple[int, int], ...]) -> list[Geometry]:
    last = copy.copy(geos[-1])
    last.lo, last.hi = last.lo.copy(), last.hi.copy()
    for i, s in splits:
        if s > 0:
            last.lo[i] = max(last.lo[i], 0.0)
        else:
            last.hi[i] = min(last.hi[i], 0.0)
    return [*geos[:-1], last]


def _rows(layers: list[Layer], label: int) -> tuple[NDArray[np.intp], EReal, EReal]:
    out = layers[-1]
    others = np.array([j for j in range(out.w.shape[0]) if j != label])
    top_v = out.w[label][None, :] - out.w[others]
    const_v = out.b[label] - out.b[others]
    top = EReal(top_v, upper(U * np.abs(top_v), np.zeros_like(top_v)))
    const = EReal(const_v, upper(U * np.abs(const_v), np.zeros_like(const_v)))
    return others, top, const


def _leaf_bound(
    layers: list[Layer],
    geos: list[Geometry],
    x0: Array,
    eps: float,
    top: EReal,
    const: EReal,
    splits: tuple[tuple[int, int], ...],
    stored: Candidate | None,
) -> tuple[float, Candidate | None]:
    gb = _split_geos(geos, splits)
    v, cand = _bound_rows(layers[:-1], gb, x0, eps, top, const, ITERATIONS, 0.2, stored, 0.0)
    return float(v[0]), cand


def _choose(geo: Geometry, lam_: Array, splits: tuple[tuple[int, int], ...]) -> int | None:
    done = {i for i, _ in splits}
    lo, hi = geo.lo, geo.hi
    unst = (lo < 0) & (hi > 0)
    unst[list(done)] = False
    if not unst.any():
        return None
    gap = np.where(unst, -lo * hi / np.where(unst, hi - lo, 1.0), 0.0)
    return int(np.argmax(np.abs(lam_) * gap))


def bab_margin_bounds(
    layers: list[Layer], x0: Array, eps: float, label: int, *, branches: int = BRANCHES
) -> tuple[Array, Record, dict[int, list[Leaf]]]:
    """(K,) rigorous lower bounds of f_y - f_j on the ball, the SDP-CROWN record and the
    split trees (per margin row index r, its leaves) of the rows that needed branching."""
    x0 = np.asarray(x0, dtype=np.float64)
    if len(layers) == 1:  # no hidden layer: the margins are affine, nothing to split
        res, rec = margin_lower_bounds(layers, x0, eps, label, iters=0)
        return res, rec, {}
    rec = Record()
    geos = geometry(layers, x0, eps, record=rec)
    others, top, const = _rows(layers, label)
    base, rec.final = _bound_rows(layers[:-1], geos, x0, eps, top, const, 40, 0.2, None, 0.0)
    trees: dict[int, list[Leaf]] = {}
    bounds = base.copy()
    neg = np.flatnonzero(base <= 0)
    for r in neg[np.argsort(-base[neg])]:  # closest to 0 first
        tr, cr = top[r : r + 1], const[r : r + 1]
        heap: list[tuple[float, int, tuple[tuple[int, int], ...], Candidate | None]] = [
            (float(base[r]), 0, (), None)
        ]
        leaves: list[Leaf] = []
        count = 1
        while heap and count < branches:
            val, _, splits, cand = heapq.heappop(heap)
            if val > 0:
                heapq.heappush(heap, (val, count, splits, cand))
                break
            i = _choose(_split_geos(geos, splits)[-1], tr.v[0], splits)
            if i is None:  # nothing left to split: this leaf stays as it is
                heapq.heappush(heap, (val, count, splits, cand))
                break
            for s in (1, -1):
                sp = (*splits, (i, s))
                v, c = _leaf_bound(layers, geos, x0, eps, tr, cr, sp, None)
                count += 1
                heapq.heappush(heap, (v, count, sp, c))
        if any(c is None for _, _, _, c in heap):
            break  # the root was never split: keep the plain SDP-CROWN bounds
        leaves = [Leaf(sp, c) for _, _, sp, c in heap if c is not None]
        bounds[r] = max(bounds[r], min(v for v, _, _, _ in heap))
        trees[int(r)] = leaves
        if bounds[r] <= 0:
            break  # unproven row: the input cannot be certified, the rest keep their bounds
    res = np.full(layers[-1].w.shape[0], np.inf)
    res[others] = bounds
    return res, rec, trees


def _covers(splits: list[tuple[tuple[int, int], ...]]) -> bool:
    """Whether leaves with these signed splits partition the ball (a complete split tree)."""
    if len(splits) == 1 and not splits[0]:
        return True
    if not splits or not splits[0]:
        return False
    root = splits[0][0][0]
    pos: list[tuple[tuple[int, int], ...]] = []
    neg: list[tuple[tuple[int, int], ...]] = []
    for sp in splits:
        d = dict(sp)
        if len(d) != len(sp) or root not in d:
            return False
        rest = tuple((i, s) for i, s in sp if i != root)
        (pos if d[root] > 0 else neg).append(rest)
    return _covers(pos) and _covers(neg)


def recheck_bab(
    layers: list[Layer],
    x0: Array,
    eps: float,
    label: int,
    rec: Record,
    trees: dict[int, list[Leaf]],
) -> Array:
    """Recompute every bound from the record and the split trees (rigorous)."""
    x0 = np.asarray(x0, dtype=np.float64)
    if len(layers) == 1:
        if trees:
            raise ValueError("bab payload splits a network without hidden layers")
        return margin_lower_bounds(layers, x0, eps, label, stored=rec)[0]
    geos = geometry(layers, x0, eps, iters=0, stored=rec)
    others, top, const = _rows(layers, label)
    base, _ = _bound_rows(layers[:-1], geos, x0, eps, top, const, 0, 0.2, rec.final)
    bounds = base.copy()
    n_last = layers[-2].w.shape[0]
    for r, leaves in trees.items():
        if not 0 <= r < len(others) or not leaves:
            raise ValueError("bab payload row out of range")
        if not _covers([lf.splits for lf in leaves]):
            raise ValueError("bab payload leaves do not cover the ball")
        if any(not (0 <= i < n_last and s in (1, -1)) for lf in leaves for i, s in lf.splits):
            raise ValueError("bab payload split out of range")
        tr, cr = top[r : r + 1], const[r : r + 1]
        vals = [_leaf_bound(layers, geos, x0, eps, tr, cr, lf.splits, lf.cand)[0] for lf in leaves]
        bounds[r] = max(bounds[r], min(vals))
    res = np.full(layers[-1].w.shape[0], np.inf)
    res[others] = bounds
    return res


def encode(rec: Record, trees: dict[int, list[Leaf]]) -> Payload:
    items = list(encode_record(rec))
    for r, leaves in sorted(trees.items()):
        for n, lf in enumerate(leaves):
            sp = np.array([(i + 1) * s for i, s in lf.splits], dtype=np.float64)
            items.append((f"bab:{r}:{n}:split", sp))
            for j, (g, lam) in enumerate(zip(lf.cand.g, lf.cand.lam, strict=True)):
                items += [(f"bab:{r}:{n}:g:{j}", g), (f"bab:{r}:{n}:lam:{j}", lam)]
    return tuple(items)


def decode(
    layers: list[Layer], payload: Payload, n_classes: int
) -> tuple[Record, dict[int, list[Leaf]]]:
    plain = tuple((k, v) for k, v in payload if not str(k).startswith("bab:"))
    rec = decode_record(layers, plain, n_classes)
    data = {
        str(k): np.asarray(v, dtype=np.float64) for k, v in payload if str(k).startswith("bab:")
    }
    trees: dict[int, list[Leaf]] = {}
    for key in sorted(k for k in data if k.endswith(":split")):
        _, r_s, n_s, _ = key.split(":")
        sp = data.pop(key)
        if (
            sp.ndim != 1
            or not np.isfinite(sp).all()
            or (sp != np.round(sp)).any()
            or (sp == 0).any()
        ):
            raise ValueError("bab payload split must be non-zero integers")
        splits = tuple((int(abs(v)) - 1, 1 if v > 0 else -1) for v in sp)
        g, lam = [], []
        for j in range(len(layers) - 1):
            gk, lk = f"bab:{r_s}:{n_s}:g:{j}", f"bab:{r_s}:{n_s}:lam:{j}"
            if gk not in data or lk not in data:
                raise ValueError("bab payload lacks a leaf candidate")
            gj, lj = data.pop(gk), data.pop(lk)
            if gj.shape != (1, layers[j].w.shape[0]) or lj.shape != (1,):
                raise ValueError("bab payload leaf candidate has the wrong shape")
            if not (np.isfinite(gj).all() and np.isfinite(lj).all() and (lj >= 0).all()):
                raise ValueError("bab payload leaf candidate is not finite / lam < 0")
            g.append(gj)
            lam.append(lj)
        trees.setdefault(int(r_s), []).append(Leaf(splits, Candidate(g, lam)))
    if data:
        raise ValueError(f"unknown bab payload entries {sorted(data)[:3]}")
    return rec, trees
