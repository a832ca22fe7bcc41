"""Per-input (local) certification against the global bound and a PGD ceiling (issue 12).

For each network: the first N correctly classified test images (MNIST t10k for the MNIST nets
and the LBDN fixture; for the oval21 CIFAR nets the box centres of their VNN-LIB properties,
the only CIFAR images in the fixtures), then in ONE run:

- global: radius = margin / (sqrt(2) L) with the verified bound of ``--global-method``;
- each local method of ``--methods``: :func:`sdp.local.certify_local` at every eps of
  ``--eps`` (certified accuracy and seconds per input), and with ``--radius`` the largest
  certified radius per input (median, seconds per input: wall seconds, or with ``--cpu-clock``
  this process's CPU seconds, the clock the budgets then use; the table says which);
- PGD ceiling: an l2 PGD attack (restarts x steps, on the margin) inside the full ball and
  inside the ball clipped to the pixel box ([0, 1] for MNIST; none for CIFAR, whose inputs
  are normalised); an image counts as broken if either finds a misclassified point. Any
  image certified at eps and broken at eps is counted as UNSOUND (must be 0).

Prints a markdown table per network (for docs/benchmarks.md) and, with ``--json``, the raw
numbers. Example::

    PYTHONPATH=. python bench/bench_local.py --quick            # 10 images, 256x2 only, crown
    PYTHONPATH=. python bench/bench_local.py --nets 256x2,256x6 --methods crown,auto --radius
    PYTHONPATH=. python bench/bench_local.py --nets 256x2 --methods crown,alpha-crown,beta-crown \
        --radius --radius-methods beta-crown --global-method lipsdp-neuron
"""

from __future__ import annotations

import argparse
import json
import math
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from mnist_data import mnist_test

from models.io import convert_lbdn_jl
from models.runtime import TorchNetwork
from sdp.bounds import compute_bound
from sdp.errors import NotApplicable
from sdp.importers import load_model_file
from sdp.local import certify_local, clock
from sdp.local.graph import build_graph
from sdp.local.margins import get_method
from sdp.radius import certified_radius
from sdp.rounding import logit_error_bound, unit_roundoff

ROOT = Path(__file__).resolve().parent.parent

FIX = ROOT.parent / "shared" / "fixtures"
VNN = FIX / "vnncomp2021" / "benchmarks"
EPS = (0.1, 0.2, 0.3, 0.5, 1.0)


@dataclass(frozen=True)
class Case:
    name: str
    path: str  # relative to the fixtures, or "lbdn" (converted from the Julia fixture)
    data: str  # mnist | cifar
    box: tuple[float, float] | None  # pixel box of the inputs (None: no clipping)


CASES = {
    "256x2": Case("mnistfc-256x2", "mnistfc/mnist-net_256x2.onnx", "mnist", (0.0, 1.0)),
    "256x4": Case("mnistfc-256x4", "mnistfc/mnist-net_256x4.onnx", "mnist", (0.0, 1.0)),
    "256x6": Case("mnistfc-256x6", "mnistfc/mnist-net_256x6.onnx", "mnist", (0.0, 1.0)),
    "relu9x200": Case("ERAN mnist_relu_9_200", "eran/nets/mnist_relu_9_200.onnx", "mnist", (0, 1)),
    "sigmoid6x200": Case(
        "ERAN ffnnSIGMOID 6x200", "eran/nets/ffnnSIGMOID__Point_6x200.onnx", "mnist", (0.0, 1.0)
    ),
    "oval-base": Case("oval21 cifar_base_kw", "oval21/nets/cifar_base_kw.onnx", "cifar", None),
    "oval-deep": Case("oval21 cifar_deep_kw", "oval21/nets/cifar_deep_kw.onnx", "cifar", None),
    "oval-wide": Case("oval21 cifar_wide_kw", "oval21/nets/cifar_wide_kw.onnx", "cifar", None),
    "lbdn": Case("LBDN 784-64-64-10 (gamma 5)", "lbdn", "mnist", (0.0, 1.0)),
}


def cifar_from_vnnlib(net_file: str) -> tuple[np.ndarray, np.ndarray]:
    """Box centres and true labels of the oval21 VNN-LIB properties of one net."""
    stem = Path(net_file).stem
    xs, ys = [], []
    for spec in sorted((VNN / "oval21" / "vnnlib").glob(f"{stem}-*.vnnlib")):
        text = spec.read_text()
        lo = dict(re.findall(r"\(>= X_(\d+) ([-0-9.e]+)\)", text))
        hi = dict(re.findall(r"\(<= X_(\d+) ([-0-9.e]+)\)", text))
        n = len(lo)
        xs.append([(float(lo[str(i)]) + float(hi[str(i)])) / 2 for i in range(n)])
        ys.append(int(re.search(r"\(<= Y_(\d+) Y_\d+\)", text).group(1)))  # type: ignore[union-attr]
    return np.array(xs), np.array(ys, dtype=np.int64)


