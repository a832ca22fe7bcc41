"""The block-tridiagonal primal algebra in torch (models.lipsdp_blocks) against the numpy
backend (sdp.solvers._block_tridiag) and dense LAPACK, and the structured solver on it: the
same iteration path and certified bounds as on numpy. CUDA cases run where a GPU is present."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from models.lipsdp_blocks import (
    TorchBlockTridiagOps,
    batched,
    block_matvec,
    lanczos_smallest,
)
from models.lipsdp_device import TorchOps
from sdp.certificate import Lmi, certify_rho, layerwise_multipliers
from sdp.importers import load_model_file
from sdp.ir import Activation
from sdp.solvers._block_tridiag import BlockTridiag, BlockTridiagOps
from sdp.solvers._interior_point import IpmSettings, IpmTuning, solve_ipm
from sdp.solvers._lmi_structure import StructuredLmi
from sdp.solvers.base import LipSdpProblem, SolveOptions
from sdp.solvers.dense import NumpyOps, PrimalOps, cholesky_upper, max_step
from sdp.solvers.structured import DEFAULT_EPS, StructuredSolver
from tests.sdp._nets import random_lmi, spd_and_direction

DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
    ),
]


def _block_tridiag(rng: np.random.Generator, sizes: list[int], shift: float) -> Any:
    """Random symmetric block-tridiagonal matrix (dense) with lambda_min = ``shift``."""
    offsets = tuple(int(v) for v in np.concatenate([[0], np.cumsum(sizes)]))
    diag = [(lambda a: a + a.T)(rng.standard_normal((n, n))) for n in sizes]
    sub = [rng.standard_normal((sizes[k + 1], sizes[k])) for k in range(len(sizes) - 1)]
    m = BlockTridiag(diag, sub, offsets).to_dense()
    m[np.diag_indices(len(m))] += shift - float(np.linalg.eigvalsh(m)[0])
    return m, offsets


def _dense_factor(fac: Any, n: int) -> np.ndarray:
    r = np.zeros((n, n))
    o = fac.offsets
    for k, rk in enumerate(fac.diag):
        r[o[k] : o[k + 1], o[k] : o[k + 1]] = np.asarray(rk.cpu())
    for k, uk in enumerate(fac.upper):
        r[o[k] : o[k + 1], o[k + 1] : o[k + 2]] = np.asarray(uk.cpu())
    return r


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sizes", [[3], [4, 4, 4], [2, 5, 3, 5, 5, 1]])
def test_block_factor_inverse_solves_equal_dense(device: str, sizes: list[int]) -> None:
    rng = np.random.default_rng(len(sizes))
    s, offsets = _block_tridiag(rng, sizes, 0.5)
    n = len(s)
    ops = TorchBlockTridiagOps(offsets)
    ts = torch.as_tensor(s, device=device)
    fac = ops.cholesky_upper(ts)
    assert fac is not None
    r_dense = cholesky_upper(s)
    assert r_dense is not None
    np.testing.assert_allclose(_dense_factor(fac, n), r_dense, atol=1e-10)
    x = ops.inverse_from_cholesky(fac).cpu().numpy()
    np.testing.assert_allclose(x, np.linalg.inv(s), atol=1e-9)
    assert np.array_equal(x, x.T)  # exactly symmetric, as the IPM expects
    v = torch.as_tensor(rng.standard_normal((n, 2)), device=device)
    np.testing.assert_allclose((r_dense @ fac.solve_upper(v).cpu().numpy()), v.cpu(), atol=1e-9)
    np.testing.assert_allclose(r_dense.T @ fac.solve_upper_transposed(v).cpu().numpy(), v.cpu())
    np.testing.assert_allclose(block_matvec(ts, offsets, v).cpu().numpy(), s @ v.cpu().numpy())
    # not positive definite (also when only the last block fails): no factor
    assert ops.cholesky_upper(torch.as_tensor(_block_tridiag(rng, sizes, -0.1)[0])) is None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("n_blocks", "size", "dense_max"), [(3, 4, 300), (5, 80, 100)])
def test_block_step_length_equals_numpy(
    device: str, n_blocks: int, size: int, dense_max: int
) -> None:
    """Largest alpha with S + alpha D >= 0: a dense eigenvalue from block solves (small) or
    torch Lanczos on block solves (above dense_max rows), against numpy's two routines."""
    rng = np.random.default_rng(n_blocks)
    s, offsets = _block_tridiag(rng, [size] * n_blocks, 1.0)
    d, _ = _block_tridiag(rng, [size] * n_blocks, -5.0)
    ops = TorchBlockTridiagOps(offsets, dense_max=dense_max)
    fac = ops.cholesky_upper(torch.as_tensor(s, device=device))
    td = torch.as_tensor(d, device=device)
    alpha, vec = ops.max_step(fac, td)
    ref, _ = max_step(cholesky_upper(s), d)
    ref_block, _ = BlockTridiagOps(offsets, dense_max).max_step(
        BlockTridiagOps(offsets).cholesky_upper(s), d
    )
    assert math.isfinite(ref)
    assert alpha == pytest.approx(ref, rel=1e-5)
    assert alpha == pytest.approx(ref_block, rel=1e-5)
    assert (vec is None) == (len(s) <= dense_max)
    if vec is not None:  # a warm start converges to the same value
        assert ops.max_step(fac, td, vec)[0] == pytest.approx(ref, rel=1e-5)
    assert ops.max_step(fac, torch.as_tensor(s, device=device))[0] == math.inf  # D >= 0


