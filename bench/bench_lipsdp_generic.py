"""LipSDP-Neuron: a generic dense LMI through CVXPY vs lipcert's block-tridiagonal form.

* generic: the textbook formulation, M = [A;B]^T [[-2abT, (a+b)T], [(a+b)T, -2T]] [A;B]
  + blkdiag(-rho I, 0, W_L^T W_L) with dense A = [blkdiag(W_0..W_{L-1}), 0] over the full
  (n0 + N) stack, solved with ``prob.solve()`` (CVXPY's default solver and settings);
* block: :func:`sdp.bounds.compute_bound` with ``solver="scs"`` (block form via ``cp.bmat``,
  exact SVD input reduction, SCS eps 1e-6);
* block-clarabel (optional mode): the same block form with Clarabel (interior point);
* auto: :func:`sdp.bounds.compute_bound` with the solver it picks by itself (the structured
  solver when registered).

Both generic and block answers are turned into certified bounds by
:func:`sdp.certificate.certify_multipliers` (the generic one too, so values are comparable).
Each case runs in a child process with a wall-clock limit; a case over the limit is "timeout".

Usage::

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 \\
        .venv/bin/python bench/bench_lipsdp_generic.py [--limit 300] [--markdown]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(os.environ.get("LIPCERT_FIXTURES", ROOT.parent / "shared" / "fixtures"))
NETS = ("random_weights", "mnist_weights", "random_784_128_128_10")
MODES = ("generic", "block", "auto")
SOLVER_OF_MODE = {"block": "scs", "block-clarabel": "clarabel", "auto": None}


def load_net(name: str):  # type: ignore[no-untyped-def]
    import scipy.io

    from sdp.ir import Activation, Dense, Network

    if name == "random_784_128_128_10":
        rng = np.random.default_rng(0)
        sizes = [784, 128, 128, 10]
        ws = [rng.standard_normal((sizes[i + 1], sizes[i])) / np.sqrt(sizes[i]) for i in range(3)]
    else:
        mat = scipy.io.loadmat(FIXTURES / "lipsdp" / f"{name}.mat")
        ws = [np.asarray(w, dtype=np.float64) for w in mat["weights"].ravel()]
    ops: list = []
    for i, w in enumerate(ws):
        ops.append(Dense(w, np.zeros(w.shape[0])))
        if i < len(ws) - 1:
            ops.append(Activation("relu"))
    return Network((ws[0].shape[1],), tuple(ops))


def generic(net) -> dict:  # type: ignore[no-untyped-def]
    import cvxpy as cp
    from scipy import linalg

    from sdp.certificate import Lmi, certify_multipliers

    lmi = Lmi.from_chain(net.chain())
    ws = lmi.weights
    n0, hidden = lmi.input_size, lmi.hidden_sizes
    n_hid = sum(hidden)
    a_mat = np.hstack([linalg.block_diag(*ws[:-1]), np.zeros((n_hid, hidden[-1]))])
    b_mat = np.hstack([np.zeros((n_hid, n0)), np.eye(n_hid)])
    al, be = np.concatenate(lmi.alpha), np.concatenate(lmi.beta)
    t = cp.Variable(n_hid, nonneg=True)
    rho = cp.Variable(nonneg=True)
    big_t = cp.diag(t)
    q = cp.bmat(
        [
            [cp.diag(cp.multiply(-2 * al * be, t)), cp.diag(cp.multiply(al + be, t))],
            [cp.diag(cp.multiply(al + be, t)), -2 * big_t],
        ]
    )
    ab = np.vstack([a_mat, b_mat])
    size = n0 + n_hid
    e0 = np.zeros((size, size))
    e0[:n0, :n0] = np.eye(n0)
    last = np.zeros((size, size))
    last[size - hidden[-1] :, size - hidden[-1] :] = ws[-1].T @ ws[-1]
    m = ab.T @ q @ ab - rho * e0 + last
    prob = cp.Problem(cp.Minimize(rho), [(m + m.T) / 2 << 0])
    t0 = time.perf_counter()
    prob.solve()
    solve_s = time.perf_counter() - t0
    split = np.cumsum(hidden)[:-1]
    rep = certify_multipliers(lmi, np.split(np.asarray(t.value).ravel(), split))
    return {
        "solver": prob.solver_stats.solver_name,
        "status": prob.status,
        "raw": float(np.sqrt(max(rho.value, 0.0))),
        "certified": float(np.sqrt(rep.rho)),
        "note": rep.note,
        "solve_s": solve_s,
    }


def ours(net, solver: str | None) -> dict:  # type: ignore[no-untyped-def]
    from sdp.bounds import compute_bound

    t0 = time.perf_counter()
    res = compute_bound(net, "lipsdp-neuron", solver=solver, lower_bound=False)
    return {
        "solver": res.solver,
        "status": "verified" if res.verified else "unverified",
        "certified": res.value,
        "note": "; ".join(res.notes),
        "solve_s": res.timings.get("solve_s", 0.0),
        "total_s": time.perf_counter() - t0,
    }


def run_case(net_name: str, mode: str) -> dict:
    net = load_net(net_name)
    t0 = time.perf_counter()
    out = generic(net) if mode == "generic" else ours(net, SOLVER_OF_MODE[mode])
    out["wall_s"] = time.perf_counter() - t0
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=float, default=300.0, help="seconds per case")
    ap.add_argument("--case", nargs=2, metavar=("NET", "MODE"))
    ap.add_argument("--nets", nargs="*", default=list(NETS))
    ap.add_argument("--modes", nargs="*", default=list(MODES))
    args = ap.parse_args()
    if args.case:
        print(json.dumps(run_case(*args.case)))
        return
    threads = {v: os.environ.get(v, "unset") for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    print(f"threads: {threads}; limit {args.limit:.0f} s per case", flush=True)
    print("| network | mode | solver | certified bound | solver sqrt(rho) | wall s | notes |")
    print("|---|---|---|---|---|---|---|", flush=True)
    for net_name in args.nets:
        for mode in args.modes:
            try:
                proc = subprocess.run(
                    [sys.executable, __file__, "--case", net_name, mode],
                    capture_output=True,
                    text=True,
                    timeout=args.limit,
                )
                if proc.returncode != 0:
                    tail = proc.stderr.strip().splitlines()[-1:] or ["?"]
                    print(f"| {net_name} | {mode} | | error | | | {tail[0][:80]} |", flush=True)
                    continue
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                raw = f"{r['raw']:.5f}" if "raw" in r else ""
                print(
                    f"| {net_name} | {mode} | {r['solver']} | {r['certified']:.5f} | {raw} "
                    f"| {r['wall_s']:.1f} | {r['note'][:90]} |",
                    flush=True,
                )
            except subprocess.TimeoutExpired:
                print(f"| {net_name} | {mode} | | timeout | | > {args.limit:.0f} | |", flush=True)


if __name__ == "__main__":
    main()
