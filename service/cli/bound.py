"""``lipcert bound``, ``lipcert certify`` and ``lipcert verify``.

Contract (design.md §5): ``--json`` prints one JSON object on stdout; progress goes to stderr;
errors print one line on stderr and exit non-zero (:func:`service.cli._common.fail`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from service.cli._common import fail
from service.documents import StoredBound, strict_json
from service.settings import LOCAL_TIME_BUDGET_S

_METHOD_HELP = (
    "auto, naive, lipsdp-layer, lipsdp-neuron, eclipse-fast, eclipse, eclipse-refined, sandwich"
    " or lipsdp-dag."
)


def _load(model: Path) -> Any:
    from sdp.importers import load_model_file

    return load_model_file(model)


def _progress(enabled: bool) -> Any:
    if not enabled:
        return None
    err = Console(stderr=True, log_path=False)

    def report(event: dict[str, Any]) -> None:
        phase = event.get("phase", "")
        if phase == "solve" and int(event.get("iteration", 0)) % 10:
            return
        detail = " ".join(f"{k}={v}" for k, v in event.items() if k != "phase")
        err.log(f"[bold]{phase}[/bold] {detail}".rstrip())

    return report


def _compute(
    net: Any,
    method: str,
    pairwise: bool,
    solver: str | None,
    timeout: float | None,
    quiet: bool,
    lower_bound: bool = True,
    device: str = "cpu",
) -> Any:
    from sdp.bounds import compute_bound
    from service.malloc_tuning import keep_freed_memory
    from service.solver_device import use_solver_device

    use_solver_device(device)
    keep_freed_memory()  # as in the job processes (service.malloc_tuning)
    return compute_bound(
        net,
        method,
        pairwise=pairwise,
        solver=solver,
        timeout_s=timeout,
        progress=_progress(not quiet),
        lower_bound=lower_bound,
    )


def bound(
    model: Path = typer.Argument(..., help="ONNX, safetensors or LipSDP .mat file."),
    method: str = typer.Option("auto", help=_METHOD_HELP),
    pairwise: bool = typer.Option(False, help="Also bound f_y - f_j for every class pair."),
    solver: str | None = typer.Option(None, help="scs|clarabel|sdpa|structured (default: pick)."),
    timeout: float | None = typer.Option(None, help="Solver time limit in seconds."),
    device: str = typer.Option(
        "auto",
        envvar="LIPCERT_DEVICE",
        help="auto|cpu|cuda: where the structured LipSDP solver's matrices live.",
    ),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
    save_cert: Path | None = typer.Option(None, help="Write the LipSDP certificate (JSON) here."),
    lower: bool = typer.Option(True, "--lower-bound/--no-lower-bound", help="Empirical gap."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress on stderr."),
) -> None:
    """Certified l2 Lipschitz upper bound of MODEL."""
    from sdp.errors import LipcertError

    try:
        net = _load(model)
        result = _compute(net, method, pairwise, solver, timeout, quiet, lower, device)
    except LipcertError as e:
        fail(f"{e.code}: {e.detail}")
    except OSError as e:
        fail(f"cannot read {model}: {e.strerror or e}")
    if save_cert is not None:
        if result.certificate is None:
            fail(f"method {result.method} produced no LipSDP certificate to save")
        save_cert.write_text(result.certificate.to_json())
    request = {
        "model": str(model),
        "method": method,
        "pairwise": pairwise,
        "solver": solver,
        "timeout_s": timeout,
    }
    # the document the HTTP API serves for a bound (GET /v1/jobs/{id} "result"), with the full
    # certificate(s): re-checkable without a solver (sdp.bounds.recheck.recheck_document)
    stored = StoredBound.from_result(result, net.content_hash(), request, source="cli")
    if json_out:
        sys.stdout.write(json.dumps(stored.to_json()) + "\n")
        return
    table = Table(title=f"lipcert bound: {model.name}", show_header=False)
    for key in ("lipschitz_bound", "method", "verified", "solver", "lower_bound", "gap_ratio"):
        table.add_row(key, str(getattr(stored, key)))
    table.add_row("solve_time_s", f"{stored.solve_time_s:.3f}")
    for note in stored.notes:
        table.add_row("note", note)
    if result.pairwise is not None:
        table.add_row("pairwise", np.array2string(np.asarray(result.pairwise), precision=4))
    Console().print(table)


def certify(
    model: Path = typer.Argument(...),
    inputs: Path = typer.Option(
        ...,
        help="Inputs as .npy (batch, *input_shape) or (batch, n0), in the model file's layout "
        "(what onnxruntime takes).",
    ),
    labels: Path | None = typer.Option(None, help="Labels as .npy (batch,)."),
    method: str = typer.Option(
        "auto", help=_METHOD_HELP + " (the global bound; with --mode local also none)"
    ),
    pairwise: bool = typer.Option(False, help="Also use pairwise bounds L_yj (tighter radii)."),
    solver: str | None = typer.Option(None, help="Solver registry name."),
    mode: str = typer.Option(
        "global",
        help="global: margin / (sqrt(2) L) from one Lipschitz bound; local: per-input bounds "
        "on the l2 ball (largest certified radius, or certified at --epsilon).",
    ),
    epsilon: float | None = typer.Option(
        None, help="With --mode local: certify at this l2 eps (adds `certified`)."
    ),
    local_method: str = typer.Option(
        "auto", help="With --mode local: ibp|crown|alpha-crown|sdp-crown|bab|beta-crown|auto."
    ),
    time_budget: float = typer.Option(
        LOCAL_TIME_BUDGET_S,
        help="With --mode local: seconds per input for the radius search, and at --epsilon "
        "the deadline of alpha-crown's optimisation (the HTTP API's default too).",
    ),
    json_out: bool = typer.Option(False, "--json"),
    tsv: Path | None = typer.Option(None, help="Write idx/label/predict/radius/correct TSV."),
    plot: Path | None = typer.Option(
        None, help="Write a certified-accuracy-vs-radius PNG (local: global and local curves)."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Certified robustness radii: margin / (sqrt(2) L) (global) or per input (--mode local)."""
    from sdp.errors import LipcertError

    if mode not in ("global", "local"):
        fail(f"--mode must be global or local, not {mode!r}")
    if mode == "global" and epsilon is not None:
        fail("--epsilon needs --mode local")
    if mode == "local":
        from service.cli import local

        options = local.local_options(local_method, epsilon, time_budget)
    from sdp.radius import certified_radius
    from sdp.rounding import logit_error_bound, unit_roundoff

    try:
        net = _load(model)
        x = np.load(inputs, allow_pickle=False)
        y = None if labels is None else np.load(labels, allow_pickle=False)
    except LipcertError as e:
        fail(f"{e.code}: {e.detail}")
    except (OSError, ValueError) as e:
        fail(f"cannot read inputs: {e}")
    x = np.asarray(x, dtype=np.float64)
    if x.size == 0 or x.size % net.input_size:
        fail(f"inputs of shape {x.shape} do not fit the network input {net.file_input_shape}")
    if not np.isfinite(x).all():
        fail("inputs contain NaN or infinity")
    if y is not None and np.asarray(y).reshape(-1).shape[0] != x.size // net.input_size:
        fail(f"{np.asarray(y).size} labels for {x.size // net.input_size} inputs")
    if mode == "local":
        floor: StoredBound | None = None
        if method != "none":
            try:
                gb = _compute(net, method, False, solver, None, quiet, lower_bound=False)
            except LipcertError as e:
                fail(f"{e.code}: {e.detail}")
            floor = StoredBound.from_result(gb, net.content_hash(), source="cli")
        cert = local.run(net, x.reshape(-1, net.input_size), y, options, floor)
        local.report(
            cert,
            model=model,
            bound=floor,
            json_out=json_out,
            tsv=tsv,
            plot=plot,
        )
        return
    x = net.ir_inputs(x.reshape(-1, net.input_size))  # file layout -> the IR's (a permutation)
    try:
        result = _compute(net, method, pairwise, solver, None, quiet, lower_bound=False)
        logits = net.forward(x)
        err = logit_error_bound(net, unit_roundoff("float64"), safety=4.0)(x)
        radii = certified_radius(
            logits, result.value, labels=y, pairwise=result.pairwise, logit_error=err
        )
    except LipcertError as e:
        fail(f"{e.code}: {e.detail}")
    except ValueError as e:
        fail(str(e))
    if tsv is not None:
        from sdp.report import write_tsv

        write_tsv(tsv, radii, y)
    if plot is not None:
        from sdp.report import plot_certified_accuracy

        plot_certified_accuracy(plot, radii, title=f"{model.name}: {result.method}")
    rows = []
    for i in range(x.shape[0]):
        row: dict[str, Any] = {
            "index": i,
            "prediction": int(radii.prediction[i]),
            "margin": float(radii.margin[i]),
            "radius": float(radii.radius[i]),
        }
        if radii.radius_pairwise is not None:
            row["radius_pairwise"] = float(radii.radius_pairwise[i])
        if radii.correct is not None:  # the HTTP API's words: correct, certified (radius > 0)
            row["label"] = int(np.asarray(y).reshape(-1)[i])
            row["correct"] = bool(radii.correct[i])
            row["certified"] = bool(radii.correct[i] and radii.best_radius[i] > 0)
        rows.append(row)
    # the bound as GET /v1/models/{id}/bounds shows it (certificate summarised)
    used = StoredBound.from_result(result, net.content_hash(), source="cli")
    out: dict[str, Any] = {"bound": used.summarised(), "results": rows}
    if radii.correct is not None:
        out["accuracy"] = float(np.mean(radii.correct))
        out["certified_accuracy"] = float(np.mean([r["certified"] for r in rows]))
        out["epsilon"] = 0.0
    if json_out:
        sys.stdout.write(json.dumps(strict_json(out)) + "\n")
        return
    table = Table(title=f"L = {result.value:.6g} ({result.method})")
    for col in ("idx", "label", "predict", "margin", "radius", "correct"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            str(r["index"]),
            str(r.get("label", "")),
            str(r["prediction"]),
            f"{r['margin']:.4g}",
            f"{max(r['radius'], r.get('radius_pairwise', 0.0)):.4g}",
            str(r.get("correct", "")),
        )
    Console().print(table)


