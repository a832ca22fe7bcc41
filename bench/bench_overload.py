"""Overload through a real ``lipcert serve``: goodput, refusals, resets, memory and liveness.

Model: vnncomp2021 mnistfc ``mnist-net_256x2.onnx`` with a naive bound. Scenarios (each for
``--seconds``, clients are threads with a stock ``http.client`` connection each, so a reset
shows as ``ConnectionResetError``/``BrokenPipeError`` exactly as a client sees it):

* ``npy``: every client POSTs a 4096 x 784 float32 ``.npy`` body (12.8 MB) to certify, again
  and again; a 503 is retried after its ``Retry-After``. Counted: answers 200 per second
  (goodput), 503s, connection resets and other errors; the server's RSS (``/proc``) before,
  at its peak, and ``--settle`` seconds after the burst.
* ``json``: every client POSTs a single-input JSON certify body, again and again.

Goodput counts the answers 200 in the last three quarters of a run. During those, a prober
(its own process) GETs ``/v2/health/live`` every 20 ms on its own connection: p50/p99 of
those latencies. Usage::

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_overload.py npy --clients 10 50
    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_overload.py json --clients 200
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_certify import MODEL, free_port


@dataclass
class Tally:
    ok: int = 0
    busy: int = 0
    resets: int = 0
    other: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def start_server(data_dir: str, settings: dict[str, str]) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    env = dict(os.environ, LIPCERT_DATA_DIR=data_dir, LIPCERT_DEVICE="cpu")
    env.update({k: "1" for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")})
    env.update(settings)
    exe = Path(sys.executable).with_name("lipcert")
    proc = subprocess.Popen(
        [str(exe), "serve", "--port", str(port), "--log-level", "warning"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while True:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/v2/health/ready")
            if conn.getresponse().status == 200:
                conn.close()
                return proc, port
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("server did not start")
        time.sleep(0.2)


def request(port: int, method: str, path: str, body: bytes = b"", ctype: str = "") -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    headers = {"content-type": ctype} if ctype else {}
    conn.request(method, path, body=body or None, headers=headers)
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return json.loads(data)


def setup_model(port: int) -> str:
    boundary = "lipcertbench"
    payload = MODEL.read_bytes()
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="m.onnx"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + payload
        + f"\r\n--{boundary}--\r\n".encode()
    )
    mid = request(port, "POST", "/v1/models", body, f"multipart/form-data; boundary={boundary}")[
        "id"
    ]
    job = request(
        port,
        "POST",
        f"/v1/models/{mid}/bounds",
        json.dumps({"method": "naive"}).encode(),
        "application/json",
    )
    while request(port, "GET", f"/v1/jobs/{job['job_id']}")["status"] not in (
        "succeeded",
        "failed",
    ):
        time.sleep(0.2)
    return str(mid)


def client_loop(
    port: int, path: str, body: bytes, ctype: str, stop: threading.Event, tally: Tally
) -> None:
    conn: http.client.HTTPConnection | None = None
    while not stop.is_set():
        try:
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
            conn.request("POST", path, body=body, headers={"content-type": ctype})
            resp = conn.getresponse()
            resp.read()
            if resp.status == 200:
                with tally.lock:
                    tally.ok += 1
            elif resp.status == 503:
                with tally.lock:
                    tally.busy += 1
                stop.wait(float(resp.getheader("retry-after") or 1))
            else:
                with tally.lock:
                    tally.other.append(str(resp.status))
            if (resp.getheader("connection") or "").lower() == "close":
                conn.close()
                conn = None
        except (ConnectionResetError, BrokenPipeError):
            with tally.lock:
                tally.resets += 1
            conn = None
        except (OSError, http.client.HTTPException) as exc:
            with tally.lock:
                tally.other.append(type(exc).__name__)
            conn = None


_PROBER = """
import http.client, sys, time
port, stop_after = int(sys.argv[1]), float(sys.argv[2])
conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
end = time.monotonic() + stop_after
while time.monotonic() < end:
    time.sleep(0.02)
    t0 = time.perf_counter()
    try:
        conn.request("GET", "/v2/health/live")
        conn.getresponse().read()
    except (OSError, http.client.HTTPException):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        continue
    print(time.perf_counter() - t0, flush=True)
