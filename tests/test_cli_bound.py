"""The real ``lipcert`` console script: bound / certify / verify (subprocesses)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sdp.bounds.recheck import recheck_document
from sdp.errors import CertificateError
from sdp.importers import load_model_file
from service.documents import StoredBound

LIPCERT = Path(sys.executable).with_name("lipcert")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LIPCERT), *map(str, args)], capture_output=True, text=True, env=ENV, timeout=300
    )


def _one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("lipcert: error:"), proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def random_mat(fixtures_dir: Path) -> Path:
    return fixtures_dir / "lipsdp" / "random_weights.mat"


@pytest.fixture(scope="module")
def saved(random_mat: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    cert = tmp_path_factory.mktemp("cert") / "cert.json"
    proc = run("bound", random_mat, "--method", "lipsdp-neuron", "--json", "--save-cert", cert)
    assert proc.returncode == 0, proc.stderr
    assert "verify" in proc.stderr  # progress goes to stderr, never into the JSON
    return json.loads(proc.stdout), cert


def test_bound_json(saved, random_mat):
    out, cert = saved
    assert out["verified"] is True
    assert out["method"] == "lipsdp-neuron"
    assert 36.482 - 5e-4 <= out["lipschitz_bound"] <= 36.482 * 1.001
    assert out["solve_time_s"] >= 0
    assert out["lower_bound"] <= out["lipschitz_bound"]
    # the bound document the HTTP API serves (StoredBound.to_json): same keys in the same
    # order, the full certificate, the network's hash; re-proven without a solver as a
    # worker's answer is
    assert list(StoredBound.from_json(out).to_json().items()) == list(out.items())
    assert out["certificate"] == json.loads(cert.read_text())
    net = load_model_file(random_mat)
    assert out["network_hash"] == net.content_hash() == out["certificate"]["network_hash"]
    assert out["request"]["method"] == "lipsdp-neuron" and out["request"]["pairwise"] is False
    assert out["source"] == "cli" and out["job_id"] is None
    recheck_document(net, out)
    forged = {**out, "lipschitz_bound": out["lipschitz_bound"] * 0.99}
    with pytest.raises(CertificateError):
        recheck_document(net, forged)


def test_verify_saved_certificate_and_detect_tampering(saved, random_mat, fixtures_dir, tmp_path):
    out, cert = saved
    ok = run("verify", cert, random_mat, "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["lipschitz_bound"] == pytest.approx(out["lipschitz_bound"])

    data = json.loads(cert.read_text())
    data["rho"] *= 0.99  # claims a 0.5 % smaller bound than the multipliers support
    data["lipschitz_bound"] = math.sqrt(data["rho"])
    bad = tmp_path / "tampered.json"
    bad.write_text(json.dumps(data))
    assert "does NOT verify" in _one_line_error(run("verify", bad, random_mat))

    other = fixtures_dir / "lipsdp" / "mnist_weights.mat"
    assert "different network" in _one_line_error(run("verify", cert, other))


def test_lipsdp_network_is_refused(random_mat):
    line = _one_line_error(run("bound", random_mat, "--method", "lipsdp-network", "--json"))
    assert "unsound" in line


def test_missing_model_is_one_line_error(tmp_path):
    _one_line_error(run("bound", tmp_path / "nope.onnx", "--json"))


def test_certify_with_npy_inputs(fixtures_dir, tmp_path):
    model = fixtures_dir / "lipsdp" / "mnist_weights.mat"
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(5, 784))
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", np.array([0, 1, 2, 3, 4]))
    proc = run(
        "certify", model, "--inputs", tmp_path / "x.npy", "--labels", tmp_path / "y.npy",
        "--method", "naive", "--json", "--tsv", tmp_path / "r.tsv", "--plot", tmp_path / "p.png",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    lip = out["bound"]["lipschitz_bound"]
    assert out["bound"]["method"] == "naive" and out["bound"]["verified"] is True
    # the typed bound document (GET /v1/models/{id}/bounds), not BoundResult.summary()
    assert StoredBound.from_json(out["bound"]).summarised() == out["bound"]
    assert out["bound"]["network_hash"] == load_model_file(model).content_hash()
    assert len(out["results"]) == 5
    for row in out["results"]:
        assert row["radius"] == pytest.approx(max(row["margin"], 0) / (math.sqrt(2) * lip))
        assert row["correct"] == (row["prediction"] == row["label"])
        assert row["certified"] == (row["correct"] and row["radius"] > 0)
    # the HTTP API's vocabulary: accuracy, certified_accuracy (at epsilon), correct, certified
    assert out["accuracy"] == sum(r["correct"] for r in out["results"]) / 5
    assert out["certified_accuracy"] == sum(r["certified"] for r in out["results"]) / 5
    assert out["epsilon"] == 0.0
    assert len((tmp_path / "r.tsv").read_text().splitlines()) == 6
    assert (tmp_path / "p.png").stat().st_size > 0


def test_certify_refuses_pickled_npy(fixtures_dir, tmp_path):
    np.save(tmp_path / "x.npy", np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    model = fixtures_dir / "lipsdp" / "random_weights.mat"
    line = _one_line_error(run("certify", model, "--inputs", tmp_path / "x.npy", "--json"))
    assert "pickle" in line.lower()


def test_verify_a_residual_networks_dag_certificate(tmp_path):
    from tests.service.jobs_support import tiny_residual_onnx

    model = tmp_path / "tiny_residual.onnx"
    model.write_bytes(tiny_residual_onnx())
    cert = tmp_path / "dag.json"
    proc = run("bound", model, "--method", "lipsdp-dag", "--json", "--save-cert", cert)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["method"] == "lipsdp-dag" and out["lower_bound"] <= out["lipschitz_bound"]
    ok = run("verify", cert, model, "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["lipschitz_bound"] == pytest.approx(out["lipschitz_bound"])
    data = json.loads(cert.read_text())
    data["rho"] *= 0.99
    bad = tmp_path / "tampered.json"
    bad.write_text(json.dumps(data))
    assert "does NOT verify" in _one_line_error(run("verify", bad, model))
