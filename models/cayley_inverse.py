"""Inverse of the Cayley matrix Q = I + Z and cheapest-order matrix chains (training speed).

``cayley_inverse(Q)`` returns M = Q^{-1} for Q whose symmetric part is >= I, which holds for
Q = I + c (X - X^T) + c^2 Y^T Y (DESIGN §3.4). It uses 2 x 2 block elimination **without
pivoting**, so almost all of the work is matrix products (fast BLAS gemm) instead of LAPACK's
LU + triangular solves, which on one CPU thread run several times slower per flop at the sizes
of sandwich layers (q = 64..512). No pivoting is stable here: for Q = [[Q11, Q12], [Q21, Q22]]
with v^T Q v >= |v|^2 for all v,

* Q11 inherits v^T Q11 v >= |v|^2, so ||Q11^{-1}||_2 <= 1;
* the Schur complement S = Q22 - Q21 Q11^{-1} Q12 satisfies v^T S v = w^T Q w >= |w|^2 >= |v|^2
  with w = (-Q11^{-1} Q12 v, v) (since Q w = (0, S v)), so ||S^{-1}||_2 <= 1 too,

and the recursion only ever inverts blocks with the same property. The backward pass is the
closed form dL/dQ = -M^T (dL/dM) M^T (two products; nothing of the forward is differentiated).

``gram(Y)`` is Y^T Y with a one-product backward (autograd's matmul backward takes two).

``chain_product(mats)`` multiplies ``mats[0] @ mats[1] @ ...`` in the order with the fewest
multiply-adds counting the backward pass too (the classic matrix-chain dynamic programme): a
product costs a b c forward plus a b c for each operand that needs a gradient. This is how an
LBDN step skips forming B^T when the batch is small and folds A_k into the next layer's weights
when it is large, with the same maths either way.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

LEAF = 64
"""Blocks of at most this size are inverted by LAPACK (torch.linalg.inv)."""


def block_inverse(q: Tensor, leaf: int = LEAF) -> Tensor:
    """Q^{-1} by recursive 2 x 2 block elimination, no pivoting (module docstring), no autograd.

    With T = Q21 Q11^{-1}, S = Q22 - T Q12, U = Q11^{-1} Q12::

        Q^{-1} = [[Q11^{-1} + U S^{-1} T, -U S^{-1}], [-S^{-1} T, S^{-1}]]
    """
    n = q.shape[-1]
    if n <= leaf:
        return torch.linalg.inv(q)
    k = n // 2
    q11, q12, q21, q22 = q[:k, :k], q[:k, k:], q[k:, :k], q[k:, k:]
    i11 = block_inverse(q11, leaf)
    t = q21 @ i11
    s_inv = block_inverse(torch.addmm(q22, t, q12, alpha=-1.0), leaf)
    m12 = -((i11 @ q12) @ s_inv)
    m21 = -(s_inv @ t)
    m11 = torch.addmm(i11, m12, t, alpha=-1.0)
    return torch.cat([torch.cat([m11, m12], 1), torch.cat([m21, s_inv], 1)], 0)


class _CayleyInverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q: Tensor) -> Tensor:
        m = block_inverse(q)
        ctx.save_for_backward(m)
        return m

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (m,) = ctx.saved_tensors
        mt = m.mT
        return -(mt @ grad) @ mt


def cayley_inverse(q: Tensor) -> Tensor:
    """M = Q^{-1} for a square Q with symmetric part >= I (differentiable; module docstring).

    Other matrices (and complex or batched ones) go to ``torch.linalg.inv``.
    """
    if q.ndim != 2 or q.is_complex() or q.shape[-1] <= LEAF:
        return torch.linalg.inv(q)
    result: Tensor = _CayleyInverse.apply(q)
    return result


class _Gram(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, y: Tensor) -> Tensor:
        ctx.save_for_backward(y)
        return y.mT @ y

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (y,) = ctx.saved_tensors
        return y @ (grad + grad.mT)


def gram(y: Tensor) -> Tensor:
    """Y^T Y with the one-product backward dL/dY = Y (G + G^T) (autograd would take two)."""
    result: Tensor = _Gram.apply(y)
    return result


# --------------------------------------------------------------------------- matrix chains


@functools.lru_cache(maxsize=256)
def _chain_plan(dims: tuple[int, ...], grads: tuple[bool, ...]) -> Any:
    """Optimal parenthesisation of a chain with shapes dims[i] x dims[i+1]; nested index pairs.

    Cost of one product (a x b)(b x c): a b c times (1 + operands needing a gradient).
    """
    n = len(grads)
    cost: dict[tuple[int, int], tuple[int, Any, bool]] = {
        (i, i): (0, i, grads[i]) for i in range(n)
    }
    for length in range(2, n + 1):
        for i in range(n - length + 1):
            j = i + length - 1
            best: tuple[int, Any, bool] | None = None
            for k in range(i, j):
                cl, pl, gl = cost[(i, k)]
                cr, pr, gr = cost[(k + 1, j)]
                c = cl + cr + dims[i] * dims[k + 1] * dims[j + 1] * (1 + gl + gr)
                if best is None or c < best[0]:
                    best = (c, (pl, pr), gl or gr)
            assert best is not None
            cost[(i, j)] = best
    return cost[(0, n - 1)][1]


def chain_cost(dims: Sequence[int], grads: Sequence[bool]) -> int:
    """Multiply-adds (forward + backward) of the optimal order for the chain (see _chain_plan)."""

    def run(plan: Any) -> tuple[int, int, int, bool]:  # (cost, rows, cols, needs grad)
        if isinstance(plan, int):
            return 0, dims[plan], dims[plan + 1], grads[plan]
        cl, a, b, gl = run(plan[0])
        cr, _, c, gr = run(plan[1])
        return cl + cr + a * b * c * (1 + gl + gr), a, c, gl or gr

    return run(_chain_plan(tuple(dims), tuple(grads)))[0]


def chain_product(mats: Sequence[Tensor]) -> Tensor:
    """``mats[0] @ mats[1] @ ...`` (2-D) in the cheapest order for forward + backward."""
    dims = (mats[0].shape[0], *(m.shape[1] for m in mats))
    grad_on = torch.is_grad_enabled()
    plan = _chain_plan(tuple(dims), tuple(grad_on and m.requires_grad for m in mats))

    def run(p: Any) -> Tensor:
        return mats[p] if isinstance(p, int) else run(p[0]) @ run(p[1])

    return run(plan)