def verify(
    cert: Path = typer.Argument(..., help="Certificate JSON written by `bound --save-cert`."),
    model: Path = typer.Argument(...),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Re-check a stored certificate against MODEL without a solver."""
    from sdp.bounds.residual import verify_dag_on
    from sdp.certificate import Certificate, Lmi, verify_certificate
    from sdp.errors import LipcertError

    try:
        c = Certificate.from_json(cert.read_text())
        net = _load(model)
        if c.network_hash and c.network_hash != net.content_hash():
            fail("certificate was issued for a different network (content hash differs)")
        if net.is_chain and c.meta.get("structure") != "dag":
            lmi = Lmi.from_chain(net.chain(), output_map=c.output_map)
            ok = verify_certificate(lmi, c)
        else:  # a lipsdp-dag certificate (residual networks, design.md §3.6)
            ok = verify_dag_on(net, c)
    except LipcertError as e:
        fail(f"{e.code}: {e.detail}")
    except (OSError, ValueError) as e:
        fail(f"cannot check certificate: {e}")
    if not ok:
        fail("certificate does NOT verify: M(rho, T) is not negative semidefinite")
    if c.output_map is not None:  # it bounds Lip(P f) (e.g. a pair e_y - e_j), NOT Lip(f)
        pm = np.asarray(c.output_map).tolist()
        if json_out:
            out = {
                "verified": True,
                "output_map": pm,
                "output_map_lipschitz_bound": c.lipschitz_bound,
            }
            sys.stdout.write(json.dumps({**out, "rho": c.rho}) + "\n")
        else:
            Console().print(f"verified: Lip(P f) <= {c.lipschitz_bound:.10g} for P = {pm}")
        return
    if json_out:
        out = {"verified": True, "lipschitz_bound": c.lipschitz_bound, "rho": c.rho}
        sys.stdout.write(json.dumps(out) + "\n")
    else:
        Console().print(f"verified: Lip <= {c.lipschitz_bound:.10g} (rho = {c.rho:.10g})")
