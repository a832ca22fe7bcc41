"""The structured LipSDP solver on the torch backend (models.lipsdp_device.TorchOps).

The same interior-point code runs with its matrices in torch; on the CPU device here (and on
CUDA when the machine has a GPU) it must reach the numpy backend's certified optimum.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models.lipsdp_device import TorchOps, structured_solver, use_device_for_lipsdp
from sdp.bounds import compute_bound
from sdp.certificate import Lmi, certify_rho, layerwise_multipliers
from sdp.ir import Activation
from sdp.solvers import SOLVERS, get_solver, register_solver
from sdp.solvers._interior_point import IpmSettings, solve_ipm
from sdp.solvers._lmi_structure import StructuredLmi
from sdp.solvers.base import LipSdpProblem, SolveOptions
from sdp.solvers.dense import NumpyOps
from sdp.solvers.structured import StructuredSolver
from tests.sdp._nets import dense_network, random_lmi, spd_and_direction

DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
    ),
]


def certified(solver: StructuredSolver, lmi: Lmi, variant: str = "neuron") -> tuple[float, int]:
    sol = solver.solve(LipSdpProblem(lmi, variant), SolveOptions(eps=1e-9))  # type: ignore[arg-type]
    assert sol.status == "optimal"
    assert sol.multipliers is not None
    return certify_rho(lmi, sol.multipliers), sol.iterations


@pytest.mark.parametrize("device", DEVICES)
def test_dense_ops_agree_with_numpy(device: str) -> None:
    s, d = spd_and_direction(0, 40)
    cpu, dev = NumpyOps(), TorchOps(device)
    ts, td = dev.asarray(s), dev.asarray(d)
    r_np, r_t = cpu.cholesky_upper(s), dev.cholesky_upper(ts)
    assert r_np is not None and r_t is not None
    np.testing.assert_allclose(dev.to_numpy(r_t), r_np, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(
        dev.to_numpy(dev.inverse_from_cholesky(r_t)), np.linalg.inv(s), rtol=1e-8, atol=1e-10
    )
    np.testing.assert_allclose(
        dev.to_numpy(dev.solve_upper_transposed(r_t, td)),
        cpu.solve_upper_transposed(r_np, d),
        rtol=1e-8,
        atol=1e-10,
    )
    assert dev.cholesky_upper(dev.asarray(d)) is None  # indefinite
    assert dev.eigvalsh_min(td) == pytest.approx(cpu.eigvalsh_min(d), rel=1e-10)
    assert dev.eigvalsh_max(td) == pytest.approx(cpu.eigvalsh_max(d), rel=1e-10)
    # step to the PSD boundary: dense on both backends at this size
    assert dev.max_step(r_t, td)[0] == pytest.approx(cpu.max_step(r_np, d)[0], rel=1e-9)
    assert dev.max_step(r_t, td @ td)[0] == math.inf
    assert dev.vdot(ts, td) == pytest.approx(cpu.vdot(s, d), rel=1e-12)
    assert dev.norm(td) == pytest.approx(cpu.norm(d), rel=1e-12)
    np.testing.assert_allclose(dev.to_numpy(dev.rowdot(ts, td)), cpu.rowdot(s, d), rtol=1e-12)
    sd = s @ d  # not symmetric
    np.testing.assert_allclose(dev.to_numpy(dev.sym(dev.asarray(sd), 0.5)), (sd + sd.T) / 2)
    low = dev.to_numpy(dev.matmul(ts, td, low_precision=True))
    np.testing.assert_allclose(low, s @ d, rtol=1e-4, atol=1e-5 * np.abs(s @ d).max())
    big = dev.asarray(np.full((2, 2), 1e30))  # overflows float32: recomputed in float64
    np.testing.assert_allclose(dev.to_numpy(dev.matmul(big, big, low_precision=True)), 2e60)
    view = dev.zeros((5, 5))
    dev.add_diag(view[1:4, 1:4], dev.asarray(np.array([1.0, 2.0, 3.0])))
    np.testing.assert_array_equal(np.diagonal(dev.to_numpy(view)), [0, 1, 2, 3, 0])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("act", "sizes"),
    [
        (Activation("relu"), [6, 9, 8, 3]),
        (Activation("leaky_relu", 0.1), [5, 7, 7, 7, 2]),
        (Activation("tanh"), [8, 6, 6, 6, 6, 4]),
        (Activation("sigmoid"), [4, 10, 3]),
        (Activation("gelu"), [5, 6, 6, 3]),
    ],
    ids=lambda v: getattr(v, "name", str(v)),
)
def test_same_certified_optimum_as_the_numpy_backend(
    device: str, act: Activation, sizes: list[int]
) -> None:
    lmi = random_lmi(sizes, act, seed=len(sizes))
    rho_np, _ = certified(StructuredSolver(), lmi)
    rho_t, _ = certified(StructuredSolver(TorchOps(device)), lmi)
    assert rho_t == pytest.approx(rho_np, rel=1e-6)
    rho_layer_np, _ = certified(StructuredSolver(), lmi, "layer")
    rho_layer_t, _ = certified(StructuredSolver(TorchOps(device)), lmi, "layer")
    assert rho_layer_t == pytest.approx(rho_layer_np, rel=1e-6)
    assert rho_layer_t >= rho_t * (1 - 1e-7)  # per layer is never tighter


@pytest.mark.parametrize("device", DEVICES)
def test_infeasible_start_on_the_torch_backend(device: str) -> None:
    """Multipliers 1000x too small: S(0, t0) is indefinite, the start adds pi I, and the
    residual is driven to zero on the torch backend too."""
    lmi = random_lmi([4, 7, 6, 2], Activation("leaky_relu", 0.1), 13)
    t0 = np.concatenate(layerwise_multipliers(lmi)) * 1e-3
    outs = []
    for ops in (NumpyOps(), TorchOps(device)):
        st = StructuredLmi.from_lmi(lmi, ops)
        out = solve_ipm(st, t0, 0.0, IpmSettings(eps=1e-9), per_layer=False)
        assert out.status == "optimal"
        assert out.history[0]["pi"] > 0 and out.history[-1]["pi"] == 0.0
        outs.append(certify_rho(lmi, np.split(out.t, [7])))
    assert outs[1] == pytest.approx(outs[0], rel=1e-6)


def test_small_lmis_stay_on_numpy_and_the_backend_is_reported() -> None:
    lmi = random_lmi([4, 6, 2], Activation("relu"), 1)
    problem = LipSdpProblem(lmi)
    small = StructuredSolver(TorchOps("cpu"), min_size=1000).solve(problem, SolveOptions())
    assert small.info["backend"] == "numpy"
    sol = StructuredSolver(TorchOps("cpu")).solve(problem, SolveOptions())
    assert sol.info["backend"] == "torch-cpu"


def test_device_choice_reaches_compute_bound() -> None:
    """use_device_for_lipsdp registers the backend as this process's "structured" solver, which
    method=lipsdp-neuron then uses; a CPU device keeps the numpy backend."""
    rng = np.random.default_rng(3)
    net = dense_network([rng.standard_normal(s) for s in [(12, 5), (9, 12), (3, 9)]])
    saved = SOLVERS.get("structured") or get_solver("structured")
    try:
        assert use_device_for_lipsdp("cpu") == "cpu"
        solver = get_solver("structured")
        assert isinstance(solver, StructuredSolver) and isinstance(solver.ops, NumpyOps)
        numpy_value = compute_bound(net, "lipsdp-neuron", lower_bound=False).value
        register_solver("structured", lambda: StructuredSolver(TorchOps("cpu")))
        torch_value = compute_bound(net, "lipsdp-neuron", lower_bound=False).value
        assert torch_value == pytest.approx(numpy_value, rel=1e-6)
    finally:
        register_solver("structured", lambda: saved)
    with pytest.raises(ValueError, match="unknown device"):
        structured_solver("gpu")
    with pytest.raises(RuntimeError, match="CUDA device"):
        structured_solver(f"cuda:{torch.cuda.device_count()}")  # one past the last
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="sees 0 CUDA device"):
            structured_solver("cuda")


class FailingOps(TorchOps):
    """TorchOps whose ``method`` raises ``error`` from its ``after``-th call on (a device
    running out of memory mid-solve, or a CUDA library failure)."""

    def __init__(self, method: str, error: Exception, after: int) -> None:
        super().__init__("cpu")
        self.calls = 0
        real = getattr(self, method)

        def failing(*args: object, **kwargs: object) -> object:
            self.calls += 1
            if self.calls >= after:
                raise error
            return real(*args, **kwargs)

        setattr(self, method, failing)


@pytest.mark.parametrize(
    ("method", "error"),
    [
        ("eigvalsh_min", torch.OutOfMemoryError("CUDA out of memory (simulated)")),
        ("matmul", RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED (simulated)")),
    ],
    ids=["oom-in-eigvalsh", "cublas-error"],
)
def test_a_failing_device_backend_falls_back_to_numpy(method: str, error: Exception) -> None:
    """A device failure is not a numerical one: it must neither end the solve early with a
    loose bound (an out-of-memory taken for a LinAlgError) nor fail the job; the solve is
    redone on numpy and says so."""
    lmi = random_lmi([10, 60, 50, 5], Activation("sigmoid"), 3)
    rho_np, _ = certified(StructuredSolver(), lmi)
    ops = FailingOps(method, error, after=10)
    sol = StructuredSolver(ops).solve(LipSdpProblem(lmi), SolveOptions(eps=1e-9))
    assert ops.calls >= 10  # the failure really happened mid-solve
    assert sol.status == "optimal" and sol.multipliers is not None
    assert sol.info["backend"] == "numpy"
    assert "torch-cpu failed" in sol.info["backend_error"]
    assert certify_rho(lmi, sol.multipliers) == pytest.approx(rho_np, rel=1e-6)