"""


def start_prober(port: int, seconds: float) -> subprocess.Popen[str]:
    """GET /v2/health/live every 20 ms for ``seconds`` from its own process (so that the
    clients' threads do not delay it), one latency per line."""
    return subprocess.Popen(
        [sys.executable, "-c", _PROBER, str(port), str(seconds)],
        stdout=subprocess.PIPE,
        text=True,
    )


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1e3 if values else float("nan")


def run(
    port: int,
    pid: int,
    clients: int,
    seconds: float,
    path: str,
    body: bytes,
    ctype: str,
    settle: float,
) -> dict:
    stop = threading.Event()
    tally = Tally()
    base = rss_bytes(pid)
    threads = [
        threading.Thread(target=client_loop, args=(port, path, body, ctype, stop, tally))
        for _ in range(clients)
    ]
    peak = base
    t0 = time.monotonic()
    for t in threads:
        t.start()
    warm = seconds / 4  # goodput counted after the first quarter (all clients started)
    ok_at_warm = None
    probe = start_prober(port, seconds - warm)
    while time.monotonic() - t0 < seconds:
        if ok_at_warm is None and time.monotonic() - t0 >= warm:
            ok_at_warm = tally.ok
        peak = max(peak, rss_bytes(pid))
        time.sleep(0.05)
    ok_at_stop = tally.ok
    stop.set()
    lat = [float(line) for line in probe.communicate(timeout=120)[0].split()]
    for t in threads:
        t.join(300)
    peak = max(peak, rss_bytes(pid))
    after_end = rss_bytes(pid)
    time.sleep(settle)
    after = rss_bytes(pid)
    t_small = time.perf_counter()
    request(port, "GET", "/v2/health/live")
    small_ms = (time.perf_counter() - t_small) * 1e3
    return {
        "clients": clients,
        "goodput_per_s": (ok_at_stop - (ok_at_warm or 0)) / (seconds - warm),
        "ok": tally.ok,
        "503": tally.busy,
        "resets": tally.resets,
        "other": dict(sorted({k: tally.other.count(k) for k in tally.other}.items())),
        "rss_base_mb": base / 2**20,
        "rss_peak_mb": peak / 2**20,
        "rss_end_mb": after_end / 2**20,
        f"rss_after_{settle:g}s_mb": after / 2**20,
        "live_p50_ms": pct(lat, 50),
        "live_p99_ms": pct(lat, 99),
        "live_max_ms": pct(lat, 100),
        "live_probes": len(lat),
        "first_request_after_ms": small_ms,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("scenario", choices=["npy", "json"])
    ap.add_argument("--clients", type=int, nargs="+", default=[10, 50])
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--settle", type=float, default=30.0, help="wait before the RSS after")
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--env", nargs="*", default=[], help="LIPCERT_X=value for the server")
    args = ap.parse_args()
    settings = dict(kv.split("=", 1) for kv in args.env)
    with tempfile.TemporaryDirectory() as data_dir:
        proc, port = start_server(data_dir, settings)
        try:
            mid = setup_model(port)
            path = f"/v1/models/{mid}/certify"
            rng = np.random.default_rng(0)
            if args.scenario == "npy":
                buf = io.BytesIO()
                np.save(buf, rng.random((args.rows, 784), dtype=np.float32))
                body, ctype = buf.getvalue(), "application/x-npy"
            else:
                body = json.dumps({"inputs": [rng.random(784).round(4).tolist()]}).encode()
                ctype = "application/json"
            print(
                f"# {args.scenario}: body {len(body)} bytes, {args.seconds:g} s per run, "
                f"server env {settings}",
                flush=True,
            )
            for clients in args.clients:
                out = run(port, proc.pid, clients, args.seconds, path, body, ctype, args.settle)
                print(json.dumps(out), flush=True)
        finally:
            proc.terminate()
            proc.wait(30)


if __name__ == "__main__":
    main()
