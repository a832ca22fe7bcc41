"""Parse untrusted model uploads in a child process with a time limit.

A pathological file (deeply nested protobuf, a huge declared tensor, a slow conversion) must
not stall or crash the API process. Each upload is parsed by ``sdp.importers.load_model`` in a
fresh process from a ``forkserver`` (which has ``sdp.importers`` preloaded, so start-up is
cheap); on timeout the child is killed. The child sends back either the parsed
:class:`~sdp.ir.Network` (our own object, pickled by our own code) or the importer's error.
"""

from __future__ import annotations

import multiprocessing as mp
import multiprocessing.connection
import threading
from typing import Any

from sdp.errors import LipcertError, ModelRejected
from sdp.ir import Network

_CTX: Any = None
_CTX_LOCK = threading.Lock()


def _context() -> Any:
    global _CTX
    with _CTX_LOCK:
        if _CTX is None:
            method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
            ctx = mp.get_context(method)
            if method == "forkserver":
                ctx.set_forkserver_preload(["sdp.importers", "sdp.ir"])
            _CTX = ctx
        return _CTX


def _child(conn: multiprocessing.connection.Connection, data: bytes) -> None:
    """Runs in the child: parse and send ("ok", net) or ("error", (cls, code, detail))."""
    try:
        from sdp.importers import load_model

        net = load_model(data)
        conn.send(("ok", net))
    except LipcertError as exc:
        conn.send(("error", (type(exc).__name__, exc.code, exc.detail)))
    except MemoryError:
        conn.send(("error", ("ModelRejected", "too-large", "the model needs too much memory")))
    except Exception as exc:  # an importer bug: still a refusal, never a crash of the API
        detail = f"the model could not be parsed ({type(exc).__name__})"
        conn.send(("error", ("ModelRejected", "unparseable-model", detail)))
    finally:
        conn.close()


def parse_model(data: bytes, timeout_s: float) -> Network:
    """The parsed network, or ``ModelRejected`` (``parse-timeout`` when over the limit)."""
    ctx = _context()
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(send, data), daemon=True)
    proc.start()
    send.close()
    try:
        if not recv.poll(timeout_s):
            raise ModelRejected(
                f"parsing the model took longer than {timeout_s:g} s", code="parse-timeout"
            )
        try:
            status, payload = recv.recv()
        except (EOFError, OSError) as exc:
            raise ModelRejected(
                "the model parser died on this file (out of memory?)", code="parser-crashed"
            ) from exc
    finally:
        recv.close()
        if proc.is_alive():
            proc.kill()
        proc.join(timeout=5)
    if status == "ok":
        return payload  # type: ignore[no-any-return]
    _, code, detail = payload
    raise ModelRejected(detail, code=code)
