"""Benchmark baselines behave as their names say."""

from __future__ import annotations

import torch

from models.baselines import OrthogonalLinear, orthogonal_mlp, plain_mlp, spectral_mlp
from models.empirical import empirical_lipschitz

torch.set_num_threads(1)


def test_orthogonal_linear_is_a_block_of_an_orthogonal_matrix():
    torch.manual_seed(0)
    for p, q in [(5, 5), (3, 7), (9, 4)]:
        layer = OrthogonalLinear(p, q)
        w = layer.weights().T  # (q, p)
        sv = torch.linalg.svdvals(w.double())
        assert sv.max() <= 1 + 1e-5
        assert torch.allclose(sv, torch.ones_like(sv), atol=1e-4)  # semi-orthogonal


def test_orthogonal_mlp_is_one_lipschitz_and_plain_is_not_constrained():
    torch.manual_seed(1)
    net = orthogonal_mlp(4, [8, 8], 3).double()
    assert empirical_lipschitz(net, 4, starts=8, steps=60) <= 1 + 1e-9
    big = plain_mlp(4, [8], 3).double()
    with torch.no_grad():
        for p in big.parameters():
            p.mul_(10)
    assert empirical_lipschitz(big, 4, starts=8, steps=60) > 1


def test_spectral_mlp_layers_have_unit_norm_after_power_iterations():
    torch.manual_seed(2)
    net = spectral_mlp(6, [10], 3)
    net.train()
    for _ in range(30):
        net(torch.randn(4, 6))
    net.eval()
    for m in net:
        if isinstance(m, torch.nn.Linear):
            assert abs(float(torch.linalg.matrix_norm(m.weight.detach(), ord=2)) - 1) < 1e-2
