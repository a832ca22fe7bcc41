"""The fast training path: Q builder, block inverse, cheapest-order chains, and LBDN/layer gradients
equal to the plain (reference) formulas in float64."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from models.cayley_inverse import (
    LEAF,
    CayleyOutFactor,
    InverseFactor,
    apply_inverse,
    block_inverse,
    cayley_inverse,
    cayley_matrix,
)
from models.lbdn import LBDN
from models.matrix_chain import _chain_plan, chain_cost, chain_product
from models.sandwich import SandwichLinear

torch.set_num_threads(1)
F64 = torch.float64


def _cayley_matrix(q: int, p: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    """I + c(X - X^T) + c^2 Y^T Y: symmetric part >= I."""
    g = torch.Generator().manual_seed(seed)
    x = scale * torch.randn(q, q, generator=g, dtype=F64)
    y = scale * torch.randn(p, q, generator=g, dtype=F64)
    return torch.eye(q, dtype=F64) + x - x.T + y.T @ y


@pytest.mark.parametrize(("q", "p"), [(LEAF + 1, 30), (130, 200), (257, 40)])
@pytest.mark.parametrize("scale", [0.05, 1.0, 5.0])
def test_block_inverse_is_the_inverse(q, p, scale):
    q_mat = _cayley_matrix(q, p, seed=q + p, scale=scale)
    m = block_inverse(q_mat)
    eye = torch.eye(q, dtype=F64)
    assert float((m @ q_mat - eye).abs().max()) < 1e-11
    torch.testing.assert_close(m, torch.linalg.inv(q_mat), atol=1e-12, rtol=1e-10)


def test_cayley_inverse_gradient_matches_autograd():
    q_mat = _cayley_matrix(90, 50, seed=3).requires_grad_()
    r = torch.randn(90, 90, dtype=F64)
    (g_fast,) = torch.autograd.grad((cayley_inverse(q_mat) * r).sum(), q_mat)
    (g_ref,) = torch.autograd.grad((torch.linalg.inv(q_mat) * r).sum(), q_mat)
    torch.testing.assert_close(g_fast, g_ref, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("normalize", [True, False])
def test_cayley_matrix_values_and_gradients_match_plain_autograd(normalize):
    """The one-node Q builder against the textbook formulas differentiated by autograd."""
    q, p = 30, 45
    g = torch.Generator().manual_seed(4)
    xy = torch.randn(q + p, q, generator=g, dtype=F64, requires_grad=True)
    alpha = torch.tensor([2.5], dtype=F64, requires_grad=True) if normalize else None
    wy, wq = torch.randn(p, q, dtype=F64), torch.randn(q, q, dtype=F64)
    wc = 0.7

    def loss(y, q_mat, c):
        return (y * wy).sum() + (q_mat * wq).sum() + wc * c

    y, q_mat, c = cayley_matrix(xy, alpha)
    c_ref = alpha[0] / torch.linalg.matrix_norm(xy) if normalize else torch.ones((), dtype=F64)
    x_ref, y_ref = xy[:q], xy[q:]
    q_ref = torch.eye(q, dtype=F64) + c_ref * (x_ref - x_ref.T) + c_ref**2 * (y_ref.T @ y_ref)
    torch.testing.assert_close(q_mat, q_ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(y, y_ref, atol=0, rtol=0)
    inputs = [xy, alpha] if normalize else [xy]
    got = torch.autograd.grad(loss(y, q_mat, c), inputs)
    ref = torch.autograd.grad(loss(y_ref, q_ref, c_ref), inputs, allow_unused=True)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-10)


def _brute_force_cost(dims, grads, implicit):
    """Minimum over all full parenthesisations (exhaustive), same cost rule as _chain_plan."""

    def best(i, j):
        if i == j:
            return 0, grads[i], implicit[i]
        out = float("inf")
        for k in range(i, j):
            cl, gl, il = best(i, k)
            cr, gr, ir = best(k + 1, j)
            if il and ir:
                continue
            weight = 3 if il or ir else 1 + gl + gr
            out = min(out, cl + cr + dims[i] * dims[k + 1] * dims[j + 1] * weight)
        return out, any(grads[i : j + 1]), False

    return best(0, len(grads) - 1)[0]


def test_chain_plan_is_optimal_and_the_product_is_exact():
    for dims in itertools.product([3, 40, 200], repeat=4):
        for implicit in [(False,) * 3, (False, False, True), (False, True, False)]:
            grads = (False, True, True)
            plan_cost = chain_cost(
                [
                    _Fake(dims[i], dims[i + 1], grads[i])
                    if implicit[i]
                    else torch.zeros(dims[i], dims[i + 1], requires_grad=grads[i])
                    for i in range(3)
                ]
            )
            assert plan_cost == _brute_force_cost(dims, grads, implicit)
    # the choices that make LBDN steps cheap: small batch x (784) -> Y (256) -> M never forms
    # B^T = Y M; a large batch does; the 10-logit output layer is always folded
    assert _chain_plan((128, 784, 256, 256), (False, True, True), (False, False, True)) == (
        (0, 1),
        2,
    )
    assert _chain_plan((4096, 784, 256, 256), (False, True, True), (False, False, True)) == (
        0,
        (1, 2),
    )
    plan = _chain_plan((128, 256, 256, 10, 10), (True,) * 4, (False, True, False, True))
    assert "(0, 1)" not in repr(plan)
    mats = [torch.randn(a, b, dtype=F64) for a, b in [(5, 7), (7, 3), (3, 9), (9, 2)]]
    torch.testing.assert_close(
        chain_product(mats), mats[0] @ mats[1] @ mats[2] @ mats[3], atol=1e-12, rtol=1e-12
    )


class _Fake:
    """An implicit factor stand-in (only its shape matters to the plan)."""

    def __init__(self, a: int, b: int, grad: bool) -> None:
        self.shape, self.requires_grad = (a, b), grad


@pytest.mark.parametrize("left", [True, False])
@pytest.mark.parametrize("transpose", [True, False])
def test_implicit_inverse_factors_have_exact_values_and_gradients(left, transpose):
    q_mat = _cayley_matrix(80, 30, seed=9).requires_grad_()
    r = torch.randn(80, 20, dtype=F64) if left else torch.randn(20, 80, dtype=F64)
    r.requires_grad_()
    w = torch.randn(80, 20, dtype=F64) if left else torch.randn(20, 80, dtype=F64)
    m = block_inverse(q_mat.detach())
    u = apply_inverse(r, q_mat, m, left=left, transpose=transpose)
    inv = torch.linalg.inv(q_mat)
    op = inv.mT if transpose else inv
    ref = op @ r if left else r @ op
    torch.testing.assert_close(u, ref, atol=1e-12, rtol=1e-12)
    g = torch.autograd.grad((u * w).sum(), (r, q_mat))
    g_ref = torch.autograd.grad((ref * w).sum(), (r, q_mat))
    for a, b in zip(g, g_ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
    # the hidden layer's output factor sqrt2 Psi (2 M^T - I), applied from either side
    psi = torch.rand(80, dtype=F64) + 0.5
    dense = math.sqrt(2) * psi[:, None] * (2 * inv.mT - torch.eye(80, dtype=F64))
    fac = CayleyOutFactor(InverseFactor(q_mat, torch.ones(80, dtype=F64)), psi)
    rr = r.detach()
    got = fac.left(rr) if left else fac.right(rr)
    torch.testing.assert_close(got, dense @ rr if left else rr @ dense, atol=1e-12, rtol=1e-12)


def _reference_loss(net: LBDN, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy through the plain weights W_k (LBDN._compute, autograd on): the formula
    the export uses, evaluated without the training path's reordering."""
    plain = net._compute()
    h = x
    for (w, b), layer in zip(plain[:-1], net.hidden, strict=True):
        h = layer.activation(h @ w + b)
    w, b = plain[-1]
    return nn.functional.cross_entropy(h @ w + b, target)


