"""``lipcert certify --mode local``: per-input certified radii (:mod:`service.local_certify`).

Prints, per input, ``prediction``, ``margin``, ``radius`` (the largest certified l2 radius
found, never below the global radius margin / (sqrt(2) L)), ``radius_method`` and
``global_radius``; with ``--epsilon`` it certifies at that eps and adds ``certified``; with
``--labels`` it adds ``label`` and ``correct`` (as global mode does).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from sdp.errors import LipcertError
from service.certification import Certified, result_rows
from service.cli._common import fail
from service.documents import StoredBound, strict_json
from service.errors import InvalidInput
from service.local_certify import LocalOptions, certify_rows, check_epsilon, device_optimizer

MAX_TABLE_ROWS = 200
"""Rows of the terminal table; more inputs are summarised (``--json`` / ``--tsv`` have all)."""


def local_options(method: str, epsilon: float | None, time_budget: float) -> LocalOptions:
    """Options from the command line (one-line CLI error when they are bad)."""
    from service.local_certify import LOCAL_METHODS

    if method not in LOCAL_METHODS:
        fail(f"--local-method must be one of {', '.join(LOCAL_METHODS)}")
    if not time_budget > 0:
        fail("--time-budget must be > 0 seconds")
    try:
        eps = check_epsilon(epsilon)
    except InvalidInput as e:
        fail(f"--epsilon: {e.detail}")
    return LocalOptions(method, eps, time_budget)


def run(
    net: Any,
    x: np.ndarray,
    y: np.ndarray | None,
    options: LocalOptions,
    bound: StoredBound | None,
) -> Certified:
    """Certify the file-layout rows ``x``; CLI errors for bad input."""
    labels = None
    if y is not None:
        labels = np.asarray(y).reshape(-1)
        if labels.dtype.kind not in "iu":
            fail("labels must be integer class indices")
    try:
        optimizer = device_optimizer(os.environ.get("LIPCERT_DEVICE", "auto"))
        return certify_rows(net, x, labels, options, bound, optimizer)
    except InvalidInput as e:
        fail(f"{e.code}: {e.detail}")
    except LipcertError as e:
        fail(f"{e.code}: {e.detail}")


def write_tsv(path: Path, cert: Certified) -> None:
    """idx label predict radius radius_method global_radius correct [certified] (-1: unknown)."""
    c = cert.columns
    head = ["idx", "label", "predict", "radius", "radius_method", "global_radius", "correct"]
    if "epsilon" in c:
        head.append("certified")
    lines = ["\t".join(head)]
    for i in range(len(c["prediction"])):
        row = [
            str(i),
            str(int(c["label"][i])) if "label" in c else "-1",
            str(int(c["prediction"][i])),
            f"{float(c['radius'][i]):.10g}",
            str(c["radius_method"][i]),
            f"{float(c['global_radius'][i]):.10g}",
            str(int(bool(c["correct"][i]))) if "correct" in c else "-1",
        ]
        if "epsilon" in c:
            row.append(str(int(bool(c["certified"][i]))))
        lines.append("\t".join(row))
    path.write_text("\n".join(lines) + "\n")


def plot_curves(path: Path, cert: Certified, title: str, points: int = 200) -> None:
    """Certified accuracy (or certified fraction without labels) against eps, for the global
    radii and the local ones, in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sdp.radius import certified_accuracy

    c = cert.columns
    local, glob = c["radius"], c["global_radius"]
    correct = c["correct"] if "correct" in c else np.ones(local.shape, bool)
    top = float(local.max()) * 1.05 if local.size and local.max() > 0 else 1.0
    eps = np.linspace(0.0, top, points)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(eps, certified_accuracy(glob, correct, eps), label="global (margin / sqrt(2) L)")
    ax.plot(eps, certified_accuracy(local, correct, eps), label="local (per input)")
    ax.set_xlabel("l2 eps")
    ax.set_ylabel("certified accuracy" if "correct" in c else "certified fraction")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report(
    cert: Certified,
    *,
    model: Path,
    bound: StoredBound | None,
    json_out: bool,
    tsv: Path | None,
    plot: Path | None,
) -> None:
    """Write the TSV/plot and print the JSON object or a table. The JSON's ``bound`` is the
    global bound document as GET /v1/models/{id}/bounds shows it (null without one)."""
    if tsv is not None:
        write_tsv(tsv, cert)
    if plot is not None:
        plot_curves(plot, cert, f"{model.name}: local {cert.summary['method']}")
    rows = result_rows(cert)
    for i, row in enumerate(rows):
        row["index"] = i
    if json_out:
        doc = None if bound is None else bound.summarised()
        out = {**cert.summary, "bound": doc, "results": rows}
        if cert.summary.get("accuracy") is not None:
            out["clean_accuracy"] = cert.summary["accuracy"]
        sys.stdout.write(json.dumps(strict_json(out)) + "\n")
        return
    lip = cert.summary.get("lipschitz_bound")
    floor = "no global bound" if lip is None else f"global L = {lip:.6g}"
    table = Table(title=f"local {cert.summary['method']} ({floor})")
    cols = ["idx", "label", "predict", "margin", "radius", "method", "global"]
    if "epsilon" in cert.columns:
        cols.append("certified")
    for col in cols:
        table.add_column(col)
    for r in rows[:MAX_TABLE_ROWS]:
        cells = [
            str(r["index"]),
            str(r.get("label", "")),
            str(r["prediction"]),
            f"{r['margin']:.4g}" if r["margin"] is not None else "",
            f"{r['radius']:.4g}",
            str(r["radius_method"]),
            f"{r['global_radius']:.4g}",
        ]
        if "epsilon" in cert.columns:
            cells.append(str(r["certified"]))
        table.add_row(*cells)
    console = Console()
    console.print(table)
    if len(rows) > MAX_TABLE_ROWS:
        console.print(
            f"... {len(rows) - MAX_TABLE_ROWS} more rows not shown (--json or --tsv FILE for all)"
        )
    console.print(summary_line(cert))


def summary_line(cert: Certified) -> str:
    """One line for a terminal: inputs, certified count, median radius, accuracies, time."""
    c = cert.columns
    n = len(c["prediction"])
    radius = np.asarray(c["radius"], dtype=np.float64)
    parts = [f"{n} inputs"]
    if "certified" in c and "epsilon" in c and "correct" not in c:
        k = int(np.asarray(c["certified"]).sum())
        parts.append(f"certified {k}/{n} ({100.0 * k / max(n, 1):.1f}%)")
    if n:
        parts.append(f"median radius {float(np.median(radius)):.4g}")
    acc = cert.summary.get("accuracy")
    if isinstance(acc, int | float):
        parts.append(f"clean accuracy {100.0 * acc:.1f}%")
    cacc = cert.summary.get("certified_accuracy")
    if isinstance(cacc, int | float):
        parts.append(f"certified accuracy {100.0 * cacc:.1f}%")
    sec = cert.summary.get("seconds")
    if sec is not None:
        parts.append(f"{sec:.1f} s")
    return "; ".join(parts)
