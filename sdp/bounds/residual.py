"""``lipsdp-dag``: LipSDP-Neuron over a network's DAG (residual networks), certified in float64.

References: the quadratic constraint per activation and the LMI are those of LipSDP (Fazlyab,
Robey, Hassani, Morari, Pappas, "Efficient and Accurate Estimation of Lipschitz Constants for
Deep Neural Networks", NeurIPS 2019); that a skip connection only adds linear terms to the
pre-activations, so the same S-procedure holds with the identity path inside the LMI, is the
residual case of Araujo, Havens, Delattre, Allauzen, Hu, "A Unified Algebraic Perspective on
Lipschitz Neural Networks", ICLR 2023 (their Theorem for y = x - 2 W T^{-1} sigma(W^T x + b)
is one block of it). The multiplier choice generalises ECLipsE-Fast (Xu, Sivaranjani,
NeurIPS 2024) from chains to DAGs. The derivation and code are ours (design.md §3.6).

Formulation. Number the activation layers ("nodes") k = 1..K in topological order; node 0 is
the input x. Every pre-activation is a linear function of earlier node outputs, and so is the
output (biases cancel in differences; a residual add ``body + shortcut`` sums the two paths'
matrices, an identity shortcut contributes I):

    dv_k = sum_{j in src(k)} A_kj dw_j,   dw_k = phi_k(v_k) - phi_k(v'_k),   dy = sum_j O_j dw_j

with dw_0 = dx. With xi = (dx, dw_1, ..., dw_K), slopes [a_k, b_k] per neuron and T_k =
diag(t_k) >= 0, each node gives 2 (dw_k - a dv_k)^T T_k (b dv_k - dw_k) >= 0, so if

    -M(rho, T) = rho E_0^T E_0 - O^T O
                 + sum_k [A_k; E_k]^T [[2 a b T_k, -(a+b) T_k], [-(a+b) T_k, 2 T_k]] [A_k; E_k] >= 0

then ||dy||^2 <= rho ||dx||^2 for all pairs (add the constraints to xi^T M xi <= 0), i.e.
Lip <= sqrt(rho). Blocks of G = -M (without rho): G_kk = 2 T_k (+ own terms below);
G_kj = -diag((a+b) t_k) A_kj for j in src(k) (the skip path is one of these couplings:
y = relu(C_2 relu(C_1 z) + S z) couples the block's output node to z through -T S);
own terms 2 A_ki^T diag(a b t_k) A_kj on every pair of sources of node k (zero for ReLU);
-O_i^T O_j on pairs of output sources. For a chain this is exactly the LMI of design.md §3.2.
G is block-sparse: a node couples only to its sources, which for a residual net lie in the same
block or the block input, so eliminating nodes in (reverse) topological order fills in only
inside a block: cost ~ sum over blocks of (block width)^3, linear in depth.

Multipliers (:func:`dag_multipliers`). Forward elimination from the input at rho = 1 keeps the
Cholesky factor of the Schur complement P_F onto the "frontier" F (eliminated-so-far nodes that
are still sources of a later node or of the output). Adding node k with couplings B_k =
diag(a+b) A_k,F gives the Schur complement 2 T_k - T_k K_k T_k, K_k = B_k P_F^{-1} B_k^T; with
one scalar t_k = 1 / lambda_max(K_k) (ECLipsE-Fast's choice, "scalar") or per neuron
t_i = 1 / (|K_k| 1)_i ("rowsum", since K <= diag(|K| 1)) it is >= T diag(1/t) T > 0, so the
recursion never fails, whatever the depth. Nodes that no later node reads are dropped from
the front of the factor (the trailing block of a Cholesky factor is the factor of the Schur
complement). Own terms are left out of the choice (they are PSD when a b >= 0 and only help).
At the end k* = lambda_max(O P_F^{-1} O^T) makes (rho, T) = (k*, k* T') feasible.

Scale (:func:`_scale_search`). For T = k T', with H the hidden part of G(T'), C its coupling to
the input and O the output map (low rank), Woodbury gives the smallest rho in closed form:

    rho(k) = k lambda_max(Z + V (k I - Gamma)^{-1} V^T),   k > lambda_max(Gamma),

with Z = C^T H^{-1} C - G_00,own, V = C^T H^{-1} O^T, Gamma = O H^{-1} O^T, all read off one
elimination of H with a pseudo-node for the output. rho(k) is convex in k (the feasible (rho, k)
form a convex set), so a grid and golden section find its minimum cheaply; these values are
estimates only. The chosen k is then certified. The search runs on LMIs up to
SEARCH_DIM_CAP rows; on larger ones k is taken just above k* (where the optimum sat on
resnet_2b / 4b). On small LMIs both stage choices are tried and a certified coordinate
descent on one log-scale per node follows (:func:`_block_descent`); larger ones take the
scalar choice (rowsum is much looser on wide conv layers: resnet_2b 524 against 155).

Verification (:func:`certify_dag`, :func:`verify_dag`). The certificate is (rho, T). The check
builds G(T) in float64, runs the backward block Cholesky over the nodes (fill only among the
eliminated node's neighbours) with the per-neuron Jacobi-scaled shift of design.md §3.3
(Rump, BIT 2006; n = the LMI's total dimension) plus the worst-case rounding of forming every
block (products: gamma_m |A|^T |D| |B|; couplings: 4u |entry|), and finally factorises
(rho - c) I - Q on the input block. If everything factorises, -M(rho, T) - cI > 0 in float64
with the rounding accounted for. Nothing an optimiser or the estimate returned is trusted.
Products of consecutive affine maps, the sums of a block's paths and an output map are formed
in float64: each carries a bound of its distance to the exact matrix (:func:`_walk`), and the
check subtracts per-node shifts covering every exact matrix within them
(:func:`dag_weight_error_shifts`; design.md §3.3, §3.6).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import linalg, sparse
from scipy.sparse import linalg as sparse_linalg

from sdp.bounds.golden import golden_section
from sdp.bounds.result import BoundResult
from sdp.certificate import (
    REL_MARGIN,
    Certificate,
    mapped_output,
    output_map_error,
    output_map_fits,
)
from sdp.errors import CertificateError, LipcertError, NotApplicable
from sdp.ir import (
    Activation,
    Array,
    Conv2d,
    Dense,
    Network,
    Op,
    Residual,
    composition_error,
    frobenius_norm,
)

METHOD = "lipsdp-dag"
NODE_WIDTH_CAP = 8_192
"""Refuse lipsdp-dag when an activation layer is wider than this (dense blocks ~ width^2)."""
ENTRY_CAP = 120_000_000
"""Refuse lipsdp-dag when the dense coupling blocks would have more entries than this (~1 GB)."""
SEARCH_DIM_CAP = 3_000
"""Run the scale search only up to this LMI dimension: it costs one more elimination of the
whole LMI plus ~40 Lanczos runs in input space (74 s of resnet_2b's 112 s on a loaded core),
for little: on resnet_2b the searched optimum is k* (1 + 8e-4), on resnet_4b k* (1 + 1e-6),
so above the cap k is taken just above k* (the optimum sits at the feasibility edge, as for
deep chains in eclipse-fast)."""
SCALE_GRID = tuple(2.0**e for e in range(0, 13))
"""Multiples of the smallest admissible k tried before golden section (estimates only)."""
GOLDEN_STEPS = 12
"""Golden-section steps on log k between the best grid point's neighbours (a bracket of
ratio 4 shrinks to ratio 4^(0.618^12), about 1.006)."""
DESCENT_DIM_CAP = 2_000
"""Run the block-scale descent only when the LMI has at most this dimension (each step is one
certification: ~ms at a few hundred, ~10 s at resnet_2b's 9 316)."""
DESCENT_ROUNDS = 6
"""Rounds of the block-scale descent; the step factor halves (in log) each round."""
CERTIFY_TRIES = 4
"""Certification attempts at k (1 + 1e-3 * 10^i) above the estimated optimum before giving up."""

_U = np.finfo(np.float64).eps / 2
_TINY = np.finfo(np.float64).tiny


def _gamma(n: int) -> float:
    return n * _U / (1 - n * _U)


@dataclass(frozen=True, eq=False)
class DagNode:
    """One activation layer: dv = sum_j A_j dw_j over ``sources`` (j = 0 is the input)."""

    sources: tuple[tuple[int, Array], ...]
    alpha: Array
    beta: Array
    source_errors: tuple[float, ...] = ()
    """Per source, a bound of ||A_j - A_j*||_2 for the exact matrix A_j* of the network that
    the float A_j stands for (a product or sum formed by :func:`_walk`); () = all exact."""

    def __post_init__(self) -> None:
        _check_errors(self.source_errors, len(self.sources))

    @property
    def size(self) -> int:
        return int(self.alpha.shape[0])

    def errors(self) -> tuple[float, ...]:
        """:attr:`source_errors`, one per source (0.0 where none is given)."""
        return self.source_errors or (0.0,) * len(self.sources)


@dataclass(frozen=True, eq=False)
class DagLmi:
    """The LMI data of a network's DAG (module docstring): nodes 1..K and the output map."""

    input_size: int
    nodes: tuple[DagNode, ...]
    output: tuple[tuple[int, Array], ...]
    output_errors: tuple[float, ...] = ()
    """Per output source, a bound of ||O_j - O_j*||_2 (products, sums, an output map's
    rounding); () = all exact."""

    def __post_init__(self) -> None:
        _check_errors(self.output_errors, len(self.output))

    def output_error_list(self) -> tuple[float, ...]:
        """:attr:`output_errors`, one per output source (0.0 where none is given)."""
        return self.output_errors or (0.0,) * len(self.output)

    @property
    def has_weight_errors(self) -> bool:
        """True iff some coupling or output matrix carries an error bound."""
        return bool(self.output_errors) or any(n.source_errors for n in self.nodes)

    def size(self, k: int) -> int:
        """Dimension of node k (0 = the input)."""
        return self.input_size if k == 0 else self.nodes[k - 1].size

    @property
    def hidden_sizes(self) -> list[int]:
        return [n.size for n in self.nodes]

    @property
    def dimension(self) -> int:
        return self.input_size + sum(self.hidden_sizes)

    def last_use(self) -> list[int]:
        """last_use[j]: the last node reading node j (K + 1 for the output)."""
        last = [0] * (len(self.nodes) + 1)
        for k, node in enumerate(self.nodes, start=1):
            for j, _ in node.sources:
                last[j] = max(last[j], k)
        for j, _ in self.output:
            last[j] = len(self.nodes) + 1
        return last

    @classmethod
    def from_network(cls, net: Network, output_map: Array | None = None) -> DagLmi:
        """Walk the IR (residual blocks included) into nodes; ``output_map`` P bounds P f."""
        nodes: list[DagNode] = []
        value = _walk(net.ops, {0: (None, 0.0)}, net.input_size, nodes)
        out, errs = [], []
        p = None if output_map is None else np.asarray(output_map, np.float64)
        for j, (m, e) in sorted(value.items()):
            mat = _dense(m, _node_size(nodes, net.input_size, j))
            if p is not None:
                unmapped, mat = mat, mapped_output(p, mat)
                e = output_map_error(p, mat, e, weight=unmapped)
            out.append((j, mat))
            errs.append(e)
        return cls(net.input_size, tuple(nodes), tuple(out), tuple(errs) if any(errs) else ())


def _check_errors(errors: tuple[float, ...], n: int) -> None:
    """ValueError unless ``errors`` is () or n bounds >= 0 (NaN is not one)."""
    if errors and (len(errors) != n or any(not e >= 0 for e in errors)):
        raise ValueError("need one error bound >= 0 per source")


_Value = dict[int, tuple[Array | None, float]]
"""A linear function of node outputs: node -> (matrix (None = identity), a bound of the float
matrix's distance ||M - M*||_2 to the exact one it stands for)."""


def _node_size(nodes: list[DagNode], n0: int, j: int) -> int:
    return n0 if j == 0 else nodes[j - 1].size


def _dense(m: Array | None, n: int) -> Array:
    return np.eye(n) if m is None else m


def conv_matrix(conv: Conv2d) -> Array:
    """The dense matrix of a convolution's linear part, equal to ``conv.matrix()`` entry for
    entry (every entry is one kernel tap or 0), built by scattering the taps: output (o, y, x)
    reads input (c, y s_h + i d_h - p_t, x s_w + j d_w - p_l) with weight w[o, c, i, j]. Much
    faster than ``matrix()`` (adjoints of unit vectors) on CIFAR-sized layers."""
    co, cig, kh, kw = conv.weight.shape
    c, h, w = conv.in_shape
    _, ho, wo = conv.out_shape
    (sh, sw), (dh, dw) = conv.stride, conv.dilation
    pt, pl, _, _ = conv.padding
    cog = co // conv.groups
    m = np.zeros((co * ho * wo, c * h * w))
    oy, ox = np.meshgrid(np.arange(ho), np.arange(wo), indexing="ij")
    outs = np.arange(co)
    cins = (outs // cog)[:, None] * cig + np.arange(cig)[None, :]  # (co, cig) input channels
    for i in range(kh):
        for j in range(kw):
            iy, ix = oy * sh + i * dh - pt, ox * sw + j * dw - pl
            ok = (iy >= 0) & (iy < h) & (ix >= 0) & (ix < w)
            p_out, p_in = (oy * wo + ox)[ok], (iy * w + ix)[ok]
            rows = (outs * ho * wo)[:, None, None] + p_out[None, None, :]
            cols = (cins * h * w)[:, :, None] + p_in[None, None, :]
            # distinct taps read distinct input pixels: no index repeats within one tap
            m[rows, cols] = conv.weight[:, :, i, j][:, :, None]
    return m


def _walk(ops: tuple[Op, ...], value: _Value, n0: int, nodes: list[DagNode]) -> _Value:
    """The linear maps from node outputs to the value after ``ops``, appending the activation
    layers met to ``nodes``. Products of consecutive affine maps and the sums of a residual
    block's paths are rounded: each carries a bound of its error (:func:`_product`,
    :func:`_sum`), so that the check proves the LMI of the exact maps (design.md §3.6)."""
    for op in ops:
        if isinstance(op, Dense | Conv2d):
            w = op.weight if isinstance(op, Dense) else conv_matrix(op)
            value = {j: _product(w, m, e) for j, (m, e) in value.items()}
        elif isinstance(op, Activation):
            a, b = op.slope_bounds
            srcs = tuple(
                (j, _dense(m, _node_size(nodes, n0, j))) for j, (m, _) in sorted(value.items())
            )
            errs = tuple(e for _, (_, e) in sorted(value.items()))
            n = srcs[0][1].shape[0]
            nodes.append(
                DagNode(srcs, np.full(n, float(a)), np.full(n, float(b)), errs if any(errs) else ())
            )
            value = {len(nodes): (None, 0.0)}
        else:
            assert isinstance(op, Residual)
            body = _walk(op.body, value, n0, nodes)
            short = _walk(op.shortcut, value, n0, nodes) if op.shortcut else value
            merged: _Value = {}
            for part in (body, short):
                for j, path in part.items():
                    if j not in merged:
                        merged[j] = path
                    else:
                        merged[j] = _sum(merged[j], path, _node_size(nodes, n0, j))
            value = merged
    return value


def _product(w: Array, m: Array | None, error: float) -> tuple[Array, float]:
    """(fl(W M), a bound of ||fl(W M) - W M*||_2) for ||M - M*||_2 <= ``error``
    (:func:`sdp.ir.composition_error`); W itself where M is the identity (exact)."""
    if m is None:
        return w, error
    return w @ m, composition_error(w, m, error)


def _sum(
    first: tuple[Array | None, float], second: tuple[Array | None, float], n: int
) -> tuple[Array, float]:
    """The two paths of a residual block into one node, (fl(A + B), a bound of its distance
    to A* + B*): each entry is correctly rounded, |fl(a + b) - (a + b)| <= u |fl(a + b)|
    (Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., (2.5)), so the
    rounding is at most u ||fl(A + B)||_F, plus the two paths' own errors; the factor 1.001
    covers the float norm's rounding; inf if it overflows."""
    (a, ea), (b, eb) = first, second
    total = _dense(a, n) + _dense(b, n)
    with np.errstate(over="ignore", invalid="ignore"):
        bound = (_U * frobenius_norm(total) + ea + eb) * 1.001
    return total, bound if math.isfinite(bound) else math.inf


def check_dag_size(net: Network) -> None:
    """NotApplicable when the DAG's dense blocks would be too large (no unrolling done) or an
    activation has slopes of both signs (a b < 0: GELU, SiLU, leaky ReLU with a < 0)."""
    mixed = sorted({op.name for op in _activations(net.ops) if math.prod(op.slope_bounds) < 0})
    if mixed:
        raise NotApplicable(
            f"lipsdp-dag needs slope bounds with a*b >= 0; {', '.join(mixed)} has slopes of "
            "both signs (use naive)"
        )
    widths: list[int] = []
    entries, _ = _count(net.ops, net.input_size, widths)
    widest = max(widths, default=0)
    if widest > NODE_WIDTH_CAP or entries > ENTRY_CAP:
        raise NotApplicable(
            f"network too large for lipsdp-dag (widest activation layer {widest}, about "
            f"{entries} dense block entries; caps {NODE_WIDTH_CAP} / {ENTRY_CAP})",
            code="too-large-for-lipsdp-dag",
        )


def _activations(ops: tuple[Op, ...]) -> list[Activation]:
    out: list[Activation] = []
    for op in ops:
        if isinstance(op, Activation):
            out.append(op)
        elif isinstance(op, Residual):
            out += _activations(op.body) + _activations(op.shortcut)
    return out


def _count(ops: tuple[Op, ...], n: int, widths: list[int]) -> tuple[int, int]:
    """(dense entries of the unrolled affine maps and identity paths, output size) of ``ops``
    on inputs of size n; activation widths are appended to ``widths``."""
    total = 0
    for op in ops:
        if isinstance(op, Dense | Conv2d):
            total += op.in_features * op.out_features
            n = op.out_features
        elif isinstance(op, Activation):
            widths.append(n)
        else:
            eb, nb = _count(op.body, n, widths)
            es, _ = _count(op.shortcut, n, widths)
            total += eb + es + (0 if op.shortcut else n * n)
            n = nb
    return total, n


# ---------------------------------------------------------------- forward multiplier choice


def _lam_max(k: Array) -> float:
    n = k.shape[0]
    return float(linalg.eigvalsh(k, subset_by_index=[n - 1, n - 1])[0]) if n else 0.0


def dag_multipliers(lmi: DagLmi, stage: str = "rowsum") -> tuple[float, tuple[Array, ...]]:
    """(k*, T') of the forward recursion (module docstring): (k*, k* T') is an unverified
    LipSDP-Neuron point of the DAG's LMI. ``stage``: "scalar" (ECLipsE-Fast's t_k = 1 /
    lambda_max(K_k)) or "rowsum" (per neuron, t_i = 1 / (|K_k| 1)_i). NotApplicable when some
    a b < 0."""
    if any(np.any(n.alpha * n.beta < 0) for n in lmi.nodes):
        raise NotApplicable("lipsdp-dag needs slope bounds with a*b >= 0 on every neuron")
    last = lmi.last_use()
    frontier: list[int] = [0]
    factor = np.eye(lmi.input_size)  # lower Cholesky factor of P_F (rho = 1 on the input)
    t: list[Array] = []
    unit = True  # factor is still the identity (rho = 1 on the input): skip the solve
    for k, node in enumerate(lmi.nodes, start=1):
        bt = _couplings_t(lmi, frontier, node.sources, node.alpha + node.beta)
        if unit:
            y = bt
            sp = sparse.csr_matrix(bt.T)  # unrolled convolutions are sparse: K = B B^T cheaply
            gain = (sp @ sp.T).toarray() if sp.nnz < 0.05 * bt.size else bt.T @ bt
        else:
            y = linalg.solve_triangular(factor, bt, lower=True, check_finite=False)
            gain = y.T @ y
        tau = _stage(gain, stage)
        if not np.all(np.isfinite(tau)) or np.any(tau <= 0):
            raise LipcertError("lipsdp-dag: stage multiplier is not finite", code="dag-failed")
        t.append(tau)
        schur = -(tau[:, None] * gain * tau[None, :])
        schur[np.diag_indices_from(schur)] += 2 * tau
        l_kk = linalg.cholesky(schur, lower=True, check_finite=False)
        # drop the frontier's leading nodes that no node after k reads
        drop = 0
        while drop < len(frontier) and last[frontier[drop]] <= k:
            drop += 1
        off = sum(lmi.size(j) for j in frontier[:drop])
        keep = factor[off:, off:]
        n_keep, n_k = keep.shape[0], node.size
        new = np.zeros((n_keep + n_k, n_keep + n_k))
        new[:n_keep, :n_keep] = keep
        new[n_keep:, :n_keep] = -(tau[:, None] * y[off:].T)
        new[n_keep:, n_keep:] = l_kk
        factor = new
        unit = False
        frontier = [*frontier[drop:], k]
    bt = _couplings_t(lmi, frontier, lmi.output, None)
    y = bt if unit else linalg.solve_triangular(factor, bt, lower=True, check_finite=False)
    return _lam_max(y.T @ y), tuple(t)


def _stage(gain: Array, stage: str) -> Array:
    """Multipliers t of one node from its gain K = B P^{-1} B^T; both choices keep the Schur
    complement 2T - T K T >= T diag(r) T > 0 (r = 1/t): "scalar" since K <= lambda_max I,
    "rowsum" since K <= diag((|K| 1)_i) (for any w > 0, diag((|K| w)_i / w_i) - K is PSD:
    diagonally dominant after scaling by w). An estimate of lambda_max is enough: within a
    factor 2 the complement stays positive definite."""
    n = gain.shape[0]
    if stage == "scalar":
        lam = _lam_max_sym((gain + gain.T) / 2, tol=1e-10)
        return np.full(n, 1.0 / lam if lam > 0 and math.isfinite(lam) else 1.0)
    r = np.abs(gain) @ np.ones(n)
    r_max = float(r.max(initial=0.0))
    if not (math.isfinite(r_max) and r_max > 0):
        return np.ones(n)
    return 1.0 / np.maximum(r, 1e-6 * r_max)  # a neuron with no coupling: like the others


def _couplings_t(
    lmi: DagLmi,
    frontier: list[int],
    sources: tuple[tuple[int, Array], ...],
    scale: Array | None,
) -> Array:
    """[diag(scale) A_j for j in frontier]^T stacked over the frontier (zero where unread)."""
    offs = np.cumsum([0, *(lmi.size(j) for j in frontier)])
    n_out = sources[0][1].shape[0] if sources else 0
    bt = np.zeros((int(offs[-1]), n_out))
    pos = {j: i for i, j in enumerate(frontier)}
    for j, a in sources:
        if j not in pos:
            raise LipcertError("lipsdp-dag: a source left the frontier", code="dag-failed")
        i = pos[j]
        bt[offs[i] : offs[i + 1]] = (a if scale is None else scale[:, None] * a).T
    return bt


# ---------------------------------------------------------------- the LMI blocks and their rounding


_Blocks = dict[tuple[int, int], Array]


def _build(lmi: DagLmi, t: Sequence[Array], with_output: bool) -> tuple[_Blocks, dict[int, Array]]:
    """Blocks G_ij (i >= j, node ids; -1 is a pseudo-node for the output when not
    ``with_output``) of G = -M without rho, and per-row rounding bounds of forming them
    (|dG| <= F entrywise; returned as the row sums (F s)_i / s_i in Jacobi scaling, keyed by
    node, after the diagonal is known)."""
    blocks: _Blocks = {}
    err: list[
        tuple[int, int, Array, Array, Array]
    ] = []  # (i, j, |L|, |d|, |R|): F_ij = |L|^T|d||R|

    def add(i: int, j: int, blk: Array) -> None:
        if i < j:
            i, j, blk = j, i, blk.T
        if (i, j) in blocks:
            blocks[(i, j)] = blocks[(i, j)] + blk
        else:
            blocks[(i, j)] = np.array(blk, dtype=np.float64, copy=True)

    for k, (node, tk) in enumerate(zip(lmi.nodes, t, strict=True), start=1):
        add(k, k, np.diag(2.0 * tk))
        c_t = (node.alpha + node.beta) * tk
        for j, a in node.sources:
            add(k, j, -(c_t[:, None] * a))
        d_t = node.alpha * node.beta * tk
        if np.any(d_t):
            for ii, (i, ai) in enumerate(node.sources):
                for j, aj in node.sources[: ii + 1]:
                    add(i, j, 2 * (ai.T * d_t) @ aj)
                    err.append((i, j, np.abs(ai), 2 * np.abs(d_t), np.abs(aj)))
    for ii, (i, oi) in enumerate(lmi.output):
        for j, oj in lmi.output[: ii + 1]:
            if with_output:
                add(i, j, -(oi.T @ oj))
                err.append((i, j, np.abs(oi), np.ones(oi.shape[0]), np.abs(oj)))
        if not with_output:
            add(i, -1, oi.T)
    rows = _rounding_rows(lmi, blocks, err)
    return blocks, rows


def _rounding_rows(
    lmi: DagLmi, blocks: _Blocks, err: list[tuple[int, int, Array, Array, Array]]
) -> dict[int, Array]:
    """Per-neuron shift for the rounding of forming G: for each block pair (i, j) and any
    positive s, e_i = (F s_j)_i / (s_i)_i with F >= |G_float - G_exact| entrywise makes the
    pair's diag(e) - F PSD (scaled diagonal dominance), and the pairs' sum bounds the whole.
    Between two nodes, s = 1 / sqrt|G_ii| (Jacobi scaling: each node's part is relative to
    its own diagonal, e_i / G_ii = F / sqrt(G_ii G_jj)); within a block and towards the input
    (one scalar shift, its diagonal rho unknown here), s = sqrt|G_ii| (s = 1 on the input)."""
    root = {0: np.ones(lmi.input_size)}  # the input block is shifted by one scalar
    for k in range(1, len(lmi.nodes) + 1):
        root[k] = np.sqrt(np.abs(np.diag(blocks[(k, k)]))) + _TINY
    rows = {k: np.zeros(lmi.size(k)) for k in root}

    def pair(i: int, j: int) -> tuple[Array, Array]:
        if i != j and i > 0 and j > 0:
            return 1.0 / root[i], 1.0 / root[j]
        return root[i], root[j]

    with np.errstate(over="ignore", invalid="ignore"):  # inf refuses (the pivot fails)
        for i, j, li, d, rj in err:
            g = 2 * _gamma(li.shape[0] + 2)
            s_i, s_j = pair(i, j)
            rows[i] += g * (li.T @ (d * (rj @ s_j))) / s_i
            if i != j:
                rows[j] += g * (rj.T @ (d * (li @ s_i))) / s_j
        for (i, j), blk in blocks.items():
            if i != j and i >= 0 and j >= 0:  # coupling entries: products of two or three floats
                ab = np.abs(blk)
                s_i, s_j = pair(i, j)
                rows[i] += 4 * _U * (ab @ s_j) / s_i
                rows[j] += 4 * _U * (ab.T @ s_i) / s_j
    return rows


def _eliminate(blocks: _Blocks, order: Sequence[int], shifts: dict[int, Array] | None) -> None:
    """Block Cholesky: eliminate the nodes in ``order`` (each after all nodes above it that
    couple to it), updating the remaining blocks in place; CertificateError if a pivot block
    minus its shift is not positive definite."""
    for m in order:
        piv = blocks.pop((m, m))
        if shifts is not None:
            piv[np.diag_indices_from(piv)] -= shifts[m]
        try:
            r = linalg.cholesky(piv, lower=False, check_finite=True)
        except (linalg.LinAlgError, ValueError) as e:
            raise CertificateError(
                f"the LMI is not negative definite (pivot block of node {m} fails Cholesky)",
                code="certificate-infeasible",
            ) from e
        nbrs = sorted((j for (i, j) in blocks if i == m), reverse=True)
        ys = {}
        for j in nbrs:
            ys[j] = linalg.solve_triangular(
                r, blocks.pop((m, j)), trans="T", lower=False, check_finite=False
            )
        if any(i == m or j == m for (i, j) in blocks):
            raise LipcertError("lipsdp-dag: elimination order is not valid", code="dag-failed")
        for a, i in enumerate(nbrs):
            for j in nbrs[a:]:
                upd = ys[i].T @ ys[j]
                blocks[(i, j)] = blocks[(i, j)] - upd if (i, j) in blocks else -upd


def _check_multipliers(lmi: DagLmi, t: Sequence[Array]) -> tuple[Array, ...]:
    t = tuple(np.asarray(ti, dtype=np.float64) for ti in t)
    if len(t) != len(lmi.nodes) or any(
        ti.shape != (n,) for ti, n in zip(t, lmi.hidden_sizes, strict=True)
    ):
        raise CertificateError(
            "multipliers do not match the network's activation layers", code="certificate-mismatch"
        )
    if any(np.any(~np.isfinite(ti)) or np.any(ti < 0) for ti in t):
        raise CertificateError("multipliers must be finite and >= 0", code="certificate-invalid")
    return t


@dataclass
class _Reduced:
    q: Array  # input-space matrix Q: -M(rho, T) - shifts >= 0 iff (rho - input shift) I >= Q
    q_err: float
    n_total: int


def _factorise(lmi: DagLmi, t: Sequence[Array]) -> _Reduced:
    """Backward block Cholesky of the hidden part of G(T) with rigorous per-neuron shifts."""
    t = _check_multipliers(lmi, t)
    # the weight errors' shifts (1e-6 more: the rounding of subtracting them)
    werr = dag_weight_error_shifts(lmi, t)
    if not all(math.isfinite(d) for d in werr.values()):
        raise CertificateError(
            "the network's composite weights are not known accurately enough to certify",
            code="certificate-infeasible",
        )
    blocks, rows = _build(lmi, t, with_output=True)
    n_total = lmi.dimension
    rel = 2 * _gamma(n_total + 1) * (n_total + 1)
    shifts = {}
    for k in range(1, len(lmi.nodes) + 1):
        diag = np.abs(np.diag(blocks[(k, k)]))
        # + 2u |G_ii|: the rounding of adding 2 t_k to own or output terms on the diagonal
        shifts[k] = (rel + 2 * _U) * diag + rows[k] + werr[k] * (1 + 1e-6) + _TINY
    _eliminate(blocks, range(len(lmi.nodes), 0, -1), shifts)
    g00 = blocks.get((0, 0), np.zeros((lmi.input_size, lmi.input_size)))
    # rows[0] is in the scaling s_0 = 1 (any positive s is valid): the input block's
    # formation error has spectral norm <= max_i rows[0]_i, applied as one scalar shift
    q_err = float(np.max(rows[0], initial=0.0)) + werr[0] * (1 + 1e-6)
    return _Reduced(q=-g00, q_err=q_err, n_total=n_total)


def dag_weight_error_shifts(lmi: DagLmi, t: Sequence[Array]) -> dict[int, float]:
    """Per node k (0 = the input), delta_k with G(T; A*, O*) - G(T; A, O) >= -diag(delta_k I)
    for every exact coupling A_kj* and output O_j* within the LMI's error bounds (e_kj >=
    ||A_kj* - A_kj||_2, f_j >= ||O_j* - O_j||_2); all 0.0 for an exact DAG.

    The DAG analogue of :func:`sdp.certificate.weight_error_shifts` (design.md §3.3, §3.6).
    A_kj enters the coupling block G_kj = -diag((a+b) t_k) A_kj: a symmetric pair [[0, C^T],
    [C, 0]] is >= -||C|| (I + I) (its eigenvalues are +-sigma(C)), so c = max|(a+b) t_k| e_kj
    goes to nodes k and j. A_k = [A_kj]_j (the sources side by side) enters the own term
    A_k^T diag(2 a b t_k) A_k: with E_k = A_k* - A_k, ||E_k||_2 <= sqrt(sum_j e_kj^2) = e_k and
    ||A_k||_2 <= ||A_k||_F, the change A*^T D A* - A^T D A = E^T D A + A^T D E + E^T D E has
    norm <= 2 max|a b t_k| (2 ||A_k||_F e_k + e_k^2), a symmetric matrix on the sources' blocks,
    so >= -that times I on each source. Likewise -O^T O changes by at most 2 ||O||_F f + f^2
    (f = sqrt(sum_j f_j^2)) on each output source. Weyl: the sum of these lower bounds bounds
    the sum. The factor 1.001 covers the float evaluation of these positive terms; inf where
    they overflow.
    """
    delta = dict.fromkeys(range(len(lmi.nodes) + 1), 0.0)
    if not lmi.has_weight_errors:
        return delta
    with np.errstate(over="ignore", invalid="ignore"):
        for k, (node, tk) in enumerate(zip(lmi.nodes, t, strict=True), start=1):
            if not node.source_errors:
                continue
            tk = np.asarray(tk, np.float64)
            c_max = float(np.max(np.abs((node.alpha + node.beta) * tk), initial=0.0))
            for j, own_part, source_part in _coupling_split(node, tk, c_max):
                delta[k] += own_part
                delta[j] += source_part
            d_max = float(np.max(np.abs(node.alpha * node.beta * tk), initial=0.0))
            if d_max:
                own = 2 * d_max * _quadratic_change(node.sources, node.errors())
                for j, _ in node.sources:
                    delta[j] += own
        if lmi.output_errors:
            out = _quadratic_change(lmi.output, lmi.output_error_list())
            for j, _ in lmi.output:
                delta[j] += out
        return {k: d * 1.001 if math.isfinite(d * 1.001) else math.inf for k, d in delta.items()}


def _coupling_split(node: DagNode, tk: Array, c_max: float) -> list[tuple[int, float, float]]:
    """Per source j of ``node`` (k), (j, part on node k, part on node j) of the coupling error
    c_j = c_max e_kj: [[0, C^T], [C, 0]] >= -(s ||C|| I_k (+) ||C|| / s I_j) for every s > 0
    (2 |y^T C x| <= ||C|| (s |y|^2 + |x|^2 / s), AM-GM). The even split s = 1 is kept unless the
    node's parts would reach its smallest diagonal entry 2 min t_k (its pivot, which the
    elimination only lowers, would then certainly fail); then node k takes b = min t_k /
    (2 |src|) per source and node j the rest, c_j^2 / b (s = b / c_j): a wide node after a
    narrow one, or a coupling error larger than the node's multiplier, can still certify."""
    errors = node.errors()
    parts = [c_max * e for e in errors]
    pivot = 2 * float(np.min(tk, initial=math.inf)) if tk.size else 0.0
    b = pivot / (4 * len(parts)) if math.isfinite(pivot) else 0.0
    if not (sum(parts) >= pivot and b > 0):
        return [(j, c, c) for (j, _), c in zip(node.sources, parts, strict=True)]
    return [
        (j, min(c, b), c if c <= b else c * (c / b))
        for (j, _), c in zip(node.sources, parts, strict=True)
    ]


def _quadratic_change(parts: Sequence[tuple[int, Array]], errors: Sequence[float]) -> float:
    """Bound of ||A*^T A* - A^T A||_2 for A = [A_j]_j side by side and ||A_j* - A_j||_2 <=
    ``errors``: 2 ||A||_F e + e^2 with e = sqrt(sum_j e_j^2) >= ||A* - A||_2 (Cauchy-Schwarz
    over the column blocks). 0.0 when all errors are 0."""
    e = frobenius_norm(np.asarray(errors, dtype=np.float64)) * 1.001
    if not e:
        return 0.0
    a_norm = frobenius_norm(np.array([frobenius_norm(a) for _, a in parts])) * 1.001
    return 2 * a_norm * e + e * e + 4 * 2.0**-1074  # (the products may underflow)


def _input_shift(f: _Reduced, rho: float) -> float:
    n0 = f.q.shape[0]
    trace = n0 * abs(rho) + float(np.abs(np.diag(f.q)).sum())
    return f.q_err + 2 * _gamma(f.n_total + 1) * trace


def _final_ok(f: _Reduced, rho: float) -> bool:
    blk = -f.q
    blk[np.diag_indices_from(blk)] += rho - _input_shift(f, rho)
    try:
        linalg.cholesky(blk, lower=False, check_finite=True)
    except (linalg.LinAlgError, ValueError):
        return False
    return True


def _lam_max_sym(q: Array, start: list[Array] | None = None, tol: float = 1e-12) -> float:
    """lambda_max of a symmetric matrix (Lanczos for large ones; an estimate, confirmed or
    compared only). ``start``, when given, holds a starting vector and receives the new one."""
    n = q.shape[0]
    if n <= 600:
        return _lam_max(q)
    v0 = start[0] if start else None
    try:
        vals, vecs = sparse_linalg.eigsh(q, k=1, which="LA", tol=tol, ncv=32, v0=v0)
    except sparse_linalg.ArpackError:
        return _lam_max(q)
    if start is not None:
        start[:] = [vecs[:, 0]]
    return float(vals[0])


def certify_dag(lmi: DagLmi, t: Sequence[Array], *, rel_margin: float = REL_MARGIN) -> float:
    """The smallest rho this module can confirm for multipliers T (module docstring).

    Raises:
        CertificateError: the hidden part of the LMI is not negative definite with the margins.
    """
    f = _factorise(lmi, t)
    if not np.all(np.isfinite(f.q)):
        raise CertificateError("the reduced LMI overflows float64", code="certificate-infeasible")
    rho = max(_lam_max_sym(f.q), 0.0)
    for _ in range(8):
        rho = (rho + _input_shift(f, rho)) * (1 + rel_margin) + _TINY
        if _final_ok(f, rho):
            return float(rho)
        rel_margin *= 10
    raise CertificateError("could not confirm rho(T) by Cholesky", code="certificate-unconfirmed")


def verify_dag(lmi: DagLmi, cert: Certificate) -> bool:
    """True iff M(cert.rho, T) <= 0 is confirmed in float64 (with the float shifts)."""
    if not (math.isfinite(cert.rho) and cert.rho >= 0):
        return False
    try:
        f = _factorise(lmi, cert.multipliers)
    except CertificateError:
        return False
    return _final_ok(f, cert.rho)


def verify_dag_on(net: Network, cert: Certificate) -> bool:
    """True iff ``cert`` (a ``lipsdp-dag`` certificate) proves its bound on ``net`` itself, with
    the certificate's own output map; False (never an exception) on any mismatch."""
    if not output_map_fits(cert.output_map, net.output_size):
        return False
    try:
        lmi = DagLmi.from_network(net, output_map=cert.output_map)
    except (ValueError, NotApplicable):
        return False
    if len(cert.multipliers) != len(lmi.nodes) or any(
        np.shape(t) != (n,) for t, n in zip(cert.multipliers, lmi.hidden_sizes, strict=False)
    ):
        return False
    return verify_dag(lmi, cert)


# ---------------------------------------------------------------- scale search


def _scale_estimator(lmi: DagLmi, t_prime: Sequence[Array]) -> tuple[Array, Array, Array]:
    """(Z, V, Gamma) of the module docstring ("Scale"), by one elimination of H(T')."""
    blocks, _ = _build(lmi, t_prime, with_output=False)
    _eliminate(blocks, range(len(lmi.nodes), 0, -1), None)
    n0 = lmi.input_size
    m = lmi.output[0][1].shape[0] if lmi.output else 0
    z = -blocks.get((0, 0), np.zeros((n0, n0)))
    v = -blocks.get((0, -1), np.zeros((n0, m)))
    gam = -blocks.get((-1, -1), np.zeros((m, m)))
    return z, v, gam


def _scale_search(lmi: DagLmi, t_prime: Sequence[Array], k_star: float) -> float:
    """The k minimising the estimated rho(k T') (an estimate; the caller certifies it)."""
    if any(j == 0 for j, _ in lmi.output) or not (math.isfinite(k_star) and k_star > 0):
        return k_star  # an output read straight from the input (no pseudo-node split), or a
        # zero output map (nothing to search): keep k*
    z, v, gam = _scale_estimator(lmi, t_prime)
    g_max = max(_lam_max((gam + gam.T) / 2), 0.0)
    start: list[Array] = []  # Lanczos warm start: the top eigenvector moves little with k

    def rho(log_k: float) -> float:
        k = math.exp(log_k)
        inner = k * np.eye(gam.shape[0]) - gam
        try:
            w = linalg.solve(inner, v.T, assume_a="pos")
        except (linalg.LinAlgError, ValueError):
            return math.inf
        q = z + v @ w
        return k * _lam_max_sym((q + q.T) / 2, start, tol=1e-8)

    base = max(g_max, k_star * 1e-6, _TINY) * (1 + 1e-6)
    logs = [math.log(base * f) for f in SCALE_GRID]
    if math.log(k_star) not in logs:
        logs = sorted([*logs, math.log(k_star)])
    vals = [rho(x) for x in logs]
    i = int(np.argmin(vals))
    lo, hi = logs[max(i - 1, 0)], logs[min(i + 1, len(logs) - 1)]
    x, fx = golden_section(rho, lo, hi, GOLDEN_STEPS)
    return math.exp(x if fx < vals[i] else logs[i])


def _block_descent(
    lmi: DagLmi, best: tuple[float, tuple[Array, ...]], t0: float, limit: float | None
) -> tuple[float, tuple[Array, ...]]:
    """Coordinate descent on one log-scale per node (and one for all): each candidate T is
    certified by :func:`certify_dag` and kept only if its certified rho is smaller. The
    closed-form choice ignores the own terms (a b > 0) and looks one node ahead only; this
    recovers much of the gap to the optimum on small networks."""
    step = math.log(2.0)
    n = len(best[1])
    for _ in range(DESCENT_ROUNDS):
        for k in range(-1, n):
            for sign in (1.0, -1.0):
                if limit is not None and time.perf_counter() - t0 > limit:
                    return best
                f = math.exp(sign * step)
                mults = tuple(ti * f if k in (-1, i) else ti for i, ti in enumerate(best[1]))
                try:
                    rho = certify_dag(lmi, mults)
                except CertificateError:
                    continue
                if rho < best[0]:
                    best = (rho, mults)
                    break
        step /= 2
    return best


# ---------------------------------------------------------------- the bound


def _check_time(t0: float, limit: float | None, stage: str) -> None:
    if limit is not None and time.perf_counter() - t0 > limit:
        raise LipcertError(
            f"lipsdp-dag exceeded its time limit of {limit:g} s ({stage})", code="time-limit"
        )


def dag_bound(net: Network, *, time_limit_s: float | None = None) -> BoundResult:
    """Verified l2 Lipschitz bound by LipSDP-Neuron over the DAG (method ``lipsdp-dag``).

    ``time_limit_s`` is checked between stages (the forward recursion, the scale search, each
    certification attempt), so a run may overshoot it by one stage.

    Raises:
        NotApplicable: too large, or slopes of both signs.
        LipcertError: over the time limit (code ``time-limit``), or no candidate certified.
    """
    check_dag_size(net)
    t0 = time.perf_counter()
    lmi = DagLmi.from_network(net)
    small = lmi.dimension <= DESCENT_DIM_CAP
    best = None
    for stage in ("rowsum", "scalar") if small else ("scalar",):
        cand = _certified_stage(lmi, stage, t0, time_limit_s)
        if cand is not None and (best is None or cand[0] < best[0]):
            best = cand
    t1 = time.perf_counter()
    if best is None:
        why = (
            " (its composite weights carry rounding bounds, perhaps too large to certify)"
            if lmi.has_weight_errors
            else ""
        )
        raise LipcertError(f"lipsdp-dag multipliers did not certify{why}", code="dag-unverified")
    if small:
        best = _block_descent(lmi, best[:2], t0, time_limit_s) + best[2:]
    rho, mults, k_star, tries = best
    cert = Certificate(
        rho=rho,
        multipliers=mults,
        network_hash=net.content_hash(),
        meta={"method": METHOD, "structure": "dag", "closed_form_rho": k_star},
    )
    # certify_dag has factorised all of -M(rho, T) - cI at this rho: that is the verification
    # (verify_dag would repeat the same factorisation)
    t2 = time.perf_counter()
    return BoundResult(
        value=cert.lipschitz_bound,
        method=METHOD,
        verified=True,
        certificate=cert,
        timings={"solve_s": t1 - t0, "descent_s": t2 - t1, "total_s": t2 - t0},
        notes=(
            "LipSDP-Neuron over the network's DAG, skip paths inside the LMI (design.md §3.6); "
            f"ECLipsE-Fast-style multipliers, certified by block Cholesky ({tries} tries); "
            f"recursion's rho {k_star:.9g}, certified {cert.rho:.9g}",
        ),
    )


def _error_scale(lmi: DagLmi, t_prime: Sequence[Array]) -> float:
    """The smallest scale k with k t'_j >= 4 delta_j on every node j, delta the part of the
    weight-error shifts (:func:`dag_weight_error_shifts`) that does not grow with T (the
    output's); 0.0 for an exact output. The forward recursion leaves each node a margin of
    about t_j (module docstring), which larger errors would use up: an estimate, certified
    like every other candidate."""
    if not lmi.output_errors:
        return 0.0
    fixed = dag_weight_error_shifts(lmi, [np.zeros(n) for n in lmi.hidden_sizes])
    need = [4 * fixed[k] / float(np.min(t, initial=math.inf)) for k, t in enumerate(t_prime, 1)]
    k = max(need, default=0.0)
    return k if math.isfinite(k) else 0.0


def _certified_stage(
    lmi: DagLmi, stage: str, t0: float, time_limit_s: float | None
) -> tuple[float, tuple[Array, ...], float, int] | None:
    """(certified rho, T, k*, tries) for the forward recursion with ``stage``, or None."""
    try:
        k_star, t_prime = dag_multipliers(lmi, stage)
    except (linalg.LinAlgError, ValueError):  # scales beyond float64 (overflow, subnormals)
        return None
    _check_time(t0, time_limit_s, "after the multipliers")
    if lmi.dimension <= SEARCH_DIM_CAP:
        try:
            k_best = _scale_search(lmi, t_prime, k_star)
        except (linalg.LinAlgError, ValueError):  # an estimate only: keep k*
            k_best = k_star
        cands = [k_best * (1 + 1e-3 * 10**i) for i in range(CERTIFY_TRIES - 1)]
    else:
        cands = [k_star * (1 + 1e-3 * 10**i) for i in range(CERTIFY_TRIES - 1)]
    cands.append(k_star)
    k_err = _error_scale(lmi, t_prime)
    if k_err > min(cands):  # the output's error shifts would eat the nodes' margins there
        cands = [k for k in cands if k > k_err] + [k_err * 4.0**i for i in range(CERTIFY_TRIES)]
    tries = 0
    for k in cands:
        _check_time(t0, time_limit_s, "certification")
        tries += 1
        mults = tuple(k * ti for ti in t_prime)
        try:
            return certify_dag(lmi, mults), mults, k_star, tries
        except CertificateError:
            continue
    return None
