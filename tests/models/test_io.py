"""LBDN files: save/load round trip, untrusted-file handling, the RobustNeuralNetworks.jl model."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from models.data import load_mnist_idx
from models.io import (
    convert_lbdn_jl,
    lbdn_to_bytes,
    load_lbdn,
    load_network,
    read_safetensors,
    save_lbdn,
)
from models.lbdn import LBDN
from sdp.bounds.sandwich import sandwich_bound
from sdp.certificate import Lmi, certify_multipliers
from sdp.errors import ModelRejected

torch.set_num_threads(1)


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    net = LBDN(12, [8, 6], 3, gamma=1.7, activation=torch.nn.Tanh, input_shape=(3, 4))
    path = tmp_path / "m.safetensors"
    save_lbdn(net, path)
    back = load_lbdn(path)
    x = torch.randn(5, 3, 4)
    net.eval()
    back.eval()
    torch.testing.assert_close(back(x), net(x), rtol=0, atol=0)
    ir = load_network(path)
    assert ir.input_shape == (3, 4) and ir.sandwich.gamma == pytest.approx(1.7)
    np.testing.assert_allclose(ir.forward(x.double().numpy()), net(x).detach().numpy(), atol=1e-5)
    assert sandwich_bound(ir).value <= 1.7 * (1 + 1e-6)


def test_the_importers_read_lbdn_files():
    from sdp.importers import load_model

    torch.manual_seed(1)
    net = LBDN(6, [5], 2, gamma=3.0)
    ir = load_model(lbdn_to_bytes(net))
    assert ir.kind == "sandwich"
    assert sandwich_bound(ir).value <= 3.0 * (1 + 1e-6)


def test_a_file_without_config_is_rejected(tmp_path):
    from safetensors.numpy import save_file

    save_file({"w": np.zeros((2, 2), np.float32)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ModelRejected):
        load_lbdn(tmp_path / "x.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ModelRejected):
        read_safetensors(tmp_path / "junk.safetensors")


@pytest.fixture(scope="module")
def julia_model(fixtures_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("jl") / "lbdn_mnist.safetensors"
    return convert_lbdn_jl(fixtures_dir / "lbdn_jl" / "lbdn_mnist_params.npz", out)


@pytest.fixture(scope="module")
def mnist_test(fixtures_dir):
    return load_mnist_idx(fixtures_dir / "mnist", "t10k")


def test_julia_lbdn_reproduces_its_accuracy(julia_model, mnist_test):
    x, y = mnist_test
    net = load_network(julia_model)
    assert net.input_size == 784 and net.output_size == 10
    logits = net.forward(x.reshape(len(x), -1))
    assert (logits.argmax(1) == y).mean() == pytest.approx(0.9724, abs=1e-4)
    model = load_lbdn(julia_model)
    model.eval()
    with torch.no_grad():
        torch_logits = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(torch_logits, logits, atol=1e-3)


def test_julia_lbdn_closed_form_gives_gamma_five(julia_model):
    _tensors, config = read_safetensors(julia_model)
    assert config["gamma"] == pytest.approx(5.0, rel=1e-6)
    net = load_network(julia_model)
    res = sandwich_bound(net)
    assert res.verified and res.certificate.meta["closed_form_confirmed"]
    assert res.value <= 5.0 * (1 + 1e-6)
    # far below the naive product of norms reported by the fixture's README (about 22.25)
    naive = math.prod(np.linalg.norm(w, 2) for w in net.chain().weights())
    assert naive == pytest.approx(22.25, abs=0.01)


@pytest.mark.slow
def test_lipsdp_on_the_julia_export_is_at_most_five(julia_model):
    from sdp.solvers import get_solver
    from sdp.solvers.base import LipSdpProblem, SolveOptions

    net = load_network(julia_model)
    lmi = Lmi.from_chain(net.chain())
    # exact input reduction W_0 = U S V^T -> U S (design.md §3.2); T carries over unchanged
    u, s, _ = np.linalg.svd(lmi.weights[0], full_matrices=False)
    reduced = Lmi((u * s, *lmi.weights[1:]), lmi.alpha, lmi.beta)
    sol = get_solver("structured").solve(LipSdpProblem(reduced, "neuron"), SolveOptions())
    assert sol.multipliers is not None
    rep = certify_multipliers(lmi, sol.multipliers)
    assert math.sqrt(rep.rho) <= 5.0


def test_config_json_is_the_documented_format(julia_model):
    _, config = read_safetensors(julia_model)
    assert config["format"] == "lipcert/1" and config["kind"] == "sandwich"
    assert [la["type"] for la in config["layers"]] == ["sandwich", "sandwich", "sandwich_output"]
    json.dumps(config)
