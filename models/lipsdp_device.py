"""The structured LipSDP solver's dense algebra in torch, so that it can run on a GPU.

:class:`TorchOps` implements :class:`sdp.solvers.dense.DenseOps` with float64 torch tensors on
one device; :class:`sdp.solvers.structured.StructuredSolver` then runs the very same
interior-point iterations (sdp never imports torch: the backend is handed in)::

    from models.lipsdp_device import structured_solver
    sol = structured_solver("cuda").solve(problem, options)   # matrices on the GPU
    certify_multipliers(lmi, sol.multipliers)                   # verified on the host, float64

S is handled by its block-tridiagonal structure (:meth:`TorchOps.primal_ops`,
:mod:`models.lipsdp_blocks`: block Cholesky, backward block recurrence for S^{-1}, Lanczos on
block solves for the primal step length), as on the numpy backend. What changes with the
backend: Z's step length comes from a dense eigenvalue of R^{-T} D R^{-1}
(``torch.linalg.eigvalsh``) unless ``lanczos_above`` is set (then torch Lanczos on triangular
solves above that many rows, as on numpy), and factorisations are cuSOLVER's.
Multipliers, the (N+1) x (N+1) Schur system and the final certificate check stay in numpy on
the host.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from models.lipsdp_blocks import DENSE_MAX, TorchBlockTridiagOps, eigvalsh, lanczos_smallest
from models.runtime import resolve_device
from sdp.solvers import register_solver
from sdp.solvers.dense import DenseOps, PrimalOps
from sdp.solvers.structured import StructuredSolver

GPU_MIN_LMI = 256
"""LMIs with fewer rows (after the input reduction) stay on the CPU backend: a guess, not yet
measured on a GPU (kernel launches dominate tiny matrices)."""


class TorchOps:
    """Dense float64 algebra on one torch device (the :class:`DenseOps` protocol).

    ``block_tridiag``: S by its block structure (:meth:`primal_ops`), else dense like Z.
    ``lanczos_above``: step lengths of dense matrices (Z) by Lanczos above that many rows;
    None (the default): a dense eigenvalue at every size.
    """

    def __init__(
        self,
        device: str | torch.device = "cpu",
        *,
        block_tridiag: bool = True,
        lanczos_above: int | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.name = f"torch-{self.device}"
        self.block_tridiag = block_tridiag
        self.lanczos_above = lanczos_above

    def asarray(self, a: Any) -> torch.Tensor:
        return torch.as_tensor(np.asarray(a, dtype=np.float64), device=self.device)

    def to_numpy(self, a: torch.Tensor) -> np.ndarray:
        return np.asarray(a.detach().cpu().numpy(), dtype=np.float64)

    def zeros(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.zeros(shape, dtype=torch.float64, device=self.device)

    def zeros_like(self, a: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(a)

    def empty(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.empty(shape, dtype=torch.float64, device=self.device)

    def eye(self, n: int) -> torch.Tensor:
        return torch.eye(n, dtype=torch.float64, device=self.device)

    def copy(self, a: torch.Tensor) -> torch.Tensor:
        return a.clone()

    def add_diag(self, a: torch.Tensor, v: float | torch.Tensor) -> None:
        a.diagonal().add_(v)

    def sym(self, a: torch.Tensor, scale: float) -> torch.Tensor:
        return (a + a.mT).mul_(scale)  # in place with its own transpose would alias

    def rowdot(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a * b).sum(dim=1)

    def vdot(self, a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a * b).sum())

    def norm(self, a: torch.Tensor) -> float:
        return float(torch.linalg.matrix_norm(a))

    def matmul(self, a: torch.Tensor, b: torch.Tensor, low_precision: bool = False) -> torch.Tensor:
        """a @ b; float32 only on the CPU: data-centre GPUs (A100, H100, H200) multiply float64
        at the float32 (non-tensor-core) rate, so there it would only add two casts."""
        if low_precision and self.device.type == "cpu":
            out = (a.float() @ b.float()).double()
            if bool(torch.isfinite(out).all()):
                return out
        return a @ b

    def cholesky_upper(self, a: torch.Tensor) -> torch.Tensor | None:
        r, info = torch.linalg.cholesky_ex(a, upper=True)
        if int(info) != 0 or not bool(torch.isfinite(r.diagonal()).all()):
            return None
        return r

    def inverse_from_cholesky(self, r: torch.Tensor) -> torch.Tensor:
        try:
            x = torch.cholesky_inverse(r, upper=True)
        except torch.linalg.LinAlgError as e:  # numerical only: out of memory propagates
            raise np.linalg.LinAlgError(f"torch: {e}") from e
        if not bool(torch.isfinite(x).all()):
            raise np.linalg.LinAlgError("torch: non-finite inverse")
        return x

    def solve_upper_transposed(self, r: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.linalg.solve_triangular(r.mT, b, upper=False)

    def eigvalsh_min(self, a: torch.Tensor) -> float:
        return float(eigvalsh(a)[0])

    def eigvalsh_max(self, a: torch.Tensor) -> float:
        return float(eigvalsh(a)[-1])

    def max_step(self, r: torch.Tensor, d: torch.Tensor, v0: Any = None) -> tuple[float, Any]:
        """1 / max(0, -lambda_min(R^{-T} D R^{-1})): by Lanczos on two triangular solves per
        product above ``lanczos_above`` rows (returning the eigenvector as the next start),
        else (or if it does not converge) from a dense eigenvalue."""
        n = d.shape[0]
        if self.lanczos_above is not None and n > self.lanczos_above:

            def mv(v: torch.Tensor) -> torch.Tensor:
                w = torch.linalg.solve_triangular(r, v, upper=True)
                return torch.linalg.solve_triangular(r.mT, d @ w, upper=False)

            found = lanczos_smallest(mv, n, d, v0)
            if found is not None:
                return (math.inf if found[0] >= 0 else 1.0 / -found[0]), found[1]
        right = torch.linalg.solve_triangular(r, d, upper=True, left=False)  # D R^{-1}
        c = torch.linalg.solve_triangular(r.mT, right, upper=False)  # R^{-T} D R^{-1}
        lam = self.eigvalsh_min(self.sym(c, 0.5))
        return (math.inf if lam >= 0 else 1.0 / -lam), None

    def primal_ops(self, offsets: tuple[int, ...]) -> PrimalOps:
        """S's algebra: :class:`TorchBlockTridiagOps` (block Cholesky, block inverse, Lanczos
        on block solves above ``DENSE_MAX`` rows), or this dense backend itself."""
        return TorchBlockTridiagOps(offsets, DENSE_MAX) if self.block_tridiag else self


def structured_solver(device: str = "auto", *, min_size: int = GPU_MIN_LMI) -> StructuredSolver:
    """The structured LipSDP solver with its matrices on ``device`` (auto|cpu|cuda[:k]).

    On the CPU the numpy/LAPACK backend is used (faster there than torch: Lanczos step lengths).
    """
    dev = resolve_device(device)
    if dev == "cpu":
        return StructuredSolver()
    ops: DenseOps = TorchOps(dev)
    return StructuredSolver(ops, min_size=min_size)


def use_device_for_lipsdp(device: str = "auto") -> str:
    """Register :func:`structured_solver` (``device``) as this process's ``"structured"``
    solver, which ``method=lipsdp-neuron``/``-layer`` use; returns the resolved device."""
    dev = resolve_device(device)
    solver = structured_solver(dev)
    register_solver("structured", lambda: solver)
    return dev
