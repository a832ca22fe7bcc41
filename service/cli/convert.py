"""``lipcert convert``: write another tool's network as a lipcert/1 ``.safetensors`` file.

Sources (``--from``):

``lbdn-jl``  the direct parameters of a RobustNeuralNetworks.jl LBDN saved as ``.npz``
             (layout in docs/formats.md; the Julia BSON itself is not read).

The written file is imported again and its sandwich closed form checked before the command
reports success, so a file that would be refused on upload is never left behind.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from service.cli._common import fail

SOURCES = ("lbdn-jl",)


def convert(
    source: Path = typer.Argument(..., help="The file to convert (lbdn-jl: an .npz)."),
    out: Path = typer.Option(..., help="Output .safetensors file (lipcert/1)."),
    from_: str = typer.Option("lbdn-jl", "--from", help="Source format: lbdn-jl."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
) -> None:
    """Convert SOURCE into a lipcert/1 safetensors file that lipcert (and its API) imports."""
    from models.io import convert_lbdn_jl
    from sdp.bounds.sandwich import sandwich_bound
    from sdp.errors import LipcertError
    from sdp.importers import load_model_file

    if from_ not in SOURCES:
        fail(f"unknown source format {from_!r}; expected one of {', '.join(SOURCES)}")
    if out.resolve() == source.resolve():
        fail("--out must not overwrite the source file")
    tmp = out.with_name(out.name + ".part")
    try:
        convert_lbdn_jl(source, tmp)
        net = load_model_file(tmp)
        result = sandwich_bound(net)
    except LipcertError as e:
        tmp.unlink(missing_ok=True)
        fail(f"{e.code}: {e.detail}")
    except (OSError, ValueError) as e:
        tmp.unlink(missing_ok=True)
        fail(f"cannot convert {source}: {e}")
    tmp.replace(out)
    summary = {
        "out": str(out),
        "kind": net.kind,
        "input_shape": list(net.input_shape),
        "output_size": net.output_size,
        "parameters": net.num_parameters,
        "lipschitz_bound": result.value,
        "method": result.method,
        "verified": result.verified,
    }
    if json_out:
        sys.stdout.write(json.dumps(summary) + "\n")
        return
    typer.echo(
        f"wrote {out}: {net.kind} network {summary['input_shape']} -> {net.output_size}, "
        f"verified Lipschitz bound {result.value:.6g} ({result.method})"
    )
