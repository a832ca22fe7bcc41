"""TorchNetwork computes exactly the IR's forward pass (float64, 1e-10), on CPU and CUDA."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.runtime import TorchNetwork
from sdp.ir import Activation, Conv2d, Dense, Network, Residual

ACTS = ["relu", "leaky_relu", "tanh", "sigmoid", "elu", "softplus", "identity", "gelu", "silu"]


DEVICES = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
"""Every comparison runs on the CPU, and on the GPU where there is one (float64, TF32 off)."""


def _compare(net: Network, x: np.ndarray, tol: float = 1e-10) -> None:
    want = net.forward(x)
    scale = max(1.0, float(np.abs(want).max()))
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    for device in DEVICES:
        tnet = TorchNetwork.from_network(net, dtype=torch.float64, device=device)
        got = tnet(torch.as_tensor(x, dtype=torch.float64, device=device)).cpu().numpy()
        np.testing.assert_allclose(got, want, rtol=0, atol=tol * scale, err_msg=device)


@pytest.mark.parametrize("act", ACTS)
def test_dense_chain_each_activation(act: str) -> None:
    rng = np.random.default_rng(0)
    param = 0.1 if act == "leaky_relu" else (1.3 if act == "elu" else 0.0)
    net = Network(
        (5,),
        (
            Dense(rng.normal(size=(7, 5)), rng.normal(size=7)),
            Activation(act, param),  # type: ignore[arg-type]
            Dense(rng.normal(size=(3, 7)), rng.normal(size=3)),
        ),
    )
    _compare(net, 3 * rng.normal(size=(16, 5)))


def test_conv_asymmetric_padding_stride_dilation_groups_and_residual() -> None:
    rng = np.random.default_rng(1)
    conv1 = Conv2d(
        rng.normal(size=(4, 2, 3, 2)),
        rng.normal(size=4),
        (2, 7, 6),
        stride=(2, 1),
        padding=(1, 0, 2, 1),
        dilation=(1, 2),
        groups=1,
    )
    c, h, w = conv1.out_shape
    conv2 = Conv2d(
        rng.normal(size=(4, 2, 3, 3)),
        rng.normal(size=4),
        (c, h, w),
        padding=(1, 1, 1, 1),
        groups=2,
    )
    res = Residual((conv2, Activation("relu")), ())
    n = conv2.out_features
    net = Network(
        (2, 7, 6),
        (conv1, Activation("tanh"), res, Dense(rng.normal(size=(3, n)), rng.normal(size=3))),
    )
    _compare(net, rng.normal(size=(5, 2 * 7 * 6)))


@pytest.mark.parametrize(
    "rel",
    [
        "lipsdp/random_weights.mat",
        "vnncomp2021/benchmarks/oval21/nets/cifar_base_kw.onnx",
        "vnncomp2021/benchmarks/cifar10_resnet/onnx/resnet_2b.onnx",
        "vnncomp2021/benchmarks/eran/nets/ffnnSIGMOID__Point_6x200.onnx",
    ],
)
def test_fixture_networks(fixtures_dir, rel: str) -> None:
    importers = pytest.importorskip("sdp.importers")
    try:
        net = importers.load_model_file(fixtures_dir / rel)
    except Exception as exc:  # an importer that does not read this file yet
        pytest.skip(f"importer cannot read {rel} yet: {exc}")
    rng = np.random.default_rng(2)
    _compare(net, rng.uniform(0, 1, size=(4, net.input_size)))


def test_float32_close_to_float64() -> None:
    rng = np.random.default_rng(3)
    net = Network(
        (4,),
        (
            Dense(rng.normal(size=(6, 4)), np.zeros(6)),
            Activation("relu"),
            Dense(rng.normal(size=(2, 6)), np.zeros(2)),
        ),
    )
    x = rng.normal(size=(8, 4))
    got = TorchNetwork.from_network(net)(torch.as_tensor(x, dtype=torch.float32)).numpy()
    np.testing.assert_allclose(got, net.forward(x), rtol=1e-5, atol=1e-5)
