"""A/B benchmark of the structured LipSDP solver: two source trees, interleaved, one process
per (tree, net) run.

Usage (from the repository root; OLD is another checkout, e.g. ``git worktree add /tmp/old
REV``):

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 \\
        .venv/bin/python bench/ab_structured.py --old /tmp/old --new . \\
        --nets mnistfc-256x2 mnistfc-256x6 eran-mnist_relu_9_200 [--rounds 1] [--json OUT]

Each run is ``bench/bench_fast_lipsdp.py --nets NET --no-scs`` of the NEW tree's script with
the tree's ``sdp`` first on PYTHONPATH, so both solve the same LMI from the same loader; per
run it records the wall and CPU seconds of the child process (CPU from ``wait4``: less
sensitive than wall time to other jobs on a shared machine), the script's iterations,
certified bound and peak RSS, and the load average. Order per round: old, new for each net.
``--old-glibc-malloc`` runs the old tree under glibc's malloc thresholds (the script applies
lipcert's solver-process ones by default, :mod:`service.malloc_tuning`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def run_one(tree: Path, script: Path, net: str, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=str(tree.resolve()))
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, str(script), "--nets", net, "--no-scs", "--json", out.name, *extra],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        err = proc.stderr.read() if proc.stderr else ""
        if os.waitstatus_to_exitcode(status) != 0:
            return {"error": err[-2000:]}
        data = json.loads(Path(out.name).read_text())
    row = data["nets"][net]
    st = row["structured"]
    return {
        "process_wall_s": wall,
        "process_cpu_s": usage.ru_utime + usage.ru_stime,
        "solve_s": st.get("solve_s"),
        "iterations": st.get("iterations"),
        "bound": st.get("bound"),
        "certify_note": st.get("certify_note"),
        "rel_gap_bound": st.get("rel_gap_bound"),
        "peak_rss_mb": row.get("peak_rss_mb_after_structured"),
        "loadavg": os.getloadavg(),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--old", type=Path, required=True)
    ap.add_argument("--new", type=Path, default=Path("."))
    ap.add_argument("--nets", nargs="+", required=True)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument(
        "--old-glibc-malloc",
        action="store_true",
        help="run the OLD tree with glibc's malloc thresholds (bench_fast_lipsdp --glibc-malloc)",
    )
    args = ap.parse_args(argv)
    old_extra = ("--glibc-malloc",) if args.old_glibc_malloc else ()
    script = args.new / "bench" / "bench_fast_lipsdp.py"
    results: list[dict[str, Any]] = []
    print(
        json.dumps(
            {
                "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
                "loadavg_start": os.getloadavg(),
            }
        ),
        flush=True,
    )
    for rnd in range(args.rounds):
        for net in args.nets:
            for label, tree, extra in (("old", args.old, old_extra), ("new", args.new, ())):
                rec = {"round": rnd, "net": net, "tree": label, **run_one(tree, script, net, extra)}
                results.append(rec)
                print(json.dumps(rec), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
