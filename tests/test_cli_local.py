"""``lipcert certify --mode local`` as a subprocess: JSON, TSV, plot, and one-line errors."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from tests.service.onnx_nets import mlp_onnx
from tests.service.test_api_local import small_net
from tests.test_cli_bound import _one_line_error, run


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("local")
    (d / "n.onnx").write_bytes(mlp_onnx(small_net()))
    x = np.random.default_rng(0).normal(size=(5, 4))
    np.save(d / "x.npy", x)
    np.save(d / "y.npy", np.array([0, 1, 2, 0, 1]))
    bad = x.copy()
    bad[2, 1] = np.nan
    np.save(d / "nan.npy", bad)
    np.save(d / "wrong.npy", np.zeros((2, 3)))
    return {"dir": d, "model": d / "n.onnx", "x": d / "x.npy", "y": d / "y.npy"}


def test_radius_search_json_tsv_plot(files: dict[str, Path]) -> None:
    d = files["dir"]
    proc = run(
        "certify",
        files["model"],
        "--inputs",
        files["x"],
        "--labels",
        files["y"],
        "--mode",
        "local",
        "--method",
        "naive",
        "--time-budget",
        "0.5",
        "--json",
        "-q",
        "--tsv",
        d / "r.tsv",
        "--plot",
        d / "r.png",
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["mode"] == "local" and out["bound"]["method"] == "naive"
    assert out["bound"]["source"] == "cli" and out["bound"]["certificate"] is None  # naive
    assert len(out["results"]) == 5
    labels = [0, 1, 2, 0, 1]
    for row in out["results"]:
        assert {"prediction", "margin", "radius", "radius_method", "global_radius"} <= set(row)
        assert row["radius"] >= row["global_radius"] > 0  # the naive bound is verified
        assert "certified" in row  # labels: correct and radius > 0
        assert row["correct"] == (row["prediction"] == row["label"])
    assert [r["label"] for r in out["results"]] == labels  # as global mode's rows
    tsv = (d / "r.tsv").read_text().splitlines()
    assert tsv[0].split("\t")[:5] == ["idx", "label", "predict", "radius", "radius_method"]
    assert len(tsv) == 6
    assert [int(line.split("\t")[1]) for line in tsv[1:]] == labels
    assert (d / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_certify_at_epsilon(files: dict[str, Path]) -> None:
    args = (
        "certify",
        files["model"],
        "--inputs",
        files["x"],
        "--mode",
        "local",
        "--epsilon",
        "0.05",
        "--local-method",
        "crown",
        "--method",
        "none",
    )
    proc = run(*args, "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["lipschitz_bound"] is None and out["epsilon"] == 0.05
    assert all(isinstance(r["certified"], bool) for r in out["results"])
    assert all(r["epsilon"] == 0.05 for r in out["results"])
    table = run(*args)
    assert table.returncode == 0 and "certified" in table.stdout


def test_mnist_256x2_crown(fixtures_dir: Path, tmp_path: Path) -> None:
    """A real VNN-COMP network: local radii far above the global ones."""
    with gzip.open(fixtures_dir / "mnist" / "t10k-images-idx3-ubyte.gz") as f:
        x = np.frombuffer(f.read(), np.uint8, offset=16)[: 3 * 784].reshape(3, 784) / 255.0
    np.save(tmp_path / "x.npy", x)
    model = fixtures_dir / "vnncomp2021" / "benchmarks" / "mnistfc" / "mnist-net_256x2.onnx"
    proc = run(
        "certify",
        model,
        "--inputs",
        tmp_path / "x.npy",
        "--mode",
        "local",
        "--epsilon",
        "0.1",
        "--local-method",
        "crown",
        "--method",
        "naive",
        "--json",
        "-q",
    )
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)["results"]
    assert all(r["global_radius"] < 0.1 for r in rows)  # the global bound certifies nothing
    assert sum(r["certified"] for r in rows) >= 2


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--mode", "local", "--epsilon", "-1"], "epsilon"),
        (["--mode", "local", "--epsilon", "nan"], "epsilon"),
        (["--mode", "local", "--local-method", "magic"], "--local-method"),
        (["--mode", "sideways"], "--mode"),
        (["--epsilon", "0.1"], "--mode local"),
        (["--mode", "local", "--time-budget", "0"], "--time-budget"),
    ],
)
def test_bad_options_are_one_line_errors(
    files: dict[str, Path], args: list[str], needle: str
) -> None:
    line = _one_line_error(run("certify", files["model"], "--inputs", files["x"], *args))
    assert needle in line


@pytest.mark.parametrize(("name", "needle"), [("nan.npy", "NaN"), ("wrong.npy", "do not fit")])
def test_bad_inputs_are_one_line_errors(files: dict[str, Path], name: str, needle: str) -> None:
    proc = run(
        "certify",
        files["model"],
        "--inputs",
        files["dir"] / name,
        "--mode",
        "local",
        "--method",
        "none",
    )
    assert needle in _one_line_error(proc)


def test_big_batch_table_is_summarised(files: dict[str, Path]) -> None:
    """A terminal gets at most 200 rows and a summary line; --json still has every row."""
    d = files["dir"]
    x = np.random.default_rng(1).normal(size=(250, 4))
    np.save(d / "big.npy", x)
    args = ("certify", files["model"], "--inputs", d / "big.npy", "--mode", "local")
    args += ("--epsilon", "0.05", "--local-method", "crown", "--method", "none")
    table = run(*args)
    assert table.returncode == 0, table.stderr
    assert "50 more rows not shown" in table.stdout
    assert "250 inputs; certified" in table.stdout
    assert "\n│ 200 " not in table.stdout and "\n│ 199 " in table.stdout
    out = json.loads(run(*args, "--json").stdout)
    assert len(out["results"]) == 250