def load_case(case: Case, tmp: Path) -> Any:
    if case.path == "lbdn":
        out = convert_lbdn_jl(FIX / "lbdn_jl" / "lbdn_mnist_params.npz", tmp / "lbdn.safetensors")
        return load_model_file(out)
    return load_model_file(VNN / case.path)


def pgd_broken(
    tnet: TorchNetwork,
    x: np.ndarray,
    y: np.ndarray,
    eps: float | np.ndarray,
    box: Any,
    restarts: int,
    steps: int,
) -> np.ndarray:
    """True where l2 PGD finds a misclassified point within eps (full or box-clipped ball);
    ``eps`` one radius or one per input (all > 0)."""
    broken = np.zeros(len(x), dtype=bool)
    x0 = torch.as_tensor(x)
    yt = torch.as_tensor(y)
    eps = torch.as_tensor(np.broadcast_to(np.asarray(eps, dtype=np.float64), (len(x),)).copy())
    eps = eps.to(x0.dtype)[:, None]
    gen = torch.Generator().manual_seed(0)
    for clip in (False, True) if box is not None else (False,):
        for _ in range(restarts):
            d = torch.randn(x0.shape, generator=gen, dtype=x0.dtype)
            d = d / d.norm(dim=1, keepdim=True) * eps * torch.rand(len(x0), 1, generator=gen)
            for _ in range(steps):
                d.requires_grad_(True)
                xa = x0 + d
                if clip:
                    xa = xa.clamp(*box)
                out = tnet(xa)
                true = out.gather(1, yt[:, None])[:, 0]
                other = out.masked_fill(torch.nn.functional.one_hot(yt, out.shape[1]) > 0, -1e30)
                loss = (other.max(1).values - true).sum()
                (g,) = torch.autograd.grad(loss, d)
                with torch.no_grad():
                    g = g / g.norm(dim=1, keepdim=True).clamp_min(1e-30)
                    d = d + 2.5 * eps / steps * g
                    d = d * (eps / d.norm(dim=1, keepdim=True).clamp_min(eps)).clamp(max=1.0)
            with torch.no_grad():
                xa = x0 + d
                if clip:
                    xa = xa.clamp(*box)
                broken |= (tnet(xa).argmax(1) != yt).numpy()
    return broken


