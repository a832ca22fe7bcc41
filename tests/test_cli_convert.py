"""``lipcert convert``: a RobustNeuralNetworks.jl LBDN's parameters -> a lipcert/1 file."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from sdp.importers import load_model_file

LIPCERT = Path(sys.executable).with_name("lipcert")


def run(*args: str | Path, threads: int = 1) -> subprocess.CompletedProcess[str]:
    env = {**os.environ}
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[key] = str(threads)
    return subprocess.run(
        [str(LIPCERT), *map(str, args)], capture_output=True, text=True, env=env, timeout=300
    )


def test_convert_julia_lbdn_imports_and_certifies_gamma(fixtures_dir: Path, tmp_path: Path):
    src = fixtures_dir / "lbdn_jl" / "lbdn_mnist_params.npz"
    out = tmp_path / "lbdn.safetensors"
    # two BLAS threads: the closed-form check re-derives the layers and compares them bit for
    # bit with the imported ones (it failed with sandwich-mismatch before the derivation was
    # made deterministic)
    proc = run("convert", src, "--from", "lbdn-jl", "--out", out, "--json", threads=2)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["kind"] == "sandwich" and summary["verified"] is True
    assert summary["input_shape"] == [784] and summary["output_size"] == 10
    assert math.isclose(summary["lipschitz_bound"], 5.0, rel_tol=1e-6)
    net = load_model_file(out)
    # the forward pass of the Julia package (fixtures README), recomputed from the raw arrays
    z = np.load(src)
    x = np.random.default_rng(0).uniform(0, 1, size=(3, 784))
    s, h = math.sqrt(math.exp(float(z["log_gamma"][0]))), None
    h = s * x
    for k in (1, 2, 3):
        xy = z[f"XY{k}"].astype(np.float64)
        xy *= float(z[f"alpha{k}"][0]) / np.linalg.norm(xy)
        n = xy.shape[1]
        xk, yk = xy[:n], xy[n:]
        zz = xk - xk.T + yk.T @ yk
        inv = np.linalg.inv(np.eye(n) + zz)
        b_t = -2.0 * yk @ inv  # B^T
        if k == 3:
            h = s * h @ b_t + z["b3"]
            break
        a_t = inv @ (np.eye(n) - zz)  # A^T
        psi = np.exp(z[f"d{k}"].astype(np.float64))
        u = math.sqrt(2) * (h @ b_t) / psi + z[f"b{k}"]
        h = math.sqrt(2) * (np.maximum(u, 0) * psi) @ a_t.T
    np.testing.assert_allclose(net.forward(x), h, rtol=1e-9, atol=1e-9)


def test_convert_refuses_bad_sources(tmp_path: Path):
    np.savez(tmp_path / "partial.npz", layer_sizes=np.array([4, 3, 2]), log_gamma=np.zeros(1))
    out = tmp_path / "m.safetensors"
    proc = run("convert", tmp_path / "partial.npz", "--out", out)
    assert proc.returncode != 0 and not out.exists()
    assert proc.stderr.strip().startswith("lipcert: error:") and "XY1" in proc.stderr
    proc = run("convert", tmp_path / "partial.npz", "--from", "keras", "--out", out)
    assert proc.returncode != 0 and "lbdn-jl" in proc.stderr
    assert list(tmp_path.iterdir()) == [tmp_path / "partial.npz"]  # nothing left behind
