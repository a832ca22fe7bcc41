"""``lipcert certify`` on an ONNX file whose NHWC input is transposed to NCHW on entry: the
.npy inputs are in the file's layout (flat or shaped), as onnxruntime takes them."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from sdp.importers import load_model
from sdp.rounding import logit_error_bound, unit_roundoff
from tests.sdp.test_importers_input_layout import conv_net_onnx, ort_logits
from tests.test_cli_bound import run


@pytest.mark.parametrize("flat", [False, True])
def test_certify_takes_inputs_in_the_files_layout(tmp_path, flat) -> None:
    data = conv_net_onnx(nhwc=True)
    (tmp_path / "m.onnx").write_bytes(data)
    x = np.random.default_rng(5).uniform(-1, 1, (6, 4, 5, 3)).astype(np.float32)
    np.save(tmp_path / "x.npy", x.reshape(6, -1) if flat else x)
    proc = run("certify", tmp_path / "m.onnx", "--inputs", tmp_path / "x.npy",
               "--method", "naive", "--json", "--quiet")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    lip = out["bound"]["lipschitz_bound"]
    want = ort_logits(data, x)
    top2 = np.sort(want, axis=1)[:, -2:]
    net = load_model(data)
    x64 = x.astype(np.float64)
    err = logit_error_bound(net, unit_roundoff("float64"), safety=4.0)(net.ir_inputs(x64))
    for i, row in enumerate(out["results"]):
        assert row["prediction"] == int(np.argmax(want[i]))
        assert row["margin"] == pytest.approx(top2[i, 1] - top2[i, 0], abs=1e-5)
        expected = (row["margin"] - math.sqrt(2) * err[i]) / (math.sqrt(2) * lip)
        assert row["radius"] == pytest.approx(expected, rel=1e-12)