def run_case(key: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    case = CASES[key]
    net = load_case(case, tmp)
    x, y = mnist_test(2000) if case.data == "mnist" else cifar_from_vnnlib(case.path)
    xi = net.ir_inputs(x)
    pred = np.argmax(net.forward(xi), axis=1)
    keep = np.flatnonzero(pred == y)[: args.n]
    x, y, xi = x[keep], y[keep], xi[keep]
    out: dict[str, Any] = {
        "net": case.name,
        "images": len(keep),
        "eps": list(args.eps),
        "clock": "cpu" if args.cpu_clock else "wall",  # of every "seconds" below
    }

    t = clock.now()
    gb = compute_bound(net, args.global_method, timeout_s=args.global_timeout)
    lip = gb.value if gb.verified else None
    err = logit_error_bound(net, unit_roundoff("float64"), safety=4.0)(xi)
    glob = certified_radius(net.forward(xi), lip, labels=y, logit_error=err) if lip else None
    out["global"] = {
        "method": gb.method,
        "L": lip,
        "seconds": clock.now() - t,
        "certified": [
            float(np.mean(glob.correct & (glob.radius > e))) if glob is not None else 0.0
            for e in args.eps
        ],
        "median_radius": float(np.median(glob.radius)) if glob is not None else 0.0,
    }
    tnet = TorchNetwork.from_network(net, dtype=torch.float64, file_layout=False)
    broken = {e: pgd_broken(tnet, xi, y, e, case.box, args.restarts, args.steps) for e in args.eps}
    out["pgd_unbroken"] = [float(np.mean(~broken[e])) for e in args.eps]
    graph = build_graph(net)
    out["skipped"] = []
    for method in args.methods:
        check = get_method(method).applies if method != "auto" else None
        if check is not None and not check(graph):
            print(f"note: {method} does not apply to {case.name}: skipped", flush=True)
            out["skipped"].append(method)
            continue
        row: dict[str, Any] = {"certified": [], "seconds_per_input": [], "unsound": 0}
        for e in args.eps:
            t = clock.now()
            try:
                res = certify_local(
                    net,
                    xi,
                    labels=y,
                    epsilon=e,
                    method=method,
                    global_bound=lip,
                    time_budget_s=args.time_budget,
                )
            except NotApplicable as exc:  # a method refusing this net (e.g. its activation)
                print(f"note: {method} does not apply to {case.name}: {exc}", flush=True)
                out["skipped"].append(method)
                break
            row["seconds_per_input"].append((clock.now() - t) / len(xi))
            cert = np.asarray(res.certified, bool) & np.asarray(res.correct, bool)
            row["certified"].append(float(np.mean(cert)))
            row["unsound"] += int(np.sum(cert & broken[e]))
        if method in out["skipped"]:
            continue
        if args.radius and (args.radius_methods is None or method in args.radius_methods):
            t = clock.now()
            res = certify_local(
                net, xi, labels=y, method=method, global_bound=lip, time_budget_s=args.time_budget
            )
            row["radius_seconds_per_input"] = (clock.now() - t) / len(xi)
            row["median_radius"] = float(np.median(res.radius))
            row["radii"] = [float(r) for r in res.radius]
            # every certified radius attacked at its own size: a break there is unsound
            pos = np.flatnonzero(np.asarray(res.radius) > 0)
            hit = pgd_broken(
                tnet,
                xi[pos],
                y[pos],
                np.asarray(res.radius)[pos],
                case.box,
                args.restarts,
                args.steps,
            )
            row["unsound_radii"] = int(np.sum(hit))
        out[method] = row
    return out


def markdown(res: dict[str, Any], methods: list[str]) -> str:
    methods = [m for m in methods if m in res]  # skipped: not applicable to this net
    g = res["global"]
    per = "CPU s/input" if res["clock"] == "cpu" else "wall s/input"
    lip = "none" if g["L"] is None else f"{g['L']:.4g}"
    head = ["l2 eps", f"global L = {lip} ({g['method']})", *methods, "PGD ceiling"]
    lines = [
        f"**{res['net']}**, {res['images']} correctly classified images",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for i, e in enumerate(res["eps"]):
        cells = [f"{e:g}", f"{100 * g['certified'][i]:.0f}%"]
        for m in methods:
            r = res[m]
            cells.append(f"{100 * r['certified'][i]:.0f}% ({r['seconds_per_input'][i]:.3g} {per})")
        cells.append(f"{100 * res['pgd_unbroken'][i]:.0f}%")
        lines.append("| " + " | ".join(cells) + " |")
    for m in methods:
        r = res[m]
        extra = ""
        if "median_radius" in r:
            extra = (
                f"; median largest radius {r['median_radius']:.3g} "
                f"({r['radius_seconds_per_input']:.3g} {per}); PGD breaks "
                f"{r['unsound_radii']} certified radii"
            )
        lines.append(f"\n{m}: unsound answers {r['unsound']}{extra}")
    for m in res.get("skipped", []):
        lines.append(f"\n{m}: not applicable to this network (skipped)")
    lines.append(f"global: median radius {g['median_radius']:.3g}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--nets",
        default="256x2,256x4,256x6,relu9x200,sigmoid6x200,oval-base,oval-deep,oval-wide,lbdn",
        help=f"comma list of {', '.join(CASES)}",
    )
    p.add_argument("--methods", default="crown,auto")
    p.add_argument("--n", type=int, default=100, help="correctly classified images per net")
    p.add_argument("--eps", default=",".join(map(str, EPS)))
    p.add_argument("--time-budget", type=float, default=10.0)
    p.add_argument("--radius", action="store_true", help="also the largest-radius search")
    p.add_argument(
        "--radius-methods", help="comma list: the radius search only for these (default: all)"
    )
    p.add_argument("--global-method", default="auto")
    p.add_argument("--global-timeout", type=float, default=300.0)
    p.add_argument("--restarts", type=int, default=5)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument(
        "--quick", action="store_true", help="10 images, 256x2, crown, naive global, 2 restarts"
    )
    p.add_argument(
        "--cpu-clock",
        action="store_true",
        help="budgets and the seconds per input printed in this process's CPU seconds "
        "(a shared, loaded machine); without it, wall seconds",
    )
    p.add_argument("--json", type=Path, help="write the raw numbers here")
    args = p.parse_args()
    if args.quick:
        args.nets, args.methods, args.n, args.restarts, args.steps = "256x2", "crown", 10, 2, 20
        args.global_method = "naive"
    args.eps = [float(v) for v in str(args.eps).split(",")]
    args.methods = [m for m in str(args.methods).split(",") if m]
    if args.radius_methods is not None:
        args.radius_methods = [m for m in str(args.radius_methods).split(",") if m]
    torch.set_num_threads(1)
    if args.cpu_clock:
        clock.CLOCK = time.process_time
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for key in [k for k in args.nets.split(",") if k]:
            t = time.perf_counter()
            res = run_case(key, args, Path(tmp))
            res["wall_s"] = time.perf_counter() - t
            results.append(res)
            print(markdown(res, args.methods), f"\n(wall {res['wall_s']:.0f} s)\n", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=_nan_safe))


def _nan_safe(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else str(v)


if __name__ == "__main__":
    main()
