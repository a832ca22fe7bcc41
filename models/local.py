"""alpha-CROWN lower slopes optimised in torch, batched on ``LIPCERT_DEVICE`` (issue 12).

:func:`sdp.local.certify_local` accepts a ``SlopeOptimizer``: a callable that receives a
:class:`sdp.local.SlopeProblem` (the inputs, radii, objective rows c (B, m, K), the
pre-activation bounds [l, u] of the activation nodes with optimisable neurons, the current
slopes, their masks and ranges) and returns candidate lower slopes. sdp recomputes the bound
from them in float64 with rigorous rounding and keeps them only where they are better, so
nothing computed here is ever reported unverified.

:class:`TorchSlopeOptimizer` runs the same CROWN backward pass as :mod:`sdp.local.propagate`
(Zhang et al., NeurIPS 2018), without its rounding terms, as a differentiable torch function
of the slopes alpha (Xu et al., "Fast and Complete", ICLR 2021), on the GPU when there is one:

    Lambda_K = c;  affine z_k = W z_{k-1} + b:  Lambda_{k-1} += W^T Lambda_k,  d += Lambda_k . b
    act z_k = phi(z_{k-1}):  Lambda_{k-1} += [Lambda_k]_+ s_lo + [Lambda_k]_- s_up,
                             d += [Lambda_k]_+ t_lo + [Lambda_k]_- t_up
    add z = z_p + z_q:  Lambda_p += Lambda,  Lambda_q += Lambda
    bound(alpha) = Lambda_0 . x0 - eps ||Lambda_0||_2 + d   (min of a^T x over the l2 ball)

with ReLU / leaky-ReLU lines on [l, u]: upper chord through (l, phi(l)), (u, phi(u)), lower
line alpha z for unstable neurons (alpha in [alpha_min, alpha_max]), the exact line for stable
ones (activation nodes without optimisable neurons are stable everywhere on the ball: their
slope is read from the sign of the pre-activation at x0). The slopes are improved by projected
Adam on -sum(bound) with the same update as :func:`sdp.local.alpha.optimise_alphas` (its
hand-made gradient Lambda v(x*) is the a.e. gradient autograd computes here), and the best
iterate per row is returned. Networks with other activations (tanh, sigmoid, ...) are
returned their current slopes unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from models.runtime import resolve_device
from sdp.ir import Activation, Array, Conv2d, Dense
from sdp.local import SlopeProblem
from sdp.local.graph import Graph, Node, build_graph

PIECEWISE_LINEAR = ("relu", "leaky_relu", "identity")


class _Affine:
    """W z + b of one affine node as torch ops (Dense or Conv2d), and W^T y."""

    def __init__(self, node: Node, device: torch.device) -> None:
        op = node.op
        self.op = op
        weight = np.array(op.weight, dtype=np.float64)  # type: ignore[union-attr]
        self.bias = torch.tensor(np.array(node.full_bias), dtype=torch.float64, device=device)
        self.weight = torch.tensor(weight, dtype=torch.float64, device=device)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        op = self.op
        if isinstance(op, Dense):
            return z @ self.weight.T + self.bias
        assert isinstance(op, Conv2d)
        lead = z.shape[:-1]
        c, h, w = op.in_shape
        pt, pl, pb, pr = op.padding
        x = F.pad(z.reshape(-1, c, h, w), (pl, pr, pt, pb))
        y = F.conv2d(x, self.weight, None, op.stride, 0, op.dilation, op.groups)
        return y.reshape(*lead, -1) + self.bias

    def transpose(self, y: torch.Tensor) -> torch.Tensor:
        op = self.op
        if isinstance(op, Dense):
            return y @ self.weight
        assert isinstance(op, Conv2d)
        lead = y.shape[:-1]
        _c, h, w = op.in_shape
        pt, pl, pb, pr = op.padding
        hp, wp = h + pt + pb, w + pl + pr
        _, ho, wo = op.out_shape
        kh, kw = op.weight.shape[2:]
        (sh, sw), (dh, dw) = _pair(op.stride), _pair(op.dilation)
        extra = (hp - ((ho - 1) * sh + dh * (kh - 1) + 1), wp - ((wo - 1) * sw + dw * (kw - 1) + 1))
        x = F.conv_transpose2d(
            y.reshape(-1, *op.out_shape),
            self.weight,
            None,
            op.stride,
            0,
            extra,
            op.groups,
            op.dilation,
        )
        return x[:, :, pt : pt + h, pl : pl + w].reshape(*lead, -1)


def _pair(v: Any) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _lines(
    phi: Activation, lo: torch.Tensor, hi: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(lower slope, upper slope, upper intercept, unstable) of a piecewise-linear activation
    on [lo, hi] (lower intercept 0: lines through the kink at 0)."""
    if phi.name == "identity":
        one = torch.ones_like(lo)
        return one, one, torch.zeros_like(lo), torch.zeros_like(lo, dtype=torch.bool)
    p = phi.param if phi.name == "leaky_relu" else 0.0
    active, inactive = lo >= 0, hi <= 0
    unstable = ~(active | inactive)
    stable = torch.where(active, torch.ones_like(lo), torch.full_like(lo, p))
    width = torch.where(unstable, hi - lo, torch.ones_like(lo))
    chord = (hi - p * lo) / width
    up_s = torch.where(unstable, chord, stable)
    up_t = torch.where(unstable, hi - chord * hi, torch.zeros_like(lo))
    return stable, up_s, up_t, unstable


