""".npy certify bodies are read while they upload: :class:`NpyRows` gives exactly the rows of
``numpy.load`` whatever the chunking (values split across chunks included), refuses what
``load_npy`` refuses (with the global row of a NaN, found when a block is cast), keeps the
received chunks by reference instead of copying them, and over HTTP a body sent in chunks
runs as several forward passes whose radii match the network's own float64 forward."""

from __future__ import annotations

import asyncio
import io
import math

import httpx
import numpy as np
import pytest

from service import metrics
from service.app import create_app
from service.bodies.npy_stream import FortranBody, NpyRows, RowBlock
from service.documents import StoredBound
from service.errors import InvalidInput
from service.settings import Settings
from tests.service.onnx_nets import mlp_onnx, norm_product


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def _read(body: bytes, sizes: list[int], input_shape: list[int], block_rows: int) -> np.ndarray:
    """Feed ``body`` in chunks of the given sizes (cycled), taking blocks as they complete."""
    reader = NpyRows(input_shape, max_inputs=10_000, block_rows=block_rows)
    blocks = []
    pos, k = 0, 0
    while pos < len(body):
        step = sizes[k % len(sizes)]
        reader.feed(body[pos : pos + step])
        pos, k = pos + step, k + 1
        while (b := reader.take()) is not None:
            blocks.append(b)
    reader.finish()
    while (b := reader.take()) is not None:
        blocks.append(b)
    if not reader._fortran:  # fixed-size blocks, the last one holding the rest
        assert all(isinstance(b, RowBlock) for b in blocks)
        assert all(len(b) == block_rows for b in blocks[:-1])
        assert 0 < len(blocks[-1]) <= block_rows
    else:  # one lazy block holding the whole body, cast on the worker thread
        assert len(blocks) == 1 and isinstance(blocks[0], FortranBody)
        a = np.load(io.BytesIO(body))
        assert reader.whole_body_bytes == a.size * (a.dtype.itemsize + 8)
    arrays = [b.to_float64() for b in blocks]
    assert [len(a) for a in arrays] == [len(b) for b in blocks]
    return np.concatenate(arrays)


@pytest.mark.parametrize(
    "array",
    [
        np.random.default_rng(0).normal(size=(37, 6)),
        np.random.default_rng(1).normal(size=(37, 6)).astype(np.float32),
        np.random.default_rng(2).normal(size=(37, 6)).astype(">f8"),  # big-endian
        np.arange(37 * 6, dtype=np.int16).reshape(37, 6),
        np.asfortranarray(np.random.default_rng(3).normal(size=(37, 6))),  # read whole
        np.random.default_rng(4).normal(size=(37, 2, 3)),  # shaped like the input
    ],
)
@pytest.mark.parametrize("sizes", [[1], [7, 1000], [3, 64, 5], [10**9]])
def test_rows_equal_numpy_load_for_any_chunking(array, sizes) -> None:
    body = _npy(array)
    got = _read(body, sizes, [2, 3], block_rows=5)
    want = np.load(io.BytesIO(body)).astype(np.float64).reshape(len(array), 6)
    assert got.dtype == np.float64 and got.flags.c_contiguous
    np.testing.assert_array_equal(got, want)


def test_version_2_header() -> None:
    buf = io.BytesIO()
    a = np.random.default_rng(5).normal(size=(9, 4))
    np.lib.format.write_array(buf, a, version=(2, 0))
    np.testing.assert_array_equal(_read(buf.getvalue(), [11], [4], 2), a)


def _fails(body: bytes, sizes: list[int], input_shape: list[int], match: str) -> None:
    with pytest.raises(InvalidInput, match=match):
        _read(body, sizes, input_shape, block_rows=4)


def test_refusals() -> None:
    x = np.random.default_rng(6).normal(size=(30, 4))
    nan_late = x.copy()
    nan_late[23, 1] = np.nan
    _fails(_npy(nan_late), [50], [4], "row 23")  # after earlier blocks were handed out
    _fails(_npy(x)[:-8], [100], [4], "declares 120 values")  # truncated
    _fails(_npy(x) + b"\0" * 8, [100], [4], "declares 120 values")  # trailing bytes
    _fails(_npy(x) + b"\0" * 64, [100], [4], "declares 120 values")  # two extra rows
    _fails(b"not an npy body at all", [3], [4], "bad magic")
    _fails(b"\x93NUM", [1], [4], "bad magic")  # ends inside the magic
    _fails(_npy(x)[:40], [7], [4], "ends inside")  # ends inside the header
    _fails(_npy(np.array(["a", "b"])), [5], [4], "not an integer or float")
    _fails(_npy(np.zeros((3, 5))), [5], [4], "expected")
    _fails(_npy(np.zeros(4)), [5], [4], "expected")
    _fails(_npy(np.zeros((0, 4))), [5], [4], "0 values")
    _fails(_npy(np.array([[1 + 2j] * 4])), [5], [4], "not an integer or float")


