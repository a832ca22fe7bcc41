"""Inverse of the Cayley matrix Q = I + Z and cheapest-order matrix chains (training speed).

``cayley_inverse(Q)`` returns M = Q^{-1} for Q whose symmetric part is >= I, which holds for
Q = I + c (X - X^T) + c^2 Y^T Y (design.md §3.4). It uses 2 x 2 block elimination **without
pivoting**, so almost all of the work is matrix products (fast BLAS gemm) instead of LAPACK's
LU + triangular solves, which on one CPU thread run several times slower per flop at the sizes
of sandwich layers (q = 64..512). No pivoting is stable here: for Q = [[Q11, Q12], [Q21, Q22]]
with v^T Q v >= |v|^2 for all v,

* Q11 inherits v^T Q11 v >= |v|^2, so ||Q11^{-1}||_2 <= 1;
* the Schur complement S = Q22 - Q21 Q11^{-1} Q12 satisfies v^T S v = w^T Q w >= |w|^2 >= |v|^2
  with w = (-Q11^{-1} Q12 v, v) (since Q w = (0, S v)), so ||S^{-1}||_2 <= 1 too,

and the recursion only ever inverts blocks with the same property. The backward pass is the
closed form dL/dQ = -M^T (dL/dM) M^T (two products; nothing of the forward is differentiated).

``cayley_matrix(XY, alpha)`` builds (Y, Q, c) in one autograd node with few temporaries: the
gradient of Y^T Y is one product Y (G + G^T) (autograd's matmul backward would take two), and
||XY||_F^2 = ||X||_F^2 + trace(Y^T Y) needs no pass over Y.

Training never differentiates through M itself: :class:`InverseFactor` and
:class:`CayleyOutFactor` apply M (or M^T) to a matrix R, U = R M, with the solve-style backward
dL/dR = (dL/dU) M^T, dL/dQ = -U^T dL/dR: two products of R's size, no O(q^3) work, since U is
kept from the forward. They are the implicit factors of :func:`models.matrix_chain.chain_product`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

_SQRT2 = math.sqrt(2.0)
LEAF = 64
"""Blocks of at most this size are inverted by LAPACK (torch.linalg.inv)."""


def block_inverse(q: Tensor, leaf: int = LEAF, out: Tensor | None = None) -> Tensor:
    """Q^{-1} by recursive 2 x 2 block elimination, no pivoting (module docstring), no autograd.

    With T = Q21 Q11^{-1}, S = Q22 - T Q12, U = Q11^{-1} Q12::

        Q^{-1} = [[Q11^{-1} + U S^{-1} T, -U S^{-1}], [-S^{-1} T, S^{-1}]]

    The blocks are written straight into ``out`` (a new matrix by default; few temporaries).
    """
    n = q.shape[-1]
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if n <= leaf:
        return out.copy_(torch.linalg.inv(q))
    k = n // 2
    q11, q12, q21, q22 = q[:k, :k], q[:k, k:], q[k:, :k], q[k:, k:]
    m11, m12, m21, m22 = out[:k, :k], out[:k, k:], out[k:, :k], out[k:, k:]
    block_inverse(q11, leaf, m11)  # Q11^{-1}, updated to M11 at the end
    t = q21 @ m11
    block_inverse(torch.addmm(q22, t, q12, alpha=-1.0), leaf, m22)  # S^{-1}
    torch.mm((m11 @ q12).neg_(), m22, out=m12)  # -U S^{-1}
    torch.mm(m22, t.neg_(), out=m21)  # -S^{-1} T
    m11.addmm_(m12, t)  # Q11^{-1} + U S^{-1} T
    return out


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


class _CayleyMatrix(torch.autograd.Function):
    """(Y, Q, c): Q = I + c (X - X^T) + c^2 Y^T Y from XY = [X; Y], c = alpha / ||XY||_F (or 1).

    Y (a view of XY) is an output too, so that its gradient from the layer's products lands in
    the same buffer as the rest (no zero-filled slice gradient).

    One pass with few temporaries; backward with dS = dQ - dQ^T, dG = dQ + dQ^T,
    dc = <dS, X> + 2c <dQ, Y^T Y> (+ the incoming dc), k = dc c / ||XY||_F^2::

        dX = c dS - k X,   dY = Y (c^2 dG - k I),   d alpha = dc c / alpha
    """

    @staticmethod
    def forward(ctx: Any, xy: Tensor, alpha: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        q = xy.shape[1]
        x, y = xy[:q], xy[q:]
        yty = y.mT @ y
        z = x - x.mT
        if alpha is None:
            c = torch.ones((), dtype=xy.dtype, device=xy.device)
            nrm2 = c
            z.add_(yty)
        else:
            nrm2 = torch.linalg.vector_norm(x).square() + torch.trace(yty)
            c = alpha[0] * torch.rsqrt(nrm2)
            z.mul_(c).addcmul_(yty, c * c)
        z.diagonal().add_(1.0)
        ctx.save_for_backward(xy, yty, c, nrm2, alpha)
        ctx.normalized = alpha is not None
        return y, z, c

    @staticmethod
    def backward(
        ctx: Any, gy: Tensor | None, gz: Tensor, gc: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        xy, yty, c, nrm2, alpha = ctx.saved_tensors
        q = xy.shape[1]
        x, y = xy[:q], xy[q:]
        gxy = torch.empty_like(xy, memory_format=torch.contiguous_format)
        gs = gz - gz.mT
        gg = gz + gz.mT
        if not ctx.normalized:
            gxy[:q].copy_(gs)
            _y_grad(y, gg, gy, gxy[q:])
            return gxy, None
        gc_all = torch.dot(gs.reshape(-1), x.reshape(-1)) + 2.0 * c * torch.dot(
            gz.reshape(-1), yty.reshape(-1)
        )
        if gc is not None:
            gc_all = gc_all + gc
        k = gc_all * c / nrm2
        torch.mul(gs, c, out=gxy[:q]).addcmul_(x, -k)
        gg.mul_(c * c).diagonal().sub_(k)
        _y_grad(y, gg, gy, gxy[q:])
        return gxy, (gc_all * c / alpha[0]).reshape(1)


def _y_grad(y: Tensor, h: Tensor, gy: Tensor | None, out: Tensor) -> None:
    """out = Y H (+ gy, the gradient Y got from its other uses)."""
    if gy is None:
        torch.mm(y, h, out=out)
    else:
        torch.addmm(gy, y, h, out=out)


def cayley_matrix(xy: Tensor, alpha: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """(Y, Q = I + Z, c) of the sandwich parameter [X; Y] (see _CayleyMatrix), differentiable."""
    y, z, c = _CayleyMatrix.apply(xy, alpha)
    return y, z, c


class _ApplyInverse(torch.autograd.Function):
    """U = op(M) R (left) or R op(M) (right), op = identity or transpose, M = Q^{-1} given.

    Backward (X = U, the solve rules): dR = op(M)^T dU (left) or dU op(M)^T (right);
    dQ = -dR U^T (left) or -U^T dR (right), transposed when op is the transpose.
    """

    @staticmethod
    def forward(ctx: Any, r: Tensor, q: Tensor, m: Tensor, left: bool, transpose: bool) -> Tensor:
        op = m.mT if transpose else m
        u = op @ r if left else r @ op
        ctx.save_for_backward(u, m)
        ctx.flags = (left, transpose)
        return u

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None, None, None]:
        u, m = ctx.saved_tensors
        left, transpose = ctx.flags
        op_t = m if transpose else m.mT
        gr = op_t @ grad if left else grad @ op_t
        gq = gr @ u.mT if left else u.mT @ gr
        return gr, -(gq.mT if transpose else gq), None, None, None


def apply_inverse(r: Tensor, q: Tensor, m: Tensor, *, left: bool, transpose: bool) -> Tensor:
    """op(Q)^{-1} R (left) or R op(Q)^{-1} (right) with ``m`` = Q^{-1} (see _ApplyInverse)."""
    result: Tensor = _ApplyInverse.apply(r, q, m, left, transpose)
    return result


class InverseFactor:
    """The implicit q x q factor F = M diag(scale), M = Q^{-1} (scale: (q,) or scalar tensor)."""

    def __init__(self, q: Tensor, scale: Tensor) -> None:
        self.q, self.m, self.scale = q, block_inverse(q.detach()), scale
        self.shape = (q.shape[0], q.shape[0])
        self.requires_grad = True

    def right(self, r: Tensor, bias: Tensor | None = None) -> Tensor:
        """R F (+ bias, fused)."""
        u = apply_inverse(r, self.q, self.m, left=False, transpose=False)
        return u * self.scale if bias is None else torch.addcmul(bias, u, self.scale)

    def left(self, r: Tensor) -> Tensor:
        """F R."""
        s = self.scale[:, None] if self.scale.ndim == 1 else self.scale
        return apply_inverse(s * r, self.q, self.m, left=True, transpose=False)


class CayleyOutFactor:
    """The implicit factor W_out = sqrt2 Psi (2 M^T - I) of a hidden layer (q x q)."""

    def __init__(self, inverse: InverseFactor, psi: Tensor) -> None:
        self.q, self.m, self.psi = inverse.q, inverse.m, psi
        self.shape = inverse.shape
        self.requires_grad = True

    def right(self, r: Tensor, bias: Tensor | None = None) -> Tensor:
        """R W_out = 2 (R') M^T - R' with R' = sqrt2 R Psi (+ bias)."""
        rp = r * (_SQRT2 * self.psi)
        out = (2.0 * apply_inverse(rp, self.q, self.m, left=False, transpose=True)).sub_(rp)
        return out if bias is None else out.add_(bias)

    def left(self, r: Tensor) -> Tensor:
        """W_out R = sqrt2 Psi (2 M^T R - R)."""
        mr = apply_inverse(r, self.q, self.m, left=True, transpose=True)
        return (_SQRT2 * self.psi)[:, None] * (2.0 * mr - r)