@pytest.mark.parametrize("device", DEVICES)
def test_dense_step_length_by_lanczos(device: str) -> None:
    """TorchOps(lanczos_above=...): Z's step length by torch Lanczos equals the exact one."""
    z, d = spd_and_direction(7, 320)
    r = cholesky_upper(z)
    assert r is not None
    c = np.linalg.solve(r.T, np.linalg.solve(r.T, d).T)  # R^{-T} D R^{-1}
    exact = -1.0 / float(np.linalg.eigvalsh((c + c.T) / 2)[0])
    ops = TorchOps(device, lanczos_above=300)
    alpha, vec = ops.max_step(ops.asarray(r), ops.asarray(d))
    assert vec is not None  # Lanczos, not the dense fallback
    assert alpha == pytest.approx(exact, rel=1e-5)
    assert ops.max_step(ops.asarray(r), ops.asarray(d), vec)[0] == pytest.approx(exact, rel=1e-5)
    assert TorchOps(device).max_step(ops.asarray(r), ops.asarray(d))[1] is None  # dense


def test_lanczos_finds_the_smallest_eigenvalue_or_gives_up() -> None:
    rng = np.random.default_rng(5)
    q, _ = np.linalg.qr(rng.standard_normal((400, 400)))
    lam = np.concatenate([[-3.0, -2.9], np.linspace(-2.0, 5.0, 398)])
    a = torch.as_tensor((q * lam) @ q.T)
    found = lanczos_smallest(lambda v: a @ v, 400, a, tol=1e-8, ncv=40, restarts=50)
    assert found is not None
    theta, vec = found
    assert theta == pytest.approx(-3.0, rel=1e-6)
    assert theta >= -3.0 - 1e-12  # a Ritz value lies inside the spectrum
    assert float(torch.linalg.vector_norm(a @ vec - theta * vec)) < 1e-6
    assert lanczos_smallest(lambda v: a @ v, 400, a, tol=1e-14, ncv=4, restarts=2) is None


def test_batched_equals_one_call_per_block() -> None:
    rng = np.random.default_rng(2)
    mats = [torch.as_tensor(rng.standard_normal((k, k))) for k in (3, 5, 3, 3, 5, 2)]
    out = batched(lambda a, b: a @ b.mT, mats, mats)
    for m, o in zip(mats, out, strict=True):
        torch.testing.assert_close(o, m @ m.mT)


class Recording(TorchOps):
    """TorchOps whose primal algebra records its calls (the solver must use it for S)."""

    def __init__(self) -> None:
        super().__init__("cpu")
        self.calls: list[str] = []

    def primal_ops(self, offsets: tuple[int, ...]) -> PrimalOps:
        inner = super().primal_ops(offsets)
        calls = self.calls

        class Rec:
            def cholesky_upper(self, a: Any) -> Any:
                calls.append("cholesky_upper")
                return inner.cholesky_upper(a)

            def inverse_from_cholesky(self, r: Any) -> Any:
                calls.append("inverse_from_cholesky")
                return inner.inverse_from_cholesky(r)

            def max_step(self, r: Any, d: Any, v0: Any = None) -> tuple[float, Any]:
                calls.append("max_step")
                return inner.max_step(r, d, v0)

        return Rec()


def test_the_backend_chooses_the_primal_algebra() -> None:
    assert isinstance(NumpyOps().primal_ops((0, 2, 5)), BlockTridiagOps)
    assert isinstance(TorchOps("cpu").primal_ops((0, 2, 5)), TorchBlockTridiagOps)
    dense = TorchOps("cpu", block_tridiag=False)
    assert dense.primal_ops((0, 2, 5)) is dense
    ops = Recording()
    lmi = random_lmi([4, 6, 5, 2], Activation("relu"), 2)
    sol = StructuredSolver(ops).solve(LipSdpProblem(lmi), SolveOptions(eps=1e-8))
    assert sol.status == "optimal"
    assert {"cholesky_upper", "inverse_from_cholesky", "max_step"} <= set(ops.calls)
    assert ops.calls.count("max_step") >= sol.iterations  # at least one primal step each


DENSE_DUAL = IpmTuning(chordal_min_depth=None)
"""numpy with the dense dual Z, as on torch (numpy's default keeps Z on the block pattern from
depth 3 on, sdp.solvers._chordal: another iteration path to the same optimum)."""


