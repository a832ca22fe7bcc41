"""Write a small example network and inputs for the README tour.

    python3 scripts/example_model.py DIR

writes DIR/mlp.onnx (4 -> 16 -> 16 -> 3, ReLU, seeded random weights, built with the onnx
helper API), DIR/x.npy (8 inputs, shape (8, 4)), DIR/y.npy (their predicted labels) and
DIR/train.npz (arrays x (512, 4) and y: inputs labelled by the network, to train an LBDN on).
Needs numpy and onnx (both installed with lipcert).
"""

from __future__ import annotations

import sys
from itertools import pairwise
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

SIZES = (4, 16, 16, 3)
SEED = 2
TRAIN_SIZE = 512


def build_mlp(rng: np.random.Generator) -> tuple[onnx.ModelProto, list[np.ndarray]]:
    """A Gemm/Relu chain; returns the model and its weights (out, in) for a numpy forward."""
    nodes, inits, weights = [], [], []
    name = "x"
    for k, (n_in, n_out) in enumerate(pairwise(SIZES)):
        w = rng.normal(0.0, 1.0 / np.sqrt(n_in), size=(n_out, n_in))
        b = rng.normal(0.0, 0.1, size=n_out)
        weights += [w, b]
        inits += [numpy_helper.from_array(w.astype(np.float32), f"W{k}")]
        inits += [numpy_helper.from_array(b.astype(np.float32), f"b{k}")]
        out = "logits" if k == len(SIZES) - 2 else f"h{k}"
        gemm_out = out if out == "logits" else f"z{k}"
        nodes.append(helper.make_node("Gemm", [name, f"W{k}", f"b{k}"], [gemm_out], transB=1))
        if out != "logits":
            nodes.append(helper.make_node("Relu", [gemm_out], [out]))
        name = out
    graph = helper.make_graph(
        nodes,
        "example_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", SIZES[0]])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", SIZES[-1]])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model, weights


def forward(weights: list[np.ndarray], x: np.ndarray) -> np.ndarray:
    """The same network in numpy (float64), to label the example inputs."""
    h = x
    for k in range(0, len(weights), 2):
        h = h @ weights[k].T + weights[k + 1]
        if k + 2 < len(weights):
            h = np.maximum(h, 0.0)
    return h


def example_inputs(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` standard normal inputs (float32), drawn after the weights from the same stream."""
    return rng.normal(size=(n, SIZES[0])).astype(np.float32)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        sys.stderr.write("usage: python3 scripts/example_model.py DIR\n")
        return 2
    out = Path(argv[0])
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(SEED)
    model, weights = build_mlp(rng)
    onnx.save(model, out / "mlp.onnx")
    x = example_inputs(rng, 8)
    np.save(out / "x.npy", x)
    np.save(out / "y.npy", forward(weights, x.astype(np.float64)).argmax(axis=1))
    x_train = example_inputs(rng, TRAIN_SIZE)
    y_train = forward(weights, x_train.astype(np.float64)).argmax(axis=1)
    np.savez(out / "train.npz", x=x_train, y=y_train.astype(np.int64))
    print(f"wrote {out / 'mlp.onnx'}, x.npy, y.npy and train.npz in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
