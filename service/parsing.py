"""Check untrusted model uploads in a separate process with a time limit, then parse them.

A pathological file (deeply nested protobuf, a huge declared tensor, a slow conversion, a
parser crash) must not stall or kill the API process. So every upload is first parsed by
``sdp.importers.load_model`` outside it:

    API process --(length-prefixed bytes)--> checker server (``python -m service.parsing``,
    single-threaded, importers imported once) --fork--> one child per file: address space
    capped, parses, writes one JSON line, exits; killed when over the time limit.

Only bytes a child accepted are then parsed in-process. Nothing is ever unpickled: children
report JSON, not objects. Checks are serialised (one at a time per app).
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from typing import Any

from sdp.errors import ModelRejected
from sdp.ir import Network

#: Address-space cap of each checking child (bytes).
CHILD_MEMORY_LIMIT = 4 << 30
#: Time allowed for the checker server to start (imports), apart from the parse time limit.
STARTUP_TIMEOUT_S = 120.0
_HEADER = struct.Struct("<dQ")  # timeout_s, payload length


class _Server:
    """The checker server process, shared by every app in this process."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.proc: subprocess.Popen[bytes] | None = None

    def ensure(self) -> subprocess.Popen[bytes]:
        """The running server (started when absent or dead); call with ``lock`` held."""
        if self.proc is None or self.proc.poll() is not None:
            env = dict(os.environ)
            env.update({k: "1" for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")})
            env["OPENBLAS_NUM_THREADS"] = "1"
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "service.parsing"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                env=env,
            )
        return self.proc

    def discard(self) -> None:
        """Kill the server (after a failure); call with ``lock`` held."""
        if self.proc is not None:
            with contextlib.suppress(OSError):
                self.proc.kill()
            with contextlib.suppress(Exception):
                self.proc.communicate(timeout=5)
        self.proc = None


_SERVER = _Server()


class ModelChecker:
    """Checks uploads through the shared checker server with a per-check time limit."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s

    def start(self) -> None:
        """Start the server now; the first check would otherwise wait for its imports."""
        with _SERVER.lock:
            _SERVER.ensure()

    def check(self, data: bytes) -> None:
        """Raise ``ModelRejected`` unless the importers accept ``data`` within the limit."""
        with _SERVER.lock:
            server = _SERVER.ensure()
            try:
                assert server.stdin is not None and server.stdout is not None
                server.stdin.write(_HEADER.pack(self.timeout_s, len(data)) + data)
                server.stdin.flush()
                line = _readline(server.stdout.fileno(), STARTUP_TIMEOUT_S + self.timeout_s)
            except (OSError, ValueError):
                line = b""
            if not line:  # the server died or hung: start afresh next time
                _SERVER.discard()
                raise ModelRejected("the model checker failed on this file", code="parser-crashed")
        report = json.loads(line)
        if not report.get("ok"):
            raise ModelRejected(str(report.get("detail")), code=str(report.get("code")))

    def parse(self, data: bytes) -> Network:
        """The network of an upload the checker accepted (see module docstring)."""
        self.check(data)
        from sdp.importers import load_model

        return load_model(data)


def _readline(fd: int, timeout: float) -> bytes:
    """One line from a raw fd within ``timeout`` (b"" on EOF or timeout)."""
    deadline = time.monotonic() + timeout
    buf = b""
    while not buf.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return b""
        chunk = os.read(fd, 65536)
        if not chunk:
            return b""
        buf += chunk
    return buf


def _read_exact(stream: Any, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = stream.read(n - len(out))
        if not chunk:
            raise EOFError
        out += chunk
    return bytes(out)


def _check_in_child(data: bytes) -> dict[str, Any]:
    from sdp.errors import LipcertError
    from sdp.importers import load_model

    try:
        load_model(data)
        return {"ok": True}
    except LipcertError as exc:
        return {"ok": False, "code": exc.code, "detail": exc.detail}
    except MemoryError:
        return {"ok": False, "code": "too-large", "detail": "the model needs too much memory"}
    except RecursionError:
        return {"ok": False, "code": "malformed", "detail": "the model is nested too deeply"}
    except Exception as exc:  # an importer bug is still a refusal, never an API crash
        detail = f"the model could not be parsed ({type(exc).__name__})"
        return {"ok": False, "code": "unparseable-model", "detail": detail}


def _serve_one(data: bytes, timeout_s: float) -> dict[str, Any]:
    """Fork a child that parses ``data``; kill it after ``timeout_s``."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(r)
        try:
            import resource

            resource.setrlimit(resource.RLIMIT_AS, (CHILD_MEMORY_LIMIT, CHILD_MEMORY_LIMIT))
        except (ImportError, ValueError, OSError):
            pass
        report = _check_in_child(data)
        os.write(w, (json.dumps(report) + "\n").encode())
        os._exit(0)
    os.close(w)
    try:
        line = _readline(r, timeout_s)
    finally:
        os.close(r)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    if line:
        return dict(json.loads(line))
    return {
        "ok": False,
        "code": "parse-timeout",
        "detail": f"parsing the model took longer than {timeout_s:g} s (or crashed the parser)",
    }


def _server_main() -> None:
    """Checker server: import once, then fork one child per request."""
    import sdp.importers  # noqa: F401  (imported once, inherited by every child)

    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    while True:
        try:
            timeout_s, n = _HEADER.unpack(_read_exact(stdin, _HEADER.size))
            data = _read_exact(stdin, n)
        except EOFError:
            return
        stdout.write((json.dumps(_serve_one(data, timeout_s)) + "\n").encode())
        stdout.flush()


if __name__ == "__main__":
    _server_main()
