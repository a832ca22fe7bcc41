"""Empirical lower bounds on the l2 Lipschitz constant of a torch model (gradient ascent).

For any pair (x, x'), ||f(x) - f(x')|| / ||x - x'|| <= Lip(f), and so is ||J_f(x)||_2 wherever
f is differentiable. We maximise the pair ratio by Adam over a batch of random starting pairs
and report the best ratio, also evaluating the Jacobian spectral norm at the final points.
Every number returned is attained by an actual input, hence a valid lower bound.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def pair_ratio(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """||f(x) - f(y)|| / ||x - y|| per row."""
    num = (model(x) - model(y)).flatten(1).norm(dim=1)
    return num / (x - y).flatten(1).norm(dim=1).clamp_min(1e-30)


def jacobian_norms(model: nn.Module, x: Tensor) -> Tensor:
    """||J_f(x_i)||_2 for each row x_i (exact Jacobian by autograd)."""
    out = []
    for xi in x:
        jac = torch.autograd.functional.jacobian(lambda v: model(v[None])[0], xi)
        out.append(torch.linalg.matrix_norm(jac.reshape(jac.shape[0], -1), ord=2))
    return torch.stack(out)


def empirical_lipschitz(
    model: nn.Module,
    in_dim: int,
    *,
    starts: int = 32,
    steps: int = 200,
    lr: float = 0.05,
    scale: float = 1.0,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    jacobian: bool = True,
) -> float:
    """Best lower bound found by gradient ascent on the pair ratio (model in eval mode).

    ``scale`` sets the spread of the random starting points (normal, std ``scale``).
    """
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    x = (scale * torch.randn(starts, in_dim, generator=gen, dtype=dtype)).requires_grad_()
    d = (scale * 0.1 * torch.randn(starts, in_dim, generator=gen, dtype=dtype)).requires_grad_()
    opt = torch.optim.Adam([x, d], lr=lr * scale)
    best = 0.0
    for _ in range(steps):
        r = pair_ratio(model, x, x + d)
        best = max(best, float(r.detach().max()))
        opt.zero_grad()
        (-r.sum()).backward()
        opt.step()
    with torch.no_grad():
        best = max(best, float(pair_ratio(model, x, x + d).max()))
    if jacobian:
        best = max(best, float(jacobian_norms(model, x.detach()).max()))
    model.train(was_training)
    return best