@pytest.mark.parametrize("batch", [1, 40, 400])
@pytest.mark.parametrize("widths", [[], [70], [80, 66]])
def test_lbdn_training_path_equals_the_plain_network_with_gradients(batch, widths):
    torch.manual_seed(batch + len(widths))
    net = LBDN(100, widths, 6, gamma=1.7, learn_gamma=True, dtype=F64)
    with torch.no_grad():
        for layer in net.hidden:
            layer.d.normal_(0, 0.5)
    x = torch.randn(batch, 100, dtype=F64)
    target = torch.randint(0, 6, (batch,))
    net.train()
    loss = nn.functional.cross_entropy(net(x), target)
    grads = torch.autograd.grad(loss, list(net.parameters()))
    ref = _reference_loss(net, x, target)
    ref_grads = torch.autograd.grad(ref, list(net.parameters()))
    torch.testing.assert_close(loss, ref, atol=1e-12, rtol=1e-12)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, atol=1e-11, rtol=1e-9)
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            nn.functional.cross_entropy(net(x), target), loss.detach(), atol=1e-12, rtol=1e-12
        )


@pytest.mark.parametrize(("normalize", "bias"), [(True, True), (False, True), (True, False)])
def test_layer_training_path_equals_its_cached_weights(normalize, bias):
    torch.manual_seed(5)
    layer = SandwichLinear(90, 70, bias=bias, normalize=normalize, dtype=F64)
    with torch.no_grad():
        layer.d.normal_(0, 0.5)
    for batch in (3, 300):
        x = torch.randn(batch, 90, dtype=F64)
        layer.train()
        out = layer(x)
        (g,) = torch.autograd.grad(out.square().sum(), layer.XY)
        w_in, w_out = layer._compute()  # autograd through the plain weights
        pre = x @ w_in if layer.bias is None else x @ w_in + layer.bias
        ref = layer.activation(pre) @ w_out
        (g_ref,) = torch.autograd.grad(ref.square().sum(), layer.XY)
        torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(g, g_ref, atol=1e-10, rtol=1e-9)