def test_blocks_view_the_received_chunks_without_copying() -> None:
    x = np.random.default_rng(8).normal(size=(8, 4)).astype(np.float32)
    body = _npy(x)
    hlen = len(body) - x.nbytes
    reader = NpyRows([4], max_inputs=100, block_rows=3)
    reader.feed(body[:hlen])
    chunk = body[hlen:]  # one chunk holding all 8 rows: blocks of 3, 3 and 2 rows
    reader.feed(chunk)
    reader.finish()
    blocks = [reader.take() for _ in range(3)]
    assert reader.take() is None
    assert [(b.row0, len(b)) for b in blocks] == [(0, 3), (3, 3), (6, 2)]
    for b in blocks:
        assert all(p.obj is chunk for p in b.pieces)  # views of the chunk, not copies
    np.testing.assert_array_equal(np.concatenate([b.to_float64() for b in blocks]), x)


def test_row_limit_is_checked_from_the_header_alone() -> None:
    body = _npy(np.zeros((20, 4)))
    reader = NpyRows([4], max_inputs=19)
    with pytest.raises(InvalidInput, match="at most 19"):
        reader.feed(body[:128])  # the header only: no data needed to refuse


def _batch_count() -> float:
    return metrics.REGISTRY.get_sample_value("lipcert_inference_batch_size_count") or 0.0


def test_chunked_upload_runs_in_blocks_and_matches_the_network(tmp_path) -> None:
    rng = np.random.default_rng(7)
    weights = [rng.normal(size=(16, 784)) / 28, rng.normal(size=(10, 16))]
    lip = norm_product([w.astype(np.float32) for w in weights])
    onnx_bytes = mlp_onnx(weights)
    x = rng.uniform(0, 1, size=(1500, 784)).astype(np.float32)  # 4.7 MB, blocks of 334 rows
    body = _npy(x)
    app = create_app(Settings(data_dir=tmp_path, device="cpu"))

    async def chunks(size: int = 65536):  # the body arrives as many ASGI messages
        for i in range(0, len(body), size):
            yield body[i : i + size]

    async def run() -> tuple[httpx.Response, httpx.Response, float, httpx.Response, bool]:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
                mid = (await c.post("/v1/models", files={"file": ("n.onnx", onnx_bytes)})).json()[
                    "id"
                ]
                app.state.storage.save_bound(
                    mid,
                    StoredBound.from_json(
                        {"lipschitz_bound": lip, "method": "naive", "verified": True}
                    ),
                )
                hdr = {"content-type": "application/x-npy", "accept": "application/x-npz"}
                path = f"/v1/models/{mid}/certify?return_logits=true"
                before = _batch_count()
                streamed = await c.post(path, content=chunks(), headers=hdr)
                passes = _batch_count() - before
                whole = await c.post(path, json={"inputs": x.astype(np.float64).tolist()})
                bad = x.copy()
                bad[1234, 5] = np.inf
                body_bad = _npy(bad)

                async def bad_chunks():
                    for i in range(0, len(body_bad), 65536):
                        yield body_bad[i : i + 65536]

                refused = await c.post(path, content=bad_chunks(), headers=hdr)
                ready = (await c.get("/v2/health/ready")).status_code == 200
        return streamed, whole, passes, refused, ready

    streamed, whole, passes, refused, ready = asyncio.run(run())
    assert streamed.status_code == 200, streamed.text
    assert passes >= 4, passes  # 1500 rows in blocks of >= 334 rows, not one pass
    with np.load(io.BytesIO(streamed.content), allow_pickle=False) as z:
        got = {k: z[k] for k in z.files}
    assert got["logits"].shape == (1500, 10)
    # the network's float64 forward (the IR the bound is about, float32 weights as stored)
    w32 = [w.astype(np.float32).astype(np.float64) for w in weights]
    ref = np.maximum(x.astype(np.float64) @ w32[0].T, 0) @ w32[1].T
    np.testing.assert_allclose(got["logits"], ref, rtol=1e-10, atol=1e-12)
    s2 = np.sort(got["logits"], axis=1)[:, -2:]
    margin = s2[:, 1] - s2[:, 0]
    assert np.array_equal(got["margin"], margin)
    assert np.all(got["radius"] <= margin / (math.sqrt(2) * lip))
    # below it only by the float64 rounding allowance E(x) / L (E ~ 1e-11 for |x| ~ 16 here)
    np.testing.assert_allclose(got["radius"], margin / (math.sqrt(2) * lip), rtol=0, atol=1e-9)
    rows = whole.json()["results"]
    assert got["prediction"].tolist() == [r["prediction"] for r in rows]
    np.testing.assert_allclose(got["radius"], [r["radius"] for r in rows], rtol=1e-12, atol=1e-15)
    assert refused.status_code == 422 and "row 1234" in refused.json()["detail"]
    assert refused.headers["content-type"].startswith("application/problem+json")
    assert ready
