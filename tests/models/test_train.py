"""Training: the loss, accuracy bookkeeping, and `lipcert train` on real MNIST images."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from models.io import load_network
from models.train import margin_offset, margins, offset_cross_entropy
from sdp.bounds.sandwich import sandwich_bound
from service.cli import app

torch.set_num_threads(1)


def test_margins_and_offset_loss():
    logits = torch.tensor([[3.0, 1.0, 0.5], [0.0, 2.0, 2.5]])
    labels = torch.tensor([0, 1])
    torch.testing.assert_close(margins(logits, labels), torch.tensor([2.0, -0.5]))
    off = offset_cross_entropy(logits, labels, 1.0)
    shifted = logits - torch.tensor([[1.0, 0, 0], [0, 1.0, 0]])
    torch.testing.assert_close(off, torch.nn.functional.cross_entropy(shifted, labels))
    assert margin_offset(2.0, 0.5) == pytest.approx(math.sqrt(2.0))


def test_cli_trains_mnist_to_85_percent(fixtures_dir, tmp_path):
    """2 epochs on 8k MNIST t10k images (2k held out); the saved file certifies gamma."""
    out = tmp_path / "m.safetensors"
    res = CliRunner().invoke(
        app,
        [
            "train",
            "--data",
            str(fixtures_dir / "mnist"),
            "--split",
            "t10k",
            "--limit",
            "10000",
            "--val-fraction",
            "0.2",
            "--epochs",
            "2",
            "--gamma",
            "2",
            "--widths",
            "64,64",
            "--out",
            str(out),
            "--threads",
            "1",
            "--seed",
            "0",
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["train_examples"] == 8000 and summary["heldout_examples"] == 2000
    assert summary["accuracy"] > 0.85
    assert 0 < summary["certified_accuracy"] <= summary["accuracy"]
    assert summary["closed_form_confirmed"] and summary["lipschitz_bound"] <= 2 * (1 + 1e-6)
    net = load_network(out)
    assert net.input_shape == (1, 28, 28)
    assert sandwich_bound(net).value <= 2 * (1 + 1e-6)


def test_cli_trains_from_npz_and_refuses_bad_options(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.random((200, 6)).astype(np.float32)
    y = (x[:, 0] > 0.5).astype(np.int64)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    out = tmp_path / "m.safetensors"
    args = [
        "train",
        "--data",
        str(tmp_path / "d.npz"),
        "--out",
        str(out),
        "--epochs",
        "1",
        "--widths",
        "8",
        "--threads",
        "1",
    ]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert load_network(out).input_size == 6
    # not a terminal: one whole line per epoch (rich used to wrap them at 80 columns)
    epochs = [line for line in res.stderr.splitlines() if line.startswith("epoch ")]
    assert len(epochs) == 1 and re.search(r"certified@0.5 [01]\.\d{4}$", epochs[0]), res.stderr
    bad = CliRunner().invoke(app, [*args, "--arch", "lbdn-conv"])
    assert bad.exit_code != 0 and "square images" in bad.output  # flat data: no conv
    bad = CliRunner().invoke(app, [*args[:-4], "--widths", "a,b"])
    assert bad.exit_code != 0
    np.savez(tmp_path / "obj.npz", x=np.array([{"a": 1}], dtype=object), y=np.zeros(1))
    bad = CliRunner().invoke(app, ["train", "--data", str(tmp_path / "obj.npz"), "--out", str(out)])
    assert bad.exit_code != 0  # object arrays would need pickle: refused


def test_cli_refuses_an_idx_folder_without_training_images(fixtures_dir, tmp_path):
    """The fixtures hold MNIST's test split only: no silent training on test images."""
    args = ["train", "--data", str(fixtures_dir / "mnist"), "--out", str(tmp_path / "m.st")]
    res = CliRunner().invoke(app, args)
    assert res.exit_code != 0 and not (tmp_path / "m.st").exists()
    assert "train-images" in res.stderr and "--split t10k" in res.stderr
