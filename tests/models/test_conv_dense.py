"""ConvLBDN with dense sandwich layers after the flatten: export, per-layer certificate, files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load as np_load
from safetensors.numpy import save as np_save
from torch import nn

from models.conv_lbdn import ConvLBDN, conv_lbdn_config, conv_lbdn_to_bytes, load_conv_lbdn
from models.empirical import empirical_lipschitz
from models.io import METADATA_KEY
from sdp.bounds.sandwich import sandwich_bound
from sdp.errors import CertificateError, ModelRejected
from sdp.importers import load_model
from sdp.ir import Dense, Network
from sdp.sandwich.config import config_json
from sdp.sandwich.conv import conv_forward

torch.set_num_threads(1)
F64 = torch.float64


def _model(seed: int = 11, gamma: float = 1.5, dense=(12, 7), act=nn.ReLU) -> ConvLBDN:
    torch.manual_seed(seed)
    m = ConvLBDN(
        (1, 8, 8), [2, 3], 4, gamma, strides=[1, 2], dense_widths=dense, activation=act, dtype=F64
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith(".d"):
                p.copy_(0.6 * torch.randn(p.shape, generator=gen, dtype=F64))
            if name.endswith("bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=gen, dtype=F64))
    return m


@pytest.mark.parametrize("train_mode", [True, False])
@pytest.mark.parametrize("act", [nn.ReLU, nn.Tanh])
def test_export_equals_the_model_with_dense_layers(train_mode, act):
    model = _model(act=act).train(train_mode)
    net = model.to_network()
    # conv, act, conv, act, dense, act, dense, act, output
    assert len(net.ops) == 9 and net.ops[4].weight.shape == (12, 48)
    x = torch.randn(5, 64, dtype=F64)
    with torch.no_grad():
        y = model(x).numpy()
    np.testing.assert_allclose(net.forward(x.numpy()), y, atol=1e-10, rtol=0)
    np.testing.assert_allclose(conv_forward(net.sandwich, x.numpy()), y, atol=1e-10, rtol=0)


def test_dense_layers_are_certified_and_the_bound_holds():
    model = _model(gamma=1.5)
    res = sandwich_bound(model.to_network())
    meta = res.certificate.meta
    assert meta["closed_form_confirmed"] and res.value <= 1.5 * (1 + 1e-6)
    assert len(meta["dense_layer_rhos"]) == 2
    assert all(abs(r - 1.0) < 1e-6 for r in meta["dense_layer_rhos"])
    assert meta["dense_verified"] is True  # small net: telescoped T re-verified on the ops
    emp = empirical_lipschitz(model.eval(), 64, starts=8, steps=60, lr=0.1)
    assert 0.05 < emp <= res.value


def test_ops_that_do_not_match_the_dense_parameters_are_refused():
    net = _model().to_network()
    ops = list(net.ops)
    ops[4] = Dense(3.0 * ops[4].weight, ops[4].bias)  # the first dense layer, 3x steeper
    tampered = Network(net.input_shape, tuple(ops), sandwich=net.sandwich)
    with pytest.raises(CertificateError, match="not the ones"):
        sandwich_bound(tampered)


def test_file_round_trip_with_dense_layers(tmp_path):
    model = _model(13)
    data = conv_lbdn_to_bytes(model)
    config = conv_lbdn_config(model)
    assert [s["type"] for s in config["layers"]] == [
        "sandwich_conv",
        "sandwich_conv",
        "sandwich",
        "sandwich",
        "sandwich_output",
    ]
    net = load_model(data)
    assert net.content_hash() == model.to_network().content_hash()
    res = sandwich_bound(net)
    assert res.certificate.meta["closed_form_confirmed"] and res.value <= 1.5 * (1 + 1e-6)
    (tmp_path / "m.safetensors").write_bytes(data)
    back = load_conv_lbdn(tmp_path / "m.safetensors", dtype=F64).eval()
    assert back.dense_widths == [12, 7]
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    x = torch.randn(4, 64, dtype=F64)
    with torch.no_grad():
        torch.testing.assert_close(back(x), model.eval()(x), atol=1e-12, rtol=0)


def _with_config(data: bytes, edit) -> bytes:
    """The same tensors with the lipcert config edited in place by ``edit``."""
    header_len = int.from_bytes(data[:8], "little")
    config = json.loads(json.loads(data[8 : 8 + header_len])["__metadata__"][METADATA_KEY])
    edit(config)
    return np_save(np_load(data), metadata={METADATA_KEY: config_json(config)})


def test_malformed_dense_tails_are_rejected():
    model = _model(14)
    data = conv_lbdn_to_bytes(model)

    def conv_after_dense(cfg):
        cfg["layers"][2], cfg["layers"][1] = cfg["layers"][1], cfg["layers"][2]

    def wrong_in(cfg):
        cfg["layers"][2]["in"] = 47

    def lies_about_gamma(cfg):
        cfg["gamma"] = 0.1

    for edit in (conv_after_dense, wrong_in):
        with pytest.raises(ModelRejected):
            load_model(_with_config(data, edit))
    # metadata gamma is only a claim: the bound comes from the parameters
    res = sandwich_bound(load_model(_with_config(data, lies_about_gamma)))
    assert not res.certificate.meta["closed_form_confirmed"] and res.value > 1.0


def test_cli_trains_a_conv_lbdn_with_dense_layers(fixtures_dir, tmp_path):
    from typer.testing import CliRunner

    from service.cli import app

    out = tmp_path / "conv_dense.safetensors"
    args = ["train", "--data", str(fixtures_dir / "mnist"), "--split", "t10k"]
    args += ["--arch", "lbdn-conv"]
    args += ["--widths", "2", "--strides", "2", "--dense-widths", "16", "--limit", "200"]
    args += ["--epochs", "1", "--gamma", "2", "--out", str(out), "--threads", "1", "--json"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["closed_form_confirmed"] and summary["lipschitz_bound"] <= 2 * (1 + 1e-6)
    assert load_conv_lbdn(out).dense_widths == [16]
    for bad in (["--dense-widths", "0"], ["--dense-widths", "a"]):
        assert CliRunner().invoke(app, [*args, *bad]).exit_code == 2
    dense_arch = ["train", "--data", str(fixtures_dir / "mnist"), "--split", "t10k"]
    dense_arch += ["--dense-widths", "8"]
    assert CliRunner().invoke(app, [*dense_arch, "--out", str(out)]).exit_code == 2
