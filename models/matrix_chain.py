"""Matrix chains multiplied in the cheapest order for forward + backward (training speed).

``chain_product(mats)`` computes ``mats[0] @ mats[1] @ ...`` where each entry is a dense 2-D
tensor or an *implicit* factor (an object with ``shape``, ``requires_grad``, ``right(R) = R F``
and ``left(R) = F R``, e.g. :class:`models.cayley_inverse.InverseFactor`, which applies
M = (I + Z)^{-1} without differentiating through it). The order is the classic matrix-chain
dynamic programme on multiply-adds: a dense product (a x b)(b x c) costs a b c forward plus
a b c per operand that needs a gradient; applying an implicit q x q factor to an r-row operand
costs 3 r q^2 (forward, dL/dR, dL/dQ); two implicit factors are never multiplied together.

That is how an LBDN step skips forming B^T = -2 Y M when the batch is smaller than the input
width, folds A_k into the next layer's weights when the batch is large, and always folds the
small output layer -- the same maths in every order.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

_INF = float("inf")


class ImplicitFactor(Protocol):
    shape: tuple[int, int]
    requires_grad: bool

    def right(self, r: Tensor, bias: Tensor | None = None) -> Tensor: ...

    def left(self, r: Tensor) -> Tensor: ...


@functools.lru_cache(maxsize=512)
def _chain_plan(dims: tuple[int, ...], grads: tuple[bool, ...], implicit: tuple[bool, ...]) -> Any:
    """Optimal parenthesisation (nested index pairs) of the chain dims[i] x dims[i+1]."""
    n = len(grads)
    # (cost, plan, needs grad, is a lone implicit factor)
    best: dict[tuple[int, int], tuple[float, Any, bool, bool]] = {
        (i, i): (0, i, grads[i], implicit[i]) for i in range(n)
    }
    for length in range(2, n + 1):
        for i in range(n - length + 1):
            j = i + length - 1
            cur: tuple[float, Any, bool, bool] = (_INF, None, False, False)
            for k in range(i, j):
                cl, pl, gl, il = best[(i, k)]
                cr, pr, gr, ir = best[(k + 1, j)]
                if il and ir:
                    continue
                weight = 3 if il or ir else 1 + gl + gr
                c = cl + cr + dims[i] * dims[k + 1] * dims[j + 1] * weight
                if c < cur[0]:
                    cur = (c, (pl, pr), gl or gr, False)
            best[(i, j)] = cur
    if best[(0, n - 1)][1] is None:
        raise ValueError("a chain needs a dense factor next to every implicit one")
    return best[(0, n - 1)][1]


def _signature(mats: Sequence[Any]) -> tuple[tuple[int, ...], tuple[bool, ...], tuple[bool, ...]]:
    dims = (mats[0].shape[0], *(m.shape[1] for m in mats))
    grad_on = torch.is_grad_enabled()
    grads = tuple(grad_on and bool(m.requires_grad) for m in mats)
    return tuple(int(d) for d in dims), grads, tuple(not isinstance(m, Tensor) for m in mats)


def chain_cost(mats: Sequence[Any]) -> float:
    """Multiply-adds (forward + backward) of the order :func:`chain_product` uses."""
    dims, grads, implicit = _signature(mats)

    def run(p: Any) -> tuple[float, int, int, bool, bool]:
        if isinstance(p, int):
            return 0, dims[p], dims[p + 1], grads[p], implicit[p]
        cl, a, b, gl, il = run(p[0])
        cr, _, c, gr, ir = run(p[1])
        weight = 3 if il or ir else 1 + gl + gr
        return cl + cr + a * b * c * weight, a, c, gl or gr, False

    return run(_chain_plan(dims, grads, implicit))[0]


def chain_plan(mats: Sequence[Any]) -> Any:
    """The parenthesisation :func:`chain_product` uses (nested pairs of indices)."""
    return _chain_plan(*_signature(mats))


def chain_product(mats: Sequence[Tensor | ImplicitFactor], bias: Tensor | None = None) -> Tensor:
    """``mats[0] @ mats[1] @ ... (+ bias)`` in the cheapest order (module docstring); the
    bias is fused into the last product where that product allows it."""

    def run(p: Any, b_top: Tensor | None = None) -> Any:
        if isinstance(p, int):
            return mats[p]
        a, b = run(p[0]), run(p[1])
        if not isinstance(a, Tensor):
            out = a.left(b)
            return out if b_top is None else out + b_top
        if not isinstance(b, Tensor):
            return b.right(a, b_top)
        return a @ b if b_top is None else torch.addmm(b_top, a, b)

    out = run(chain_plan(mats), bias)
    assert isinstance(out, Tensor)
    return out
