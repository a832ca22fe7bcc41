"""One solver process per job, and the loop that supervises it (used by both runners).

:class:`SolveProcess` spawns :func:`service.jobs.tasks.child_main` (multiprocessing *spawn*
context: a fresh interpreter, so thread limits apply and nothing is inherited by fork) and
reads its messages from a pipe. :func:`supervise` waits for the outcome while enforcing the
job's wall-clock limit and honouring cancellation; a killed process is really gone
(``SIGKILL`` + ``join``), and the child dies with its parent (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from service.documents import JobError, JsonValue
from service.jobs.base import JobSpec
from service.jobs.tasks import THREAD_ENV, ModelSource, child_main

_ENV_LOCK = threading.Lock()


@contextlib.contextmanager
def _thread_env(threads: int) -> Iterator[None]:
    """Set the BLAS/OpenMP thread variables while a child is being spawned, then restore.

    A spawned child re-imports the parent's main module (e.g. the ``lipcert`` script, which
    loads numpy) before its target runs, so the limits must already be in the environment it
    is started with; setting them inside the child would be too late.
    """
    with _ENV_LOCK:
        saved = {name: os.environ.get(name) for name in THREAD_ENV}
        os.environ.update({name: str(threads) for name in THREAD_ENV})
        try:
            yield
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


@dataclass(frozen=True)
class Outcome:
    """How a supervised solve ended: ``succeeded`` (result), ``failed`` (error), ``cancelled``."""

    status: str
    result: JsonValue = None
    error: JobError | None = None


class SolveProcess:
    """A spawned solver process for one job, with the read end of its message pipe."""

    def __init__(
        self, source: ModelSource, spec: JobSpec, *, threads: int = 1, device: str = "auto"
    ) -> None:
        ctx = mp.get_context("spawn")
        self._conn, child_conn = ctx.Pipe(duplex=False)
        self.process = ctx.Process(
            target=child_main,
            args=(child_conn, source, spec.to_dict(), max(1, int(threads)), device),
            name=f"lipcert-solve-{spec.model_id}",
            daemon=True,
        )
        with _thread_env(max(1, int(threads))):
            self.process.start()
        child_conn.close()
        self._eof = False
        self._closed = False
        self._close_lock = threading.Lock()

    @property
    def pid(self) -> int | None:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.is_alive()

    def messages(self, timeout: float) -> list[tuple[str, Any]]:
        """Messages available within ``timeout`` seconds (empty list if none)."""
        out: list[tuple[str, Any]] = []
        if self._eof:
            time.sleep(timeout)
            return out
        try:
            ready = self._conn.poll(timeout)
            while ready:
                out.append(self._conn.recv())
                ready = self._conn.poll(0)
        except (EOFError, OSError):
            self._eof = True
        return out

    def terminate(self) -> None:
        """SIGKILL the process and reap it (no-op when it already ended). Safe from any
        thread: the pipe is left to its reader, whose next poll sees EOF."""
        if self.process.is_alive():
            self.process.kill()
        self.process.join(timeout=10)

    def kill(self) -> None:
        """terminate() and close the pipe: for the thread that reads the messages."""
        self.terminate()
        self.close()

    def close(self) -> None:
        """Close the read end once (a second close would hit a reused descriptor)."""
        with self._close_lock:
            if not self._closed:
                self._closed = True
                self._conn.close()


def supervise(
    proc: SolveProcess,
    *,
    timeout_s: float | None,
    on_progress: Callable[[dict[str, Any]], None],
    cancelled: Callable[[], bool],
    on_tick: Callable[[], None] | None = None,
    tick_s: float = 0.2,
) -> Outcome:
    """Wait for ``proc``'s outcome.

    Kills the process and returns ``failed`` / ``timeout`` after ``timeout_s`` seconds of
    wall-clock time, or ``cancelled`` as soon as ``cancelled()`` is true; a process that exits
    without a result is ``failed`` / ``solver-crashed`` with its exit code.
    """
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    try:
        while True:
            for kind, payload in proc.messages(tick_s):
                if kind == "progress":
                    on_progress(payload)
                elif kind == "result":
                    return Outcome("succeeded", result=payload)
                elif kind == "error":
                    return Outcome("failed", error=JobError.from_json(payload))
            if on_tick is not None:
                on_tick()
            if cancelled():
                proc.kill()
                return Outcome("cancelled", error=JobError("cancelled", "cancelled"))
            if deadline is not None and time.monotonic() > deadline:
                proc.kill()
                return Outcome(
                    "failed",
                    error=JobError("timeout", f"timeout: no result within {timeout_s} s"),
                )
            if not proc.alive():
                for kind, payload in proc.messages(0.05):  # a result sent just before exit
                    if kind == "result":
                        return Outcome("succeeded", result=payload)
                    if kind == "error":
                        return Outcome("failed", error=JobError.from_json(payload))
                proc.process.join(timeout=5)
                code = proc.process.exitcode
                return Outcome(
                    "failed",
                    error=JobError(
                        "solver-crashed",
                        f"solver process exited without a result (exit code {code})",
                    ),
                )
    finally:
        proc.kill()