def _solve(
    ops: Any,
    lmi: Lmi,
    eps: float = 1e-9,
    tuning: IpmTuning | None = None,
    history: list[dict[str, Any]] | None = None,
) -> tuple[float, int]:
    """Certified rho and iterations of one solve; ``history`` collects its "solve" events."""
    events: list[dict[str, Any]] = []
    options = SolveOptions(eps=eps, progress=events.append)
    sol = StructuredSolver(ops, tuning=tuning).solve(LipSdpProblem(lmi), options)
    assert sol.status == "optimal" and sol.multipliers is not None
    assert sol.info["backend"] == ops.name
    if history is not None:
        history.extend(e for e in events if e.get("phase") == "solve")
    return certify_rho(lmi, sol.multipliers), sol.iterations


STEP_TOL = 5e-3
"""Largest difference of the two backends' step lengths a_p, a_d at one iteration: 1.6e-3
measured on the relu net below (Lanczos step lengths, stopped at a 1e-3 Ritz residual), at most
1e-5 where the step lengths are exact eigenvalues; a path started at rho_factor 1.06 instead of
1.05, or with the fixed step fraction, differs by 1.4e-2 to 0.4 (docs/benchmarks.md)."""


def assert_same_path(ref: list[dict[str, Any]], other: list[dict[str, Any]]) -> None:
    """The same iteration path: a_p and a_d within STEP_TOL at every iteration while the
    reference's gap is above the product's target (DEFAULT_EPS). Below it the float32 products
    and the float64 floor decide the last iterations (at a gap target of 1e-9 one backend took a
    predictor-only last step where the other's dual steps collapsed: 14 against 16)."""
    pairs = [(a, b) for a, b in zip(ref, other, strict=False) if a["gap"] > DEFAULT_EPS]
    assert len(pairs) >= 5
    for a, b in pairs:
        assert a["a_p"] == pytest.approx(b["a_p"], abs=STEP_TOL), (a, b)
        assert a["a_d"] == pytest.approx(b["a_d"], abs=STEP_TOL), (a, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("act", "sizes"),
    [
        (Activation("relu"), [10, 110, 110, 90, 3]),  # n = 320: Lanczos step lengths
        (Activation("tanh"), [12, 40, 40, 40, 5]),
        (Activation("leaky_relu", 0.1), [5, 9, 9, 9, 9, 9, 2]),  # n = 50, six blocks
    ],
    ids=lambda v: getattr(v, "name", str(v)),
)
def test_same_path_and_bound_as_numpy(device: str, act: Activation, sizes: list[int]) -> None:
    """Block S on torch (with and without Z's Lanczos) against the numpy backend: the same
    step lengths while the gap is above the default target, then, at a gap target of 1e-8
    (off the float64 floor), iterations within one and certified rho within 1e-7 relative
    (both verified on the host in float64)."""
    lmi = random_lmi(sizes, act, seed=1)
    path_np: list[dict[str, Any]] = []
    rho_np, it_np = _solve(NumpyOps(), lmi, 1e-8, DENSE_DUAL, path_np)
    for ops in (TorchOps(device), TorchOps(device, lanczos_above=300)):
        path_t: list[dict[str, Any]] = []
        rho_t, it_t = _solve(ops, lmi, 1e-8, None, path_t)
        assert_same_path(path_np, path_t)
        assert abs(it_t - it_np) <= 1
        assert rho_t == pytest.approx(rho_np, rel=1e-7)


@pytest.mark.parametrize("device", DEVICES)
def test_infeasible_start_on_block_s(device: str) -> None:
    """S(0, t0) indefinite: the start adds pi I, the block factor drives it to zero."""
    lmi = random_lmi([4, 7, 6, 2], Activation("leaky_relu", 0.1), 13)
    t0 = np.concatenate(layerwise_multipliers(lmi)) * 1e-3
    st = StructuredLmi.from_lmi(lmi, TorchOps(device))
    out = solve_ipm(st, t0, 0.0, IpmSettings(eps=1e-9), per_layer=False)
    assert out.status == "optimal"
    assert out.history[0]["pi"] > 0 and out.history[-1]["pi"] == 0.0
    ref = solve_ipm(StructuredLmi.from_lmi(lmi), t0, 0.0, IpmSettings(eps=1e-9), per_layer=False)
    assert certify_rho(lmi, np.split(out.t, [7])) == pytest.approx(
        certify_rho(lmi, np.split(ref.t, [7])), rel=1e-7
    )


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_mnistfc_256x2_same_iterations_and_bound(device: str, fixtures_dir: Path) -> None:
    """mnistfc-256x2 (n = 768 after the input reduction, three blocks of 256), the solver's
    default gap target: the torch backend takes numpy's iterations (+-1) to its certified
    bound (1e-7 relative)."""
    net = load_model_file(fixtures_dir / "vnncomp2021/benchmarks/mnistfc/mnist-net_256x2.onnx")
    lmi = Lmi.from_chain(net.chain())
    rho_np, it_np = _solve(NumpyOps(), lmi, eps=1e-5)
    rho_t, it_t = _solve(TorchOps(device, lanczos_above=300), lmi, eps=1e-5)
    assert abs(it_t - it_np) <= 1
    assert rho_t == pytest.approx(rho_np, rel=1e-7)
    assert math.sqrt(rho_t) == pytest.approx(312.416, rel=1e-5)  # docs/benchmarks.md
