"""Torch sandwich layers and LBDN: orthogonality, 1-Lipschitz, gamma bound, export, caching."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from models.empirical import empirical_lipschitz
from models.lbdn import LBDN
from models.sandwich import SandwichLinear, SandwichOutput, activation_spec, cayley
from sdp.bounds.sandwich import sandwich_bound
from sdp.sandwich.dense import sandwich_forward

torch.set_num_threads(1)
F64 = torch.float64


@pytest.mark.parametrize(("p", "q"), [(3, 5), (8, 8), (12, 4)])
@pytest.mark.parametrize("normalize", [True, False])
def test_cayley_pair_is_row_orthonormal(p, q, normalize):
    torch.manual_seed(0)
    layer = SandwichLinear(p, q, normalize=normalize, dtype=F64)
    a_t, b_t = cayley(layer.XY, layer.alpha)
    a, b = a_t.T, b_t.T
    torch.testing.assert_close(a @ a.T + b @ b.T, torch.eye(q, dtype=F64), atol=1e-12, rtol=0)


@pytest.mark.parametrize(
    "act", [nn.ReLU(), nn.Tanh(), nn.Sigmoid(), nn.LeakyReLU(0.2), nn.ELU(0.5), nn.Identity()]
)
def test_each_sandwich_layer_is_one_lipschitz(act):
    torch.manual_seed(1)
    layer = SandwichLinear(4, 6, activation=act, dtype=F64)
    with torch.no_grad():
        layer.d.normal_(0, 1.0)  # a non-trivial Psi
        layer.bias.normal_(0, 1.0)
    low = empirical_lipschitz(layer, 4, starts=16, steps=120, seed=1)
    assert 0.05 < low <= 1.0 + 1e-9  # sigmoid layers are ~1/4-Lipschitz


def test_output_layer_is_a_contraction():
    layer = SandwichOutput(7, 3, dtype=F64)
    assert torch.linalg.matrix_norm(layer.weights(), ord=2) <= 1 + 1e-12


def test_activations_outside_zero_one_are_refused():
    for act in (nn.GELU(), nn.SiLU(), nn.LeakyReLU(-0.5), nn.ELU(2.0)):
        with pytest.raises(ValueError):
            activation_spec(act)


@given(
    widths=st.lists(st.integers(2, 8), min_size=1, max_size=3),
    gamma=st.floats(0.1, 10.0),
    in_dim=st.integers(1, 5),
    seed=st.integers(0, 10_000),
)
@settings(max_examples=10, deadline=None)
def test_lbdn_never_exceeds_gamma(widths, gamma, in_dim, seed):
    torch.manual_seed(seed)
    net = LBDN(in_dim, widths, 2, gamma=gamma, dtype=F64)
    with torch.no_grad():
        for layer in net.hidden:
            layer.d.normal_(0, 0.5)
    low = empirical_lipschitz(net, in_dim, starts=8, steps=60, seed=seed)
    assert low <= gamma * (1 + 1e-9)
    assert sandwich_bound(net.to_network()).value <= gamma * (1 + 1e-6)


@pytest.mark.parametrize("act", [nn.ReLU, nn.Tanh])
def test_export_equals_the_torch_model_in_float64(act):
    torch.manual_seed(2)
    net = LBDN(10, [9, 7], 4, gamma=2.5, activation=act, dtype=F64)
    with torch.no_grad():
        for layer in net.hidden:
            layer.d.normal_(0, 0.7)
    ir = net.to_network()
    x = torch.randn(16, 10, dtype=F64)
    for mode in (True, False):
        net.train(mode)
        with torch.no_grad():
            y = net(x).numpy()
        np.testing.assert_allclose(ir.forward(x.numpy()), y, rtol=0, atol=1e-10)
    np.testing.assert_allclose(sandwich_forward(ir.sandwich, x.numpy()), y, rtol=0, atol=1e-10)


def test_float32_model_exports_its_exact_parameters():
    torch.manual_seed(3)
    net = LBDN(6, [5], 3, gamma=2.0)
    params = net.sandwich_params()
    assert params.hidden[0].xy.dtype == np.float64
    np.testing.assert_array_equal(params.hidden[0].xy, net.hidden[0].XY.detach().double().numpy())


def test_eval_cache_is_reused_and_invalidated():
    torch.manual_seed(4)
    net = LBDN(5, [6, 6], 3, gamma=1.5)
    x = torch.randn(4, 5)
    net.eval()
    y0 = net(x)
    first = net.weights()
    assert net.weights() is first and net.cache_valid  # cached
    # train() drops the cache; eval rebuilds it
    net.train()
    assert not net.cache_valid
    net.eval()
    net(x)
    assert net.weights() is not first
    # load_state_dict with other weights invalidates it and changes the output
    other = LBDN(5, [6, 6], 3, gamma=1.5)
    cached = net.weights()
    net.load_state_dict(other.state_dict())
    assert not net.cache_valid
    other.eval()
    torch.testing.assert_close(net(x), other(x))
    assert net.weights() is not cached
    assert not torch.allclose(net(x), y0)
    # an in-place parameter update (optimiser step) is seen through the version counter
    before = net(x).detach().clone()
    with torch.no_grad():
        net.hidden[0].XY.mul_(1.5)
    assert not torch.allclose(net(x), before)


def test_layer_cache_follows_load_state_dict():
    torch.manual_seed(5)
    a, b = SandwichLinear(3, 4), SandwichLinear(3, 4)
    a.eval()
    b.eval()
    x = torch.randn(2, 3)
    a(x)
    assert a.cache_valid
    a.load_state_dict(b.state_dict())
    assert not a.cache_valid
    torch.testing.assert_close(a(x), b(x))


def test_training_mode_gradients_reach_every_parameter():
    torch.manual_seed(6)
    net = LBDN(4, [5], 3, gamma=1.0, learn_gamma=True)
    net.train()
    net(torch.randn(8, 4)).square().sum().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_runtime_runs_the_exported_network_like_the_lbdn():
    from models.runtime import TorchNetwork

    torch.manual_seed(7)
    net = LBDN(8, [6, 6], 3, gamma=2.0, dtype=F64).eval()
    runner = TorchNetwork.from_network(net.to_network(), dtype=F64, device="cpu")
    x = torch.randn(5, 8, dtype=F64)
    with torch.no_grad():
        torch.testing.assert_close(runner(x), net(x), rtol=0, atol=1e-10)


def test_repeated_eval_keeps_the_cache():
    net = LBDN(4, [5], 2).eval()
    net(torch.randn(2, 4))
    first = net.weights()
    net.eval()
    assert net.cache_valid and net.weights() is first


def test_a_trained_steep_fit_gets_close_to_gamma_but_not_above():
    """Fitting a slope-50 step with gamma = 1.5 drives the true constant towards gamma."""
    torch.manual_seed(8)
    net = LBDN(1, [16, 16], 1, gamma=1.5, dtype=F64)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(200):
        xb = 2 * torch.rand(128, 1, dtype=F64) - 1
        loss = torch.nn.functional.mse_loss(net(xb), torch.tanh(xb / 0.02))
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    xs = torch.linspace(-1, 1, 4001, dtype=F64)[:, None]
    with torch.no_grad():
        f = net(xs)
    slope = float(((f[1:] - f[:-1]).abs() / (xs[1:] - xs[:-1])).max())
    assert 0.9 * 1.5 < slope <= 1.5 * (1 + 1e-9)
    assert empirical_lipschitz(net, 1, starts=16, steps=100, scale=0.3) <= 1.5 * (1 + 1e-9)


def test_lbdn_accepts_an_activation_instance():
    net = LBDN(3, [4, 4], 2, activation=nn.LeakyReLU(0.1))
    acts = [layer.activation for layer in net.hidden]
    assert acts[0] is not acts[1] and all(a.negative_slope == 0.1 for a in acts)
    assert net.to_network().sandwich.hidden[0].activation.name == "leaky_relu"