class TorchSlopeOptimizer:
    """A :class:`sdp.local.SlopeOptimizer` on a torch device (see the module docstring).

    Args:
        device: ``auto`` (cuda when available), ``cpu``, ``cuda`` or ``cuda:K``.
        iterations: Adam steps (the best of the ``iterations + 1`` iterates is returned).
        lr: Adam step size (sdp's own optimiser uses 0.2).
    """

    def __init__(self, device: str = "auto", *, iterations: int = 20, lr: float = 0.2) -> None:
        self.device = torch.device(resolve_device(device))
        self.iterations = int(iterations)
        self.lr = float(lr)

    def __call__(self, problem: SlopeProblem) -> Sequence[Array]:
        graph = build_graph(problem.net)
        if any(
            nd.op.name not in PIECEWISE_LINEAR  # type: ignore[union-attr]
            for nd in graph.act_nodes()
        ):
            return [np.array(a, dtype=np.float64) for a in problem.alpha_init]
        with torch.no_grad():
            run = _Problem(graph, problem, self.device)
        return run.optimise(self.iterations, self.lr)


class _Problem:
    """The torch form of one SlopeProblem: fixed lines, the optimised slopes, the bound."""

    def __init__(self, graph: Graph, problem: SlopeProblem, device: torch.device) -> None:
        def t(a: Any) -> torch.Tensor:
            return torch.tensor(np.array(a, dtype=np.float64), device=device)

        self.graph = graph
        self.problem = problem
        self.x0 = t(problem.x0)
        self.eps = t(problem.eps)
        self.c = t(problem.objective)
        self.affine = {nd.index: _Affine(nd, device) for nd in graph.nodes if nd.kind == "affine"}
        pre = self._pre_activations()
        listed = {k: i for i, k in enumerate(problem.act_nodes)}
        self.lines: dict[int, tuple[torch.Tensor, ...]] = {}
        self.masks: dict[int, torch.Tensor] = {}
        self.alphas: dict[int, torch.Tensor] = {}
        self.ranges: dict[int, tuple[float, float]] = {}
        for nd in graph.act_nodes():
            phi = nd.op
            assert isinstance(phi, Activation)
            if nd.index in listed:
                i = listed[nd.index]
                lo, hi = t(problem.pre_lower[i]), t(problem.pre_upper[i])
                self.masks[nd.index] = torch.as_tensor(problem.alpha_mask[i], device=device)
                self.alphas[nd.index] = t(problem.alpha_init[i]).clone()
                self.ranges[nd.index] = (problem.alpha_min[i], problem.alpha_max[i])
            else:  # stable on the whole ball: the side of the kink x0 is on
                lo = hi = pre[nd.index]
            lo_s, up_s, up_t, _ = _lines(phi, lo, hi)
            self.lines[nd.index] = (lo_s, up_s, up_t)

    def _pre_activations(self) -> dict[int, torch.Tensor]:
        """The pre-activation (B, n) of every act node at x0 (exact network forward)."""
        vals: dict[int, torch.Tensor] = {0: self.x0}
        pre: dict[int, torch.Tensor] = {}
        for nd in self.graph.nodes[1:]:
            if nd.kind == "affine":
                vals[nd.index] = self.affine[nd.index].forward(vals[nd.parents[0]])
            elif nd.kind == "act":
                v = vals[nd.parents[0]]
                pre[nd.index] = v
                phi = nd.op
                assert isinstance(phi, Activation)
                slope = phi.param if phi.name == "leaky_relu" else 0.0
                if phi.name == "identity":
                    vals[nd.index] = v
                else:
                    vals[nd.index] = torch.where(v >= 0, v, slope * v)
            elif nd.kind == "add":
                vals[nd.index] = vals[nd.parents[0]] + vals[nd.parents[1]]
        return pre

    def bound(self, alphas: dict[int, torch.Tensor]) -> torch.Tensor:
        """The CROWN lower bound (B, m) of every objective row for these slopes."""
        g = self.graph
        lam: dict[int, torch.Tensor] = {g.output: self.c}
        d = torch.zeros(self.c.shape[:2], dtype=torch.float64, device=self.c.device)
        for nd in reversed(g.nodes[1:]):
            cur = lam.pop(nd.index, None)
            if cur is None:
                continue
            if nd.kind == "affine":
                aff = self.affine[nd.index]
                d = d + cur @ aff.bias
                _acc(lam, nd.parents[0], aff.transpose(cur))
            elif nd.kind == "act":
                lo_s, up_s, up_t = self.lines[nd.index]
                s_lo = lo_s[:, None, :]
                if nd.index in alphas:
                    s_lo = torch.where(self.masks[nd.index][:, None, :], alphas[nd.index], s_lo)
                pos, neg = cur.clamp(min=0), cur.clamp(max=0)
                d = d + (neg * up_t[:, None, :]).sum(-1)
                _acc(lam, nd.parents[0], pos * s_lo + neg * up_s[:, None, :])
            elif nd.kind == "add":
                for p in nd.parents:
                    _acc(lam, p, cur)
        a = lam.pop(0)
        return (a * self.x0[:, None, :]).sum(-1) - self.eps[:, None] * a.norm(dim=-1) + d

    def optimise(self, iterations: int, lr: float) -> list[Array]:
        """Projected Adam ascent on the bound; the best iterate per row (B, m)."""
        keys = list(self.alphas)
        alphas = {k: v.clone().requires_grad_(True) for k, v in self.alphas.items()}
        best_alpha = {k: v.detach().clone() for k, v in alphas.items()}
        best = torch.full(self.c.shape[:2], -math.inf, dtype=torch.float64, device=self.c.device)
        mom = {k: torch.zeros_like(v) for k, v in alphas.items()}
        vel = {k: torch.zeros_like(v) for k, v in alphas.items()}
        b1, b2, tiny = 0.9, 0.999, 1e-12
        for it in range(iterations + 1):
            value = self.bound(alphas)
            with torch.no_grad():
                better = value > best
                best = torch.where(better, value, best)
                for k in keys:
                    best_alpha[k] = torch.where(better[:, :, None], alphas[k], best_alpha[k])
            if it == iterations or not keys:
                break
            grads = torch.autograd.grad(value.sum(), [alphas[k] for k in keys])
            with torch.no_grad():
                for k, grad in zip(keys, grads, strict=True):
                    grad = torch.where(self.masks[k][:, None, :], grad, torch.zeros_like(grad))
                    mom[k] = b1 * mom[k] + (1 - b1) * grad
                    vel[k] = b2 * vel[k] + (1 - b2) * grad * grad
                    step = (
                        lr
                        * (mom[k] / (1 - b1 ** (it + 1)))
                        / (torch.sqrt(vel[k] / (1 - b2 ** (it + 1))) + tiny)
                    )
                    lo, hi = self.ranges[k]
                    alphas[k].add_(step).clamp_(lo, hi)
        out = []
        for k in self.problem.act_nodes:
            out.append(best_alpha[k].detach().cpu().numpy().astype(np.float64))
        return out


def _acc(lam: dict[int, torch.Tensor], node: int, value: torch.Tensor) -> None:
    lam[node] = value if node not in lam else lam[node] + value


def slope_optimizer(device: str = "auto") -> TorchSlopeOptimizer | None:
    """The torch optimiser for ``LIPCERT_DEVICE``-style names, or None for ``cpu`` (sdp's own
    numpy optimiser is as fast there, without the torch start-up)."""
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return None
    return TorchSlopeOptimizer(device)
