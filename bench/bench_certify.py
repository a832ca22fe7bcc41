"""Certify throughput and latency through a real ``lipcert serve`` vs raw torch, same run.

Model: vnncomp2021 mnistfc ``mnist-net_256x2.onnx`` (784-256-256-10), naive bound.
1. raw: ``TorchNetwork`` from the same IR, in this process, ``--threads`` torch threads,
   the server's dtype: rows/s of a forward pass on a batch of ``--batch`` rows (float32 ->
   float64 cast included, as in the server).
2. HTTP batch: POST /v1/models/{id}/certify with the same batch, end to end (the client
   decodes the answer into arrays / Python objects; request bodies are pre-encoded):
   .npy body -> .npz answer (``Accept: application/x-npz``), .npy body -> per-row JSON,
   JSON body -> per-row JSON. Raw and .npy runs alternate (``--repeats`` rounds of raw, npz,
   JSON answer); the ratio to raw is the median over rounds of raw time / HTTP time, so slow
   changes in machine load cancel.
3. latency: ``--requests`` single-input JSON certify calls from an asyncio httpx client with
   at most ``--concurrency`` in flight, loopback: p50/p99 and requests/s; and the trivial
   ``GET /v2/health/live`` at 1 in flight (framework + client + machine floor).
4. ``--stages``: the server-side stages of one batch request timed in-process (no HTTP).
5. ``--thread-cpu N``: CPU time per ``.npy`` -> ``.npz`` batch request of each server thread
   (event loop, inference worker, ...), from ``/proc/<pid>/task/*/sched`` (Linux) over N
   sequential requests. CPU time, unlike wall-clock ratios, barely depends on other load on
   the machine. ``--cpu-only`` skips the throughput rounds and the latency runs.

Usage::

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 \\
        .venv/bin/python bench/bench_certify.py [--threads 1] [--dtype float64] [--stages]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(os.environ.get("LIPCERT_FIXTURES", ROOT.parent / "shared" / "fixtures"))
MODEL = FIXTURES / "vnncomp2021" / "benchmarks" / "mnistfc" / "mnist-net_256x2.onnx"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(data_dir: str, threads: int, dtype: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = dict(os.environ)
    env.update(
        LIPCERT_DATA_DIR=data_dir,
        LIPCERT_DEVICE="cpu",
        LIPCERT_TORCH_THREADS=str(threads),
        LIPCERT_CPU_DTYPE=dtype,
        LIPCERT_LOG_LEVEL="warning",
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        OPENBLAS_NUM_THREADS=str(threads),
    )
    cmd = [sys.executable, "-c", "from service.cli import main; main()", "serve"]
    proc = subprocess.Popen(
        [*cmd, "--port", str(port), "--log-level", "warning"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/v2/health/ready", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("server did not start")


def thread_cpu_ms(pid: int) -> dict[str, float]:
    """CPU time (ms) of each thread of process ``pid`` so far, keyed ``name[tid]`` (Linux)."""
    out: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            sched = (task / "sched").read_text()
        except OSError:  # the thread ended
            continue
        for line in sched.splitlines():
            if line.startswith("se.sum_exec_runtime"):
                main = " (main: event loop)" if task.name == str(pid) else ""
                out[f"{name}[{task.name}]{main}"] = float(line.split(":")[1])
    return out


def per_request_thread_cpu(pid: int, fn, n: int) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """Mean CPU ms per call of ``fn`` spent by each thread of process ``pid`` (> 0.05 ms);
    empty for ``n`` = 0."""
    if n <= 0:
        return {}
    before = thread_cpu_ms(pid)
    for _ in range(n):
        fn()
    after = thread_cpu_ms(pid)
    used = {k: (v - before.get(k, 0.0)) / n for k, v in after.items()}
    return {k: v for k, v in sorted(used.items(), key=lambda kv: -kv[1]) if v > 0.05}


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def raw_forward(x: np.ndarray, threads: int, dtype: str):  # type: ignore[no-untyped-def]
    """A function running the raw in-process forward pass of the batch (cast included)."""
    import torch

    from models.runtime import TorchNetwork
    from sdp.importers import load_model_file

    torch.set_num_threads(threads)
    tdtype = torch.float64 if dtype == "float64" else torch.float32
    net = TorchNetwork.from_network(load_model_file(MODEL), dtype=tdtype)

    def run() -> None:
        with torch.inference_mode():
            net(torch.from_numpy(x).to(tdtype)).numpy()

    run()
    return run


async def latency(
    url: str, mid: str, x: np.ndarray, n: int, concurrency: int, *, live: bool = False
) -> dict:
    """Single-input JSON certify calls (or ``GET /v2/health/live`` with ``live``)."""
    sem = asyncio.Semaphore(concurrency)
    lat: list[float] = []
    bodies = [json.dumps({"inputs": [x[i % len(x)].tolist()]}).encode() for i in range(n)]
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as c:

        async def one(body: bytes) -> None:
            async with sem:
                t0 = time.perf_counter()
                if live:
                    r = await c.get("/v2/health/live")
                else:
                    r = await c.post(
                        f"/v1/models/{mid}/certify",
                        content=body,
                        headers={"content-type": "application/json"},
                    )
                r.json()
                lat.append(time.perf_counter() - t0)
                assert r.status_code == 200, r.text

        await asyncio.gather(*[one(bodies[i]) for i in range(50)])  # warm-up
        lat.clear()
        t0 = time.perf_counter()
        await asyncio.gather(*[one(b) for b in bodies])
        wall = time.perf_counter() - t0
    q = np.percentile(np.array(lat) * 1e3, [50, 90, 99])
    return {"p50_ms": q[0], "p90_ms": q[1], "p99_ms": q[2], "req_per_s": n / wall}


def server_stages(x: np.ndarray, threads: int, dtype: str, repeats: int) -> dict[str, float]:
    """Median ms of each server-side stage of one batch certify request, in-process."""
    import tempfile as tf

    import orjson
    import torch

    from service.bodies.media import npz_bytes
    from service.bodies.npy import load_npy
    from service.certification import certify_columns, rows_payload
    from service.documents import StoredBound
    from service.settings import Settings
    from service.storage import Storage
    from service.worker import InferenceWorker

    torch.set_num_threads(threads)
    with tf.TemporaryDirectory() as d:
        storage = Storage(d)
        rec = storage.save_model(MODEL.read_bytes(), MODEL.name)
        worker = InferenceWorker(storage, Settings(data_dir=d, device="cpu", cpu_dtype=dtype))
        worker.dtype_name = dtype
        module = worker._module(rec.id)
        bound = StoredBound(1.0, method="naive", verified=True)
        buf = io.BytesIO()
        np.save(buf, x)
        body = buf.getvalue()
        out: dict[str, float] = {}

        def timed(name: str, fn):  # type: ignore[no-untyped-def]
            fn()
            out[name] = median_time(fn, repeats) * 1e3
            return fn()

        xs = timed("parse .npy body (header, float64 cast, finiteness)", lambda: load_npy(body))
        logits = timed("forward pass (worker, same as raw)", lambda: worker._forward(module, xs))
        err = timed("rounding bound E(x) (input norms)", lambda: worker.logit_error(rec.id, xs))
        cert = timed(
            "margins and radii (columns)",
            lambda: certify_columns(
                logits, bound, labels=None, return_logits=False, epsilon=0.0, logit_error=err
            ),
        )
        npz = timed(
            "encode .npz answer",
            lambda: npz_bytes(cert.columns, {**cert.summary, "model_id": rec.id}),
        )
        js = timed("encode per-row JSON answer", lambda: orjson.dumps(rows_payload(cert)))
        timed("client: decode .npz", lambda: dict(np.load(io.BytesIO(npz))))
        timed("client: decode per-row JSON (httpx .json())", lambda: json.loads(js))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--stages", action="store_true", help="also time server stages in-process")
    ap.add_argument(
        "--thread-cpu", type=int, default=0, metavar="N", help="server CPU per thread, N requests"
    )
    ap.add_argument("--cpu-only", action="store_true", help="only --stages and --thread-cpu")
    args = ap.parse_args()

    load_start = os.getloadavg()
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, size=(args.batch, 784)).astype(np.float32)
    raw = raw_forward(x, args.threads, args.dtype)
    stages = server_stages(x, args.threads, args.dtype, args.repeats) if args.stages else {}

    with tempfile.TemporaryDirectory() as data_dir:
        proc, url = start_server(data_dir, args.threads, args.dtype)
        try:
            c = httpx.Client(base_url=url, timeout=600)
            up = c.post("/v1/models", files={"file": (MODEL.name, MODEL.read_bytes())})
            mid = up.json()["id"]
            job = c.post(f"/v1/models/{mid}/bounds", json={"method": "naive"}).json()
            job_id = job.get("job_id") or job.get("id")
            for _ in range(1200):
                status = c.get(f"/v1/jobs/{job_id}").json()["status"]
                if status in ("succeeded", "failed"):
                    break
                time.sleep(0.1)
            assert status == "succeeded", status
            buf = io.BytesIO()
            np.save(buf, x)
            npy = buf.getvalue()
            js = json.dumps({"inputs": x.astype(np.float64).tolist()}).encode()
            path = f"/v1/models/{mid}/certify"
            npy_type = {"content-type": "application/x-npy"}

            def post_npy_npz() -> None:
                r = c.post(path, content=npy, headers={**npy_type, "accept": "application/x-npz"})
                assert r.status_code == 200, r.text
                with np.load(io.BytesIO(r.content), allow_pickle=False) as z:
                    assert len(z["radius"]) == args.batch

            def post_npy() -> None:
                r = c.post(path, content=npy, headers=npy_type)
                assert r.status_code == 200, r.text
                assert len(r.json()["results"]) == args.batch

            def post_json() -> None:
                r = c.post(path, content=js, headers={"content-type": "application/json"})
                assert r.status_code == 200, r.text
                assert len(r.json()["results"]) == args.batch

            post_npy_npz()
            post_npy()
            cpu = per_request_thread_cpu(proc.pid, post_npy_npz, args.thread_cpu)
            if args.cpu_only:
                print(f"model {MODEL.name}, batch {args.batch}, dtype {args.dtype}")
                for name, ms in stages.items():
                    print(f"  stage {name:52s} {ms:8.2f} ms")
                report_thread_cpu(cpu, args.thread_cpu)
                return
            # raw and HTTP runs interleaved, so load changes hit all of them alike; the
            # ratio is taken per round (raw run right before the HTTP runs) and its median kept
            times: dict[str, list[float]] = {"raw": [], "npz": [], "npy": []}
            for _ in range(args.repeats):
                times["raw"].append(median_time(raw, 1))
                times["npz"].append(median_time(post_npy_npz, 1))
                times["npy"].append(median_time(post_npy, 1))
            ratios = {
                k: statistics.median(r / t for r, t in zip(times["raw"], times[k], strict=True))
                for k in ("npz", "npy")
            }
            rates = {k: args.batch / statistics.median(v) for k, v in times.items()}
            json_rate = args.batch / median_time(post_json, max(3, args.repeats // 4))
            live = asyncio.run(latency(url, mid, x, args.requests, 1, live=True))
            lats = {
                conc: asyncio.run(latency(url, mid, x, args.requests, conc))
                for conc in args.concurrency
            }
            batch_text = c.get("/metrics").text
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(30)

    load_end = os.getloadavg()
    batches = [ln for ln in batch_text.splitlines() if ln.startswith("lipcert_inference_batch_")]
    print(f"model {MODEL.name}, batch {args.batch}, dtype {args.dtype}, threads {args.threads}")
    print(f"load average (1, 5, 15 min) at start {load_start}, at end {load_end}")
    for name, ms in stages.items():
        print(f"  stage {name:52s} {ms:8.2f} ms")
    print(f"raw torch forward (in-process, interleaved)         {rates['raw']:12.0f} rows/s")
    for name, key in ((".npy body -> .npz answer", "npz"), (".npy body -> per-row JSON", "npy")):
        print(
            f"HTTP certify {name:37s} {rates[key]:12.0f} rows/s  "
            f"(median per-round ratio {ratios[key]:.2f}x raw)"
        )
    print(
        f"HTTP certify {'JSON body -> per-row JSON':37s} {json_rate:12.0f} rows/s  "
        f"({json_rate / rates['raw']:.2f}x raw)"
    )
    print(
        f"GET /v2/health/live, 1 in flight: p50 {live['p50_ms']:.2f} ms, "
        f"p90 {live['p90_ms']:.2f} ms, p99 {live['p99_ms']:.2f} ms"
    )
    for conc, lat in lats.items():
        print(
            f"single-input JSON, {conc:3d} in flight, {args.requests} requests: "
            f"p50 {lat['p50_ms']:.2f} ms, p90 {lat['p90_ms']:.2f} ms, "
            f"p99 {lat['p99_ms']:.2f} ms, {lat['req_per_s']:.0f} req/s"
        )
    for ln in batches:
        if "_sum" in ln or "_count" in ln:
            print("  " + ln)
    report_thread_cpu(cpu, args.thread_cpu)


def report_thread_cpu(cpu: dict[str, float], n: int) -> None:
    if n:
        print(f"server CPU time per .npy -> .npz request, by thread ({n} sequential requests):")
        for name, ms in cpu.items():
            print(f"  {name:40s} {ms:8.2f} ms")


if __name__ == "__main__":
    main()
