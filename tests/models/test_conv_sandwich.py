"""SandwichConv2d / ConvLBDN in torch: Lipschitz guarantees, export, files, `lipcert train`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from models.conv import SandwichConv2d
from models.conv_lbdn import ConvLBDN, conv_lbdn_to_bytes, load_conv_lbdn
from models.empirical import empirical_lipschitz
from models.io import load_network
from models.train import TrainConfig, train_classifier
from sdp.bounds.sandwich import sandwich_bound
from sdp.importers import load_model
from sdp.sandwich.conv import conv_forward
from sdp.sandwich.conv import frequency_cayley as numpy_cayley
from service.cli import app

torch.set_num_threads(1)
F64 = torch.float64


class _Flat(nn.Module):
    """Runs an image layer on flat inputs (for the empirical Lipschitz search)."""

    def __init__(self, layer: SandwichConv2d) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x.reshape(len(x), *self.layer.in_shape)).reshape(len(x), -1)


def _randomise(module: nn.Module, seed: int, d_std: float = 0.5) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith(".d") or name == "d":
                p.copy_(d_std * torch.randn(p.shape, generator=gen, dtype=p.dtype))
            if name.endswith("bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def test_torch_and_numpy_cayley_agree():
    torch.manual_seed(0)
    layer = SandwichConv2d(2, 3, 6, stride=2, dtype=F64)
    a_t, b_t = layer._compute()
    a_n, b_n = numpy_cayley(layer.XY.detach().numpy(), float(layer.alpha.item()), 3)
    np.testing.assert_allclose(a_t.detach().numpy(), a_n, atol=1e-13)
    np.testing.assert_allclose(b_t.detach().numpy(), b_n, atol=1e-13)
    gram = a_t.mH @ a_t + b_t.mH @ b_t
    torch.testing.assert_close(gram, torch.eye(3, dtype=gram.dtype).expand_as(gram))


@pytest.mark.parametrize(
    ("c_in", "c_out", "stride", "act"),
    [(1, 3, 1, nn.ReLU), (2, 2, 2, nn.Tanh), (3, 2, 1, nn.Sigmoid)],
)
def test_conv_sandwich_layer_is_one_lipschitz(c_in, c_out, stride, act):
    torch.manual_seed(1)
    layer = SandwichConv2d(c_in, c_out, 6, stride=stride, activation=act(), dtype=F64)
    _randomise(layer, 2)
    emp = empirical_lipschitz(_Flat(layer), c_in * 36, starts=8, steps=60, lr=0.1)
    assert 0.05 < emp <= 1 + 1e-6


def test_gradients_reach_the_kernel():
    torch.manual_seed(3)
    layer = SandwichConv2d(1, 2, 6, dtype=F64)
    layer(torch.randn(4, 1, 6, 6, dtype=F64)).square().sum().backward()
    assert layer.XY.grad is not None and layer.XY.grad.abs().sum() > 0
    assert layer.alpha.grad is not None and layer.d.grad is not None


def _model(seed: int = 4, gamma: float = 2.0) -> ConvLBDN:
    torch.manual_seed(seed)
    m = ConvLBDN((1, 8, 8), [2, 3], 4, gamma, strides=[1, 2], dtype=F64)
    _randomise(m, seed)
    return m


def test_conv_lbdn_never_exceeds_gamma_and_check_verifies():
    model = _model()
    emp = empirical_lipschitz(model, 64, starts=8, steps=60, lr=0.1)
    res = sandwich_bound(model.to_network())
    assert res.certificate.meta["closed_form_confirmed"]
    assert emp <= res.value <= 2.0 * (1 + 1e-6)
    assert emp > 0.05


@pytest.mark.parametrize("train_mode", [True, False])
def test_forward_equals_exported_plain_network(train_mode):
    model = _model(5)
    model.train(train_mode)
    x = torch.randn(6, 64, dtype=F64)
    net = model.to_network()
    with torch.no_grad():
        y = model(x).numpy()
    np.testing.assert_allclose(net.forward(x.numpy()), y, atol=1e-10, rtol=0)
    np.testing.assert_allclose(conv_forward(net.sandwich, x.numpy()), y, atol=1e-10, rtol=0)


def test_safetensors_round_trip_and_lowered_claim(tmp_path):
    model = _model(6)
    data = conv_lbdn_to_bytes(model)
    net = load_model(data)  # the generic importer (content sniffing, limits)
    x = np.random.default_rng(0).standard_normal((5, 64))
    with torch.no_grad():
        y = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(net.forward(x), y, atol=1e-10, rtol=0)
    assert net.content_hash() == model.to_network().content_hash()
    res = sandwich_bound(net)
    assert res.certificate.meta["closed_form_confirmed"] and res.value <= 2 * (1 + 1e-6)
    (tmp_path / "m.safetensors").write_bytes(data)
    assert load_network(tmp_path / "m.safetensors").content_hash() == net.content_hash()
    back = load_conv_lbdn(tmp_path / "m.safetensors", dtype=F64).eval()
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    with torch.no_grad():
        np.testing.assert_allclose(back(torch.from_numpy(x)).numpy(), y, atol=1e-12, rtol=0)
    # a file that claims less than its parameters give is not confirmed
    low = load_model(conv_lbdn_to_bytes(model, claimed_gamma=0.5 * res.value))
    res_low = sandwich_bound(low)
    assert not res_low.certificate.meta["closed_form_confirmed"]
    assert res_low.value == pytest.approx(res.value, rel=1e-12)


def test_32x32_rgb_model_exports_and_certifies():
    torch.manual_seed(8)
    model = ConvLBDN((3, 32, 32), [4, 4], 10, 1.0, strides=[2, 2], dtype=F64)
    _randomise(model, 8)
    net = model.to_network()
    x = torch.rand(3, 3 * 32 * 32, dtype=F64)
    with torch.no_grad():
        np.testing.assert_allclose(net.forward(x.numpy()), model(x).numpy(), atol=1e-10, rtol=0)
    res = sandwich_bound(net)
    assert res.certificate.meta["closed_form_confirmed"] and res.value <= 1 + 1e-6


def test_float32_model_trains_and_stays_certified():
    torch.manual_seed(7)
    model = ConvLBDN((1, 8, 8), [2], 3, 1.5)
    x = torch.rand(64, 64)
    y = (x[:, :32].sum(1) > x[:, 32:].sum(1)).long()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_classifier(model, x, y, 1.5, TrainConfig(epochs=2, batch_size=16, lr=1e-2, eps=0.1))
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    res = sandwich_bound(load_model(conv_lbdn_to_bytes(model)))
    assert res.certificate.meta["closed_form_confirmed"] and res.value <= 1.5 * (1 + 1e-6)


def test_cli_trains_conv_lbdn_and_bound_verifies(fixtures_dir, tmp_path):
    out = tmp_path / "conv.safetensors"
    args = ["train", "--data", str(fixtures_dir / "mnist"), "--split", "t10k"]
    args += ["--arch", "lbdn-conv"]
    args += ["--widths", "2,4", "--strides", "2,2", "--limit", "300", "--epochs", "1"]
    args += ["--gamma", "2", "--out", str(out), "--threads", "1", "--json"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["closed_form_confirmed"] and summary["lipschitz_bound"] <= 2 * (1 + 1e-6)
    bound = CliRunner().invoke(app, ["bound", str(out), "--method", "sandwich", "--json", "-q"])
    assert bound.exit_code == 0, bound.output
    result = json.loads(bound.stdout.strip().splitlines()[-1])
    assert result["method"] == "sandwich" and result["verified"]
    assert result["lipschitz_bound"] <= 2 * (1 + 1e-6)
    assert "closed form confirmed" in " ".join(result["notes"])
    bad = CliRunner().invoke(app, [*args[:-1], "--strides", "3,1"])
    assert bad.exit_code == 2
