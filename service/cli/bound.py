"""``lipcert bound``, ``lipcert certify`` and ``lipcert verify``."""

from __future__ import annotations

from pathlib import Path

import typer

from service.cli._common import fail


def bound(
    model: Path = typer.Argument(..., help="ONNX, safetensors or LipSDP .mat file."),
    method: str = typer.Option("auto", help="auto|naive|lipsdp-layer|lipsdp-neuron|sandwich"),
    pairwise: bool = typer.Option(False, help="Also bound f_y - f_j for every class pair."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
) -> None:
    """Certified l2 Lipschitz upper bound of MODEL."""
    fail("bound is not implemented yet")


def certify(
    model: Path = typer.Argument(...),
    inputs: Path = typer.Option(..., help="Inputs as .npy (batch, *input_shape)."),
    labels: Path | None = typer.Option(None, help="Labels as .npy (batch,)."),
    method: str = typer.Option("auto"),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Certified robustness radii margin / (sqrt(2) L) for each input."""
    fail("certify is not implemented yet")


def verify(cert: Path = typer.Argument(...), model: Path = typer.Argument(...)) -> None:
    """Re-check a stored certificate against MODEL without a solver."""
    fail("verify is not implemented yet")
