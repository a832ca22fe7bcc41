"""The block-tridiagonal primal algebra of the structured LipSDP solver in torch (any device).

S = -M(rho, T) of LipSDP is block tridiagonal over (x, z_1, ..., z_L) (design.md §3.2). Its
upper Cholesky factor S = R^T R is block upper bidiagonal (no fill-in):

    R_00 = chol(D_0),   R_{k,k+1} = R_kk^{-T} B_k^T,
    R_{k+1,k+1} = chol(D_{k+1} - R_{k,k+1}^T R_{k,k+1}),

with D_k the diagonal and B_k = S[k+1, k] the sub-diagonal blocks. X = S^{-1} follows
backwards from X_LL = (R_LL^T R_LL)^{-1} with G_k = R_kk^{-1} R_{k,k+1}:

    X_{k, k+1:} = -G_k X_{k+1, k+1:},   X_kk = (R_kk^T R_kk)^{-1} + G_k X_{k+1,k+1} G_k^T,

and the largest alpha with S + alpha D >= 0 (D block tridiagonal, the primal direction) is
1 / max(0, -lambda_min(R^{-T} D R^{-1})), by Lanczos on block triangular solves (O(n max_k
n_k) per product instead of O(n^2)) above ``dense_max`` rows, a dense eigenvalue below.
Block LU of block-tridiagonal systems: Golub & Van Loan, Matrix Computations, 4th ed.,
section 4.5; Lanczos with full reorthogonalisation and explicit restarts from the Ritz vector:
Saad, Numerical Methods for Large Eigenvalue Problems, 2nd ed., 2011, sections 6.6 and 7.1.

:class:`TorchBlockTridiagOps` is the torch twin of
:class:`sdp.solvers._block_tridiag.BlockTridiagOps` (numpy/LAPACK) and is what
``models.lipsdp_device.TorchOps.primal_ops`` hands the interior-point method. For a GPU the
operations that do not depend on each other (the inverses (R_kk^T R_kk)^{-1}, the G_k) run
batched over blocks of equal shape, the factorisation checks for failure once (one device
synchronisation, not one per block) and Lanczos synchronises once per restart.

Nothing here is trusted for soundness: a step is re-checked by a float64 Cholesky, and the
solver's multipliers are certified on the host (sdp.certificate).

Warning:
    Ritz values lie inside the spectrum, so an unconverged Lanczos value errs towards a longer
    step, which the caller's Cholesky check then shortens (as on the numpy backend).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.linalg import eigh_tridiagonal

Tensor = torch.Tensor

DENSE_MAX = 300
"""Step lengths: a dense eigenvalue at or below this many rows, Lanczos above (as numpy's)."""
LANCZOS_TOL = 1e-3
"""Relative residual |A v - theta v| <= tol |theta| of the Lanczos Ritz pair (as numpy's)."""
LANCZOS_NCV = 24
"""Krylov dimension per restart (the numpy backend's ncv)."""
LANCZOS_RESTARTS = 15
"""Restarts before the dense eigenvalue is taken instead."""


def eigvalsh(a: Tensor) -> Tensor:
    """Eigenvalues of symmetric ``a`` (ascending); numerical failure as numpy's LinAlgError."""
    try:
        return torch.linalg.eigvalsh(a)
    except torch.linalg.LinAlgError as e:  # numerical only: out of memory propagates
        raise np.linalg.LinAlgError(f"torch: {e}") from e


def batched(fn: Callable[..., Tensor], *args: Sequence[Tensor]) -> list[Tensor]:
    """[fn(a_0[k], a_1[k], ...) for k], one call per group of equal shapes (stacked into a
    batch: one kernel launch per group instead of one per block)."""
    count = len(args[0])
    groups: dict[tuple[tuple[int, ...], ...], list[int]] = {}
    for k in range(count):
        groups.setdefault(tuple(tuple(a[k].shape) for a in args), []).append(k)
    out: list[Tensor | None] = [None] * count
    for idx in groups.values():
        if len(idx) == 1:
            out[idx[0]] = fn(*(a[idx[0]] for a in args))
            continue
        res = fn(*(torch.stack([a[k] for k in idx]) for a in args))
        for pos, k in enumerate(idx):
            out[k] = res[pos]
    return [v for v in out if v is not None]


@dataclass
class TorchBlockCholesky:
    """S = R^T R with R block upper bidiagonal: ``diag[k]`` = R_kk (upper triangular),
    ``upper[k]`` = R_{k,k+1}; ``offsets[k]`` where block k starts (``offsets[-1]`` = n)."""

    diag: list[Tensor]
    upper: list[Tensor]
    offsets: tuple[int, ...]

    def inverse(self) -> Tensor:
        """Dense symmetric S^{-1} by the backward block recurrence (module doc)."""
        o, nb = self.offsets, len(self.diag)
        n = o[-1]
        r0 = self.diag[0]
        x = torch.empty((n, n), dtype=r0.dtype, device=r0.device)
        own = batched(lambda r: torch.cholesky_inverse(r, upper=True), self.diag)
        gs = batched(
            lambda r, u: torch.linalg.solve_triangular(r, u, upper=True),
            self.diag[:-1],
            self.upper,
        )
        x[o[nb - 1] :, o[nb - 1] :] = own[nb - 1]
        for k in reversed(range(nb - 1)):
            bk, g = slice(o[k], o[k + 1]), gs[k]
            row = g @ x[o[k + 1] : o[k + 2], o[k + 1] :]  # G_k X_{k+1, k+1:}
            x[bk, o[k + 1] :] = -row
            x[o[k + 1] :, bk] = -row.mT
            xkk = own[k] + row[:, : o[k + 2] - o[k + 1]] @ g.mT  # + G_k X_{k+1,k+1} G_k^T
            x[bk, bk] = (xkk + xkk.mT) / 2  # exactly symmetric
        if not bool(torch.isfinite(x).all()):
            raise np.linalg.LinAlgError("torch: non-finite block inverse")
        return x

    def solve_upper(self, v: Tensor) -> Tensor:
        """R^{-1} v for v of n rows (block back substitution)."""
        o, nb = self.offsets, len(self.diag)
        out = torch.empty_like(v)
        for k in reversed(range(nb)):
            rhs = v[o[k] : o[k + 1]]
            if k + 1 < nb:
                rhs = rhs - self.upper[k] @ out[o[k + 1] : o[k + 2]]
            out[o[k] : o[k + 1]] = torch.linalg.solve_triangular(self.diag[k], rhs, upper=True)
        return out

    def solve_upper_transposed(self, v: Tensor) -> Tensor:
        """R^{-T} v for v of n rows (block forward substitution)."""
        o, nb = self.offsets, len(self.diag)
        out = torch.empty_like(v)
        for k in range(nb):
            rhs = v[o[k] : o[k + 1]]
            if k > 0:
                rhs = rhs - self.upper[k - 1].mT @ out[o[k - 1] : o[k]]
            out[o[k] : o[k + 1]] = torch.linalg.solve_triangular(self.diag[k].mT, rhs, upper=False)
        return out


def block_cholesky(s: Tensor, offsets: tuple[int, ...]) -> TorchBlockCholesky | None:
    """Upper block Cholesky factor of the block-tridiagonal part of ``s``, or None if that is
    not positive definite (checked once, after all blocks: one device synchronisation)."""
    diag: list[Tensor] = []
    upper: list[Tensor] = []
    infos: list[Tensor] = []
    nb = len(offsets) - 1
    for k in range(nb):
        bk = slice(offsets[k], offsets[k + 1])
        a = s[bk, bk] if k == 0 else s[bk, bk] - upper[k - 1].mT @ upper[k - 1]
        r, info = torch.linalg.cholesky_ex(a, upper=True)
        diag.append(r)
        infos.append(info)
        if k + 1 < nb:
            sub = s[offsets[k + 1] : offsets[k + 2], bk]  # B_k; R_{k,k+1} = R_kk^{-T} B_k^T
            upper.append(torch.linalg.solve_triangular(r.mT, sub.mT, upper=False))
    ok = torch.stack(infos).eq(0).all()
    for r in diag:
        ok = ok & torch.isfinite(r.diagonal()).all()
    return TorchBlockCholesky(diag, upper, offsets) if bool(ok) else None


def block_matvec(d: Tensor, offsets: tuple[int, ...], v: Tensor) -> Tensor:
    """(block-tridiagonal part of symmetric ``d``) @ v, for v of n rows."""
    o, nb = offsets, len(offsets) - 1
    out = torch.empty_like(v)
    for k in range(nb):
        bk = slice(o[k], o[k + 1])
        out[bk] = d[bk, bk] @ v[bk]
    for k in range(nb - 1):
        bk, nxt = slice(o[k], o[k + 1]), slice(o[k + 1], o[k + 2])
        sub = d[nxt, bk]
        out[nxt] += sub @ v[bk]
        out[bk] += sub.mT @ v[nxt]
    return out


def lanczos_smallest(
    mv: Callable[[Tensor], Tensor],
    n: int,
    like: Tensor,
    v0: Tensor | None = None,
    *,
    tol: float = LANCZOS_TOL,
    ncv: int = LANCZOS_NCV,
    restarts: int = LANCZOS_RESTARTS,
) -> tuple[float, Tensor] | None:
    """The smallest eigenpair (theta, v) of the symmetric operator ``mv`` (n x 1 -> n x 1).

    Lanczos with full reorthogonalisation (two classical Gram-Schmidt passes), ``ncv`` steps,
    restarted from the Ritz vector until |beta_m s_m| <= tol |theta| (the residual norm of the
    Ritz pair); None if that does not happen within ``restarts``. No synchronisation inside
    a restart: a breakdown (beta ~ 0) only decouples T, whose eigenvalues stay Ritz values.
    Starts from ``v0`` if given, else from a fixed pseudo-random vector (reproducible).
    """
    m = min(ncv, n)
    if v0 is not None and tuple(v0.shape) == (n,):
        v = v0.to(like)
    else:
        gen = torch.Generator().manual_seed(0)
        v = torch.randn(n, generator=gen, dtype=torch.float64).to(like)
    for _ in range(restarts):
        q = torch.zeros((m + 1, n), dtype=like.dtype, device=like.device)
        alpha = torch.zeros(m, dtype=like.dtype, device=like.device)
        beta = torch.zeros(m, dtype=like.dtype, device=like.device)
        q[0] = v / torch.linalg.vector_norm(v).clamp_min(1e-300)
        for j in range(m):
            w = mv(q[j, :, None])[:, 0]
            basis = q[: j + 1]
            h = basis @ w
            w = w - basis.mT @ h
            h2 = basis @ w
            w = w - basis.mT @ h2
            alpha[j] = h[j] + h2[j]
            beta[j] = torch.linalg.vector_norm(w)
            q[j + 1] = w / beta[j].clamp_min(1e-300)
        a_h, b_h = alpha.cpu().numpy(), beta.cpu().numpy()
        if not (np.isfinite(a_h).all() and np.isfinite(b_h).all()):
            return None
        vals, vecs = eigh_tridiagonal(a_h, b_h[:-1], select="i", select_range=(0, 0))
        theta, s = float(vals[0]), vecs[:, 0]
        v = q[:m].mT @ torch.as_tensor(s, dtype=like.dtype, device=like.device)
        if abs(b_h[-1] * s[-1]) <= tol * abs(theta):
            return theta, v
    return None


class TorchBlockTridiagOps:
    """S's factor, inverse and step lengths by its block structure, in torch (the
    :class:`sdp.solvers.dense.PrimalOps` protocol; module doc).

    ``max_step`` takes a dense eigenvalue of R^{-T} D R^{-1} (from block solves of the
    identity) at or below ``dense_max`` rows or when Lanczos does not converge.
    """

    def __init__(self, offsets: tuple[int, ...], dense_max: int = DENSE_MAX) -> None:
        self.offsets = offsets
        self.dense_max = dense_max

    def cholesky_upper(self, s: Tensor) -> TorchBlockCholesky | None:
        return block_cholesky(s, self.offsets)

    def inverse_from_cholesky(self, fac: TorchBlockCholesky) -> Tensor:
        return fac.inverse()

    def max_step(
        self, fac: TorchBlockCholesky, d: Tensor, v0: Tensor | None = None
    ) -> tuple[float, Tensor | None]:
        """1 / max(0, -lambda_min(R^{-T} D R^{-1})) (inf if D >= 0) and the eigenvector."""
        n = self.offsets[-1]

        def mv(v: Tensor) -> Tensor:
            return fac.solve_upper_transposed(block_matvec(d, self.offsets, fac.solve_upper(v)))

        found = lanczos_smallest(mv, n, d, v0) if n > self.dense_max else None
        if found is None:  # small, or Lanczos did not converge: dense eigenvalue
            c = mv(torch.eye(n, dtype=d.dtype, device=d.device))
            lam, vec = float(eigvalsh((c + c.mT) / 2)[0]), None
        else:
            lam, vec = found
        return (math.inf if lam >= 0 else 1.0 / -lam), vec
