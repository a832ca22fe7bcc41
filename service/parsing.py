"""Check untrusted model uploads in a child process with a time limit, then parse them.

A pathological file (deeply nested protobuf, a huge declared tensor, a slow conversion, a
parser crash) must not stall or kill the API process. So an upload is first parsed by
``sdp.importers.load_model`` in a separate ``python -m service.parsing`` process (bytes on
stdin, one JSON line on stdout, address space capped, killed at the time limit). Only bytes
the child accepted are then parsed in-process. Nothing is ever unpickled: the child reports
JSON, not objects.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from sdp.errors import ModelRejected
from sdp.ir import Network

#: Address-space cap of the checking process (bytes).
CHILD_MEMORY_LIMIT = 4 << 30


def check_model(data: bytes, timeout_s: float) -> None:
    """Raise ``ModelRejected`` unless the importers accept ``data`` within ``timeout_s``."""
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"})
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "service.parsing"],
            input=data,
            capture_output=True,
            timeout=timeout_s,
            env=env,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise ModelRejected(
            f"parsing the model took longer than {timeout_s:g} s", code="parse-timeout"
        ) from None
    try:
        report = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise ModelRejected(
            f"the model parser died on this file (exit status {proc.returncode})",
            code="parser-crashed",
        ) from None
    if not report.get("ok"):
        raise ModelRejected(str(report.get("detail")), code=str(report.get("code")))


def parse_model(data: bytes, timeout_s: float) -> Network:
    """The network of an upload the child process accepted (see module docstring)."""
    check_model(data, timeout_s)
    from sdp.importers import load_model

    return load_model(data)


def _child_main() -> None:
    """Child side: read the bytes, parse, print one JSON line."""
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (CHILD_MEMORY_LIMIT, CHILD_MEMORY_LIMIT))
    except (ImportError, ValueError, OSError):
        pass
    data = sys.stdin.buffer.read()
    try:
        from sdp.errors import LipcertError
        from sdp.importers import load_model

        try:
            load_model(data)
            report = {"ok": True}
        except LipcertError as exc:
            report = {"ok": False, "code": exc.code, "detail": exc.detail}
    except MemoryError:
        report = {"ok": False, "code": "too-large", "detail": "the model needs too much memory"}
    except RecursionError:
        report = {"ok": False, "code": "malformed", "detail": "the model is nested too deeply"}
    except Exception as exc:  # an importer bug is still a refusal, never an API crash
        report = {
            "ok": False,
            "code": "unparseable-model",
            "detail": f"the model could not be parsed ({type(exc).__name__})",
        }
    sys.stdout.write(json.dumps(report) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    _child_main()
