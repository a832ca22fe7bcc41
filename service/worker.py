"""The inference worker: one thread owns the device and micro-batches concurrent requests.

Requests (``model_id``, inputs (rows, n0) float64 -- flat rows in the model *file's* layout,
what onnxruntime takes -- or :class:`LazyRows` that the worker thread casts and checks itself,
e.g. the received bytes of a .npy body) go into a bounded
queue; a full queue is refused at once (:class:`~service.errors.ServiceBusy`, 503 +
Retry-After) instead of piling up latency. The worker thread takes the first request, then
everything already waiting, then waits at most ``max_wait_ms`` for more until ``max_batch``
rows; rows of the same model run as one forward pass (big requests in chunks). Fast path: on
CPU, a request of at most ``INLINE_ROWS`` rows that is the only one in progress (routes count
theirs with :meth:`InferenceWorker.request`), finds the queue empty and the worker idle runs
on the caller's thread if the model's small passes take under ``INLINE_MAX_SECONDS``, saving
two thread hand-offs; under concurrent load the worker thread keeps the forward passes off the
event loop. A device lock keeps forward passes one at a time either way.
Models live on the device as
:class:`models.runtime.TorchNetwork` built from the *same IR* that was bounded, in an LRU
of ``model_cache_size`` entries; built with ``file_layout=True``, so a network with an
:class:`sdp.ir.InputLayout` (an ONNX input Transpose absorbed by the importer) gathers the
file-layout rows into the IR layout on the device. The logit error bound depends on the rows
only through ||x||, which that permutation keeps.

Device and precision: ``LIPCERT_DEVICE`` auto|cpu|cuda (auto = cuda when available). CUDA
runs float64 (TF32 disabled); CPU runs ``LIPCERT_CPU_DTYPE`` (float64 by default). Logits are
returned as float64 numpy arrays either way.

Sound radii: a radius is only valid for the EXACT margin. :meth:`InferenceWorker.logit_error`
gives, per input, a rigorous a priori bound E(x) = e0 + e1 ||x|| on ||computed - exact logits||
for the working precision (:mod:`sdp.rounding`, with a safety factor of 4 for library/cuDNN
algorithm constants); the certify routes shrink every margin by sqrt(2) E(x). In float64 the
loss is negligible; in float32 the a priori bound is loose (often larger than typical margins
of deep nets), which is why float64 is the default on every device.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from sdp.rounding import logit_error_bound, unit_roundoff
from service import metrics
from service.errors import NotFound, ServiceBusy
from service.settings import Settings
from service.storage import ModelNotFound, Storage

log = logging.getLogger("lipcert.worker")

#: Largest number of rows in one forward pass (bounds device memory for huge requests).
CHUNK_ROWS = 16384
_STOP = object()
#: Safety factor on every rounding term of the logit error bound (see module doc).
ROUNDING_SAFETY = 4.0
#: CPU requests of at most this many rows may run on the caller's thread when the worker is
#: idle and the queue empty (no thread hand-off for single-input latency) ...
INLINE_ROWS = 4
#: ... if the model's last small forward pass took at most this long (the event loop waits).
INLINE_MAX_SECONDS = 0.001


class LazyRows(Protocol):
    """Input rows not yet in float64 (e.g. :class:`service.bodies.npy_stream.RowBlock`, the received
    bytes of a .npy body): ``to_float64`` -- run on the worker thread, off the event loop --
    casts them to a C-contiguous float64 (rows, n0) array, checking them (InvalidInput)."""

    def __len__(self) -> int: ...

    def to_float64(self) -> np.ndarray: ...


#: Inputs of :meth:`InferenceWorker.infer`: float64 (rows, n0), or rows cast on the worker.
Rows = np.ndarray | LazyRows


@dataclass
class _Request:
    model_id: str
    x: Rows
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop
    with_error: bool = False  # deliver (logits, logit_error(x)) instead of logits


class InferenceWorker:
    """Owns the device; :meth:`infer` is the only entry point (async, thread-safe)."""

    def __init__(self, storage: Storage, settings: Settings) -> None:
        self.storage = storage
        self.settings = settings
        self.max_batch = settings.max_batch
        self.max_wait_s = settings.max_wait_ms / 1000.0
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=settings.queue_size)
        self._models: OrderedDict[str, Any] = OrderedDict()
        self._models_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.device = "cpu"
        self.dtype_name = settings.cpu_dtype
        self._error_bounds: dict[str, Any] = {}
        self._device_lock = threading.Lock()  # held for every forward pass, whatever thread
        self._collecting = False  # the worker thread holds requests (batch window or pass)
        self._requests = 0  # HTTP requests in progress that use the worker (event loop only)
        self._slots: asyncio.Semaphore | None = None  # see :meth:`slot`
        self._small_cost: dict[str, float] = {}  # model -> seconds of its last small pass
        self._stopping = False  # stop() was called: queued and new requests are refused

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self._stopping = False
        # torch (and models.runtime, which imports it) load when the worker starts, not when
        # service.worker is imported: the CLI, job processes and tests import this module
        # without needing torch (~1 s of start-up)
        import torch

        from models.runtime import resolve_device

        self.device = resolve_device(self.settings.device)
        self.dtype_name = "float64" if self.device == "cuda" else self.settings.cpu_dtype
        if self.device == "cuda":  # TF32 would void the rounding model of sdp.rounding
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        torch.set_num_threads(self.settings.torch_threads)
        self._slots = asyncio.Semaphore(self.settings.request_concurrency)
        self._thread = threading.Thread(target=self._run, name="lipcert-inference", daemon=True)
        self._thread.start()
        log.info("inference worker on %s (%s)", self.device, self.dtype_name)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the worker thread after the batch in hand; every request still queued (or
        submitted from now on) is answered with :class:`ServiceBusy` instead of waiting
        forever for a thread that is gone."""
        if self._thread is None:
            return
        self._stopping = True
        self._queue.put(_STOP)
        self._thread.join(timeout)
        self._thread = None
        self._refuse_queued()

    def _refuse_queued(self) -> None:
        """Answer every request left in the queue with ServiceBusy (the worker is stopping).

        A stop marker found on the way is put back: a worker thread still busy with its last
        batch must find it."""
        marker = False
        while True:
            try:
                req = self._queue.get_nowait()
            except queue.Empty:
                break
            if req is _STOP:
                marker = True
            elif isinstance(req, _Request):
                _deliver(req, error=ServiceBusy("the inference worker is stopping"))
        if marker:
            self._queue.put(_STOP)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def queue_depth(self) -> int:
        """Inference requests waiting for the worker thread."""
        return self._queue.qsize()

    # -- requests ----------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Wait (in arrival order, holding nothing) until fewer than
        ``LIPCERT_REQUEST_CONCURRENCY`` requests are being processed.

        Without it every request in flight runs its event-loop steps (decoding, radii, the
        answer) in the same loop turns: the worker answers a micro-batch of 200 single-input
        requests at once, and the 200 continuations run back to back before the loop reads
        the next socket, so a health probe waited ~0.3-1 s under load (issue 15). A bounded
        number in progress keeps each loop turn short; the worker still batches them.
        A request that waits ``LIPCERT_BODY_WAIT_S`` without a slot gets 503 + Retry-After."""
        if self._slots is None:
            yield
            return
        wait_s = self.settings.body_wait_s
        try:  # a bounded wait: slots held by stalled clients never stall the others for long
            await asyncio.wait_for(self._slots.acquire(), wait_s)
        except TimeoutError:
            raise ServiceBusy(
                f"{self.settings.request_concurrency} certify requests are in progress; none "
                f"ended within {wait_s:g} s",
                headers={"Retry-After": "1"},
            ) from None
        try:
            yield
        finally:
            self._slots.release()

    @contextlib.contextmanager
    def request(self) -> Iterator[None]:
        """Count an HTTP request in progress (on the event loop thread): the inline fast
        path is only taken by a request that is alone."""
        self._requests += 1
        try:
            yield
        finally:
            self._requests -= 1

    async def infer(self, model_id: str, x: Rows) -> np.ndarray:
        """Logits (rows, K) float64 for inputs x (rows, n0)."""
        result: np.ndarray = await self._submit(model_id, x, with_error=False)
        return result

    async def infer_bounded(self, model_id: str, x: Rows) -> tuple[np.ndarray, np.ndarray]:
        """(logits (rows, K), :meth:`logit_error` of x (rows,)): the bound is computed on the
        worker thread right after the forward pass, off the event loop. A :class:`LazyRows`
        ``x`` is cast there too; its InvalidInput is raised here."""
        result: tuple[np.ndarray, np.ndarray] = await self._submit(model_id, x, with_error=True)
        return result

    async def _submit(self, model_id: str, x: Rows, *, with_error: bool) -> Any:
        if (
            len(x) <= INLINE_ROWS
            and self._requests <= 1
            and self.device == "cpu"
            and self._queue.empty()
        ):
            result = self._try_inline(model_id, x, with_error)
            if result is not None:
                return result
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        try:
            self._queue.put_nowait(_Request(model_id, x, future, loop, with_error))
        except queue.Full:
            raise ServiceBusy(
                "the inference queue is full; retry shortly", headers={"Retry-After": "1"}
            ) from None
        if self._stopping:  # stop() was called: nobody will serve it
            self._refuse_queued()
        metrics.QUEUE_DEPTH.set(self._queue.qsize())
        return await future

    def _try_inline(self, model_id: str, x: Rows, with_error: bool) -> Any:
        """The result of a forward pass on this thread, or None when the worker thread is
        busy or stopped, the model is not loaded or its small passes are not cheap."""
        cost = self._small_cost.get(model_id)
        if cost is None or cost > INLINE_MAX_SECONDS or self._collecting or not self.alive:
            return None
        with self._models_lock:
            module = self._models.get(model_id)
        if module is None or not self._device_lock.acquire(blocking=False):
            return None
        try:
            x = _float64_rows(x)
            t0 = time.perf_counter()
            logits = self._forward(module, x)
            self._small_cost[model_id] = time.perf_counter() - t0
        finally:
            self._device_lock.release()
        metrics.BATCH_SIZE.observe(len(x))
        metrics.BATCH_REQUESTS.observe(1)
        return (logits, self.logit_error(model_id, x)) if with_error else logits

    def evict(self, model_id: str) -> None:
        """Forget a model's device copy (called when the model is deleted)."""
        with self._models_lock:
            self._models.pop(model_id, None)
            self._error_bounds.pop(model_id, None)

    def logit_error(self, model_id: str, x: np.ndarray) -> np.ndarray:
        """Per-row bound on ||logits computed here - exact logits||_2 for inputs x (rows, n0).

        E(x) = e0 + e1 ||x|| at one-pass upper bounds of ||x||
        (:func:`sdp.rounding.row_norm_upper_bounds`).
        """
        with self._models_lock:
            bound = self._error_bounds.get(model_id)
        if bound is None:
            bound = self._error_bound(model_id)
        return np.asarray(bound(x), dtype=np.float64)

    def _error_bound(self, model_id: str) -> Any:
        try:
            net = self.storage.load_network(model_id)
        except ModelNotFound:
            raise NotFound(f"no model with id {model_id!r}", code="model-not-found") from None
        bound = logit_error_bound(net, unit_roundoff(self.dtype_name), safety=ROUNDING_SAFETY)
        with self._models_lock:
            self._error_bounds[model_id] = bound
        return bound

    # -- the worker thread -------------------------------------------------------------------

    def _run(self) -> None:
        stopping = False
        while not stopping:
            self._collecting = False
            first = self._queue.get()
            if first is _STOP:
                break
            self._collecting = True
            batch = [first]
            rows = len(first.x)
            deadline = time.monotonic() + self.max_wait_s
            while rows < self.max_batch:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    try:
                        nxt = self._queue.get(timeout=remaining)
                    except queue.Empty:
                        break
                if nxt is _STOP:
                    stopping = True
                    break
                batch.append(nxt)
                rows += len(nxt.x)
            metrics.QUEUE_DEPTH.set(self._queue.qsize())
            by_model: dict[str, list[_Request]] = {}
            for req in batch:
                by_model.setdefault(req.model_id, []).append(req)
            for i, (model_id, reqs) in enumerate(by_model.items()):
                self._serve(model_id, reqs, last=i == len(by_model) - 1)
        self._refuse_queued()  # requests queued behind the stop marker

    def _serve(self, model_id: str, reqs: list[_Request], *, last: bool = True) -> None:
        """One forward pass for ``reqs``; ``last``: no more requests in hand after these (the
        worker counts as idle before the results go out, for the inline fast path)."""
        ready: list[tuple[_Request, np.ndarray]] = []
        for r in reqs:  # lazy rows are cast here, off the event loop; a bad one fails alone
            try:
                ready.append((r, _float64_rows(r.x)))
            except BaseException as exc:
                _deliver(r, error=exc)
        if not ready:
            self._collecting = not last
            return
        try:
            x = np.concatenate([xr for _, xr in ready], axis=0) if len(ready) > 1 else ready[0][1]
            with self._device_lock:
                module = self._module(model_id)
                t0 = time.perf_counter()
                logits = self._forward(module, x)
                if len(x) <= INLINE_ROWS:
                    self._small_cost[model_id] = time.perf_counter() - t0
            metrics.BATCH_SIZE.observe(len(x))
            metrics.BATCH_REQUESTS.observe(len(ready))
        except BaseException as exc:
            self._collecting = not last
            if not isinstance(exc, NotFound):
                log.exception("inference failed for model %s", model_id)
            for r, _ in ready:
                _deliver(r, error=exc)
            return
        self._collecting = not last
        start = 0
        for r, xr in ready:
            stop = start + len(xr)
            out = logits[start:stop]
            try:
                _deliver(r, result=(out, self.logit_error(model_id, xr)) if r.with_error else out)
            except BaseException as exc:
                log.exception("logit error bound failed for model %s", model_id)
                _deliver(r, error=exc)
            start = stop

    def _module(self, model_id: str) -> Any:
        with self._models_lock:
            module = self._models.get(model_id)
            if module is not None:
                self._models.move_to_end(model_id)
                return module
        import torch

        from models.runtime import TorchNetwork

        try:
            net = self.storage.load_network(model_id)
        except ModelNotFound:
            raise NotFound(f"no model with id {model_id!r}", code="model-not-found") from None
        dtype = torch.float32 if self.dtype_name == "float32" else torch.float64
        module = TorchNetwork.from_network(net, dtype=dtype, device=self.device, file_layout=True)
        self._error_bound(model_id)  # computed once per model, off the event loop
        with self._models_lock:
            self._models[model_id] = module
            while len(self._models) > self.settings.model_cache_size:
                self._models.popitem(last=False)
        return module

    def _forward(self, module: Any, x: np.ndarray) -> np.ndarray:
        import torch

        out = []
        with torch.inference_mode():
            for i in range(0, len(x), CHUNK_ROWS):
                t0 = time.perf_counter()
                xt = torch.from_numpy(np.ascontiguousarray(x[i : i + CHUNK_ROWS]))
                xt = xt.to(device=self.device, dtype=module.dtype)
                y = module(xt).to(device="cpu", dtype=torch.float64).numpy()
                metrics.INFERENCE_SECONDS.observe(time.perf_counter() - t0)
                out.append(y)
        return np.concatenate(out, axis=0) if len(out) > 1 else out[0]


def _float64_rows(x: Rows) -> np.ndarray:
    return x if isinstance(x, np.ndarray) else x.to_float64()


def _deliver(req: _Request, *, result: Any = None, error: BaseException | None = None) -> None:
    def settle() -> None:
        if req.future.done():  # the client went away
            return
        if error is not None:
            req.future.set_exception(error)
        else:
            req.future.set_result(result)

    with contextlib.suppress(RuntimeError):  # the event loop is closed
        req.loop.call_soon_threadsafe(settle)
