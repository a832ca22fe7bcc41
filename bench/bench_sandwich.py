"""Sandwich (LBDN) layers: training-step and eval cost vs nn.Linear, and tightness on a toy fit.

Questions answered:
1. Per-step training time (forward + backward + Adam step) of an LBDN MLP vs an nn.Linear MLP of
   the same widths, vs the orthogonal (Cayley) and spectral-norm baselines; then a grid of
   widths x batch sizes (nn.Linear vs LBDN only) next to a multiply-add model of both steps.
   Goal: LBDN <= 1.5x nn.Linear.
2. Eval time with cached weights (LBDN runs as its plain MLP in eval mode). Goal: <= 1.1x.
3. Tightness: fit a steep 1-D function with gamma = 1 and report the empirical lower bound on
   the Lipschitz constant (max slope on a fine grid, plus gradient ascent) divided by gamma.

Run:
    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 \
        .venv/bin/python bench/bench_sandwich.py --threads 1
Times are medians over ``--repeats`` timed blocks of ``--steps`` steps, after a warm-up; the
models take turns within each repeat so that machine load affects them alike.

Multiply-add model (forward + backward, Adam and elementwise work not counted): nn.Linear
costs N p q per layer forward, as much for dW and (except for the input layer) for dx. The LBDN
step as implemented adds per layer p -> q: Y^T Y (p q^2) and its gradient (p q^2), the block
inverse (~q^3), and the products of its matrix chains in the order ``models.matrix_chain``
picks. "floor" is a lower estimate for *any* implementation of the same maths: the MLP's own
work plus, per layer, half of Y^T Y (a symmetric product), its gradient and an LU of I + Z
(q^3 / 3); at small batch this fixed, batch-independent work dominates.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from models.baselines import orthogonal_mlp, plain_mlp, spectral_mlp
from models.empirical import empirical_lipschitz
from models.lbdn import LBDN
from models.matrix_chain import chain_cost


def _interleaved_ms(fns: list[Callable[[], object]], steps: int, repeats: int) -> list[float]:
    """Median ms per call of each fn; the fns take turns in every repeat (fair under load)."""
    return _interleaved_stats(fns, steps, repeats)[0]


def speed(width: int, depth: int, batch: int, eval_batch: int, steps: int, repeats: int) -> None:
    in_dim, out_dim = 784, 10
    widths = [width] * depth
    torch.manual_seed(0)
    models: dict[str, nn.Module] = {
        "nn.Linear MLP": plain_mlp(in_dim, widths, out_dim),
        "LBDN (sandwich)": LBDN(in_dim, widths, out_dim, gamma=2.0),
        "orthogonal (Cayley)": orthogonal_mlp(in_dim, widths, out_dim),
        "spectral norm": spectral_mlp(in_dim, widths, out_dim),
    }
    x = torch.randn(batch, in_dim)
    y = torch.randint(0, out_dim, (batch,))
    xe = torch.randn(eval_batch, in_dim)
    trains, infers = [], []
    for model in models.values():
        step = _train_step(model, x, y)

        @torch.no_grad()
        def infer(model: nn.Module = model) -> None:
            model(xe)

        trains.append(step)
        infers.append(infer)
    t_train = _interleaved_ms(trains, steps, repeats)
    for model in models.values():
        model.eval()
    t_eval = _interleaved_ms(infers, steps, repeats)
    print(f"\nwidths {widths}, input 784, 10 classes; train batch {batch}, eval batch {eval_batch}")
    print("| model | train step (ms) | x nn.Linear | eval (ms) | x nn.Linear |")
    print("|---|---|---|---|---|")
    for name, tt, te in zip(models, t_train, t_eval, strict=True):
        print(f"| {name} | {tt:.3f} | {tt / t_train[0]:.2f} | {te:.3f} | {te / t_eval[0]:.2f} |")


def _train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step() -> None:
        model.train()
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


class _Implicit:
    """Shape stand-in for an implicit factor (M = Q^-1 or sqrt2 Psi (2 M^T - I))."""

    def __init__(self, q: int) -> None:
        self.shape, self.requires_grad = (q, q), True


def _meta(a: int, b: int, grad: bool) -> torch.Tensor:
    return torch.empty((a, b), device="meta", requires_grad=grad)


def mlp_macs(sizes: list[int], batch: int) -> float:
    """nn.Linear MLP step: forward, dW, and dx except for the input layer."""
    layers = list(itertools.pairwise(sizes))
    return sum(batch * p * q * (3 if i else 2) for i, (p, q) in enumerate(layers))


def lbdn_macs(sizes: list[int], batch: int) -> tuple[float, float]:
    """(this implementation, lower estimate for any implementation) of an LBDN step."""
    layers = list(itertools.pairwise(sizes))
    fixed = sum(2 * p * q * q + q**3 for p, q in layers)
    floor = mlp_macs(sizes, batch) + sum(1.5 * p * q * q + q**3 / 3 for p, q in layers)
    chains = 0.0
    for i, (p, q) in enumerate(layers):
        z = [_meta(batch, p, i > 0)]
        carry = [_Implicit(p)] if i else []
        chains += chain_cost([*z, *carry, _meta(p, q, True), _Implicit(q)])
    return fixed + chains, floor


def grid(widths: list[int], batches: list[int], depth: int, steps: int, repeats: int) -> None:
    print("\ngrid: MLP 784 - [width] * depth - 10, nn.Linear vs LBDN; train step (ms)")
    print(
        "| width | batch | nn.Linear (ms) | LBDN (ms) | measured ratio | min-time ratio "
        "| multiply-add ratio | floor ratio |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for width in widths:
        for batch in batches:
            torch.manual_seed(0)
            sizes = [784, *[width] * depth, 10]
            x = torch.randn(batch, 784)
            y = torch.randint(0, 10, (batch,))
            fns = [
                _train_step(plain_mlp(784, sizes[1:-1], 10), x, y),
                _train_step(LBDN(784, sizes[1:-1], 10, gamma=2.0), x, y),
            ]
            (t_mlp, t_lbdn), (m_mlp, m_lbdn) = _interleaved_stats(fns, steps, repeats)
            ours, floor = lbdn_macs(sizes, batch)
            base = mlp_macs(sizes, batch)
            print(
                f"| {width} | {batch} | {t_mlp:.2f} | {t_lbdn:.2f} | {t_lbdn / t_mlp:.2f} "
                f"| {m_lbdn / m_mlp:.2f} | {ours / base:.2f} | {floor / base:.2f} |"
            )


def _revision_lbdn(rev: str) -> type[nn.Module]:
    """The LBDN class of commit ``rev`` (its models/*.py via ``git show``, imported as the
    package ``models_before`` from a temporary folder)."""
    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, check=True
        ).stdout

    pkg = Path(tempfile.mkdtemp()) / "models_before"
    pkg.mkdir()
    for path in git("ls-tree", "--name-only", rev, "models/").split():
        if path.endswith(".py"):
            text = git("show", f"{rev}:{path}").replace("from models.", "from models_before.")
            (pkg / Path(path).name).write_text("" if path.endswith("__init__.py") else text)
    sys.path.insert(0, str(pkg.parent))
    module = importlib.import_module("models_before.lbdn")
    lbdn: type[nn.Module] = module.LBDN
    return lbdn


def before_after(rev: str, widths: list[int], batches: list[int], steps: int, repeats: int) -> None:
    """Training step of commit ``rev``'s LBDN vs the current one vs nn.Linear, interleaved."""
    old_lbdn = _revision_lbdn(rev)
    print(f"\nbefore/after: LBDN of commit {rev} vs the working tree (train step, ms, medians)")
    print(
        "| width | batch | nn.Linear | LBDN before | LBDN now | before / nn.Linear "
        "| now / nn.Linear | speed-up |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for width in widths:
        for batch in batches:
            torch.manual_seed(0)
            x = torch.randn(batch, 784)
            y = torch.randint(0, 10, (batch,))
            hidden = [width] * 2
            fns = [
                _train_step(plain_mlp(784, hidden, 10), x, y),
                _train_step(old_lbdn(784, hidden, 10, gamma=2.0), x, y),
                _train_step(LBDN(784, hidden, 10, gamma=2.0), x, y),
            ]
            (lin, old, new), _ = _interleaved_stats(fns, steps, repeats)
            print(
                f"| {width} | {batch} | {lin:.2f} | {old:.2f} | {new:.2f} | {old / lin:.2f} "
                f"| {new / lin:.2f} | {old / new:.2f}x |"
            )


def _interleaved_stats(
    fns: list[Callable[[], object]], steps: int, repeats: int
) -> tuple[list[float], list[float]]:
    """(median, min) ms per call of each fn over the repeats (interleaved)."""
    for fn in fns:
        for _ in range(3):
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            for _ in range(steps):
                fn()
            times[i].append((time.perf_counter() - t0) / steps * 1e3)
    return [statistics.median(t) for t in times], [min(t) for t in times]


def _steep(x: torch.Tensor) -> torch.Tensor:
    """A steep 1-D target: a unit step smoothed over width 0.02 (slope 50 at 0)."""
    return torch.tanh(x / 0.02)


def tightness(steps: int, seed: int) -> None:
    print("\ntightness: fit y = tanh(x / 0.02) on [-1, 1] (slope 50) with gamma = 1, MSE, Adam")
    print("| model | final MSE | empirical Lip (grid) | empirical Lip (ascent) | lower / gamma |")
    print("|---|---|---|---|---|")
    xs = torch.linspace(-1, 1, 2001, dtype=torch.float64)[:, None]
    for name, make in {
        "LBDN [64, 64], gamma = 1": lambda: LBDN(1, [64, 64], 1, gamma=1.0, dtype=torch.float64),
        "orthogonal MLP [64, 64]": lambda: orthogonal_mlp(1, [64, 64], 1).double(),
    }.items():
        torch.manual_seed(seed)
        model = make()
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        gen = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            xb = 2 * torch.rand(256, 1, generator=gen, dtype=torch.float64) - 1
            loss = nn.functional.mse_loss(model(xb), _steep(xb))
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            f = model(xs)
            mse = float(nn.functional.mse_loss(f, _steep(xs)))
            grid = float(((f[1:] - f[:-1]).abs() / (xs[1:] - xs[:-1])).max())
        ascent = empirical_lipschitz(model, 1, starts=64, steps=300, scale=0.3, seed=seed)
        low = max(grid, ascent)
        print(f"| {name} | {mse:.4f} | {grid:.4f} | {ascent:.4f} | {low:.2%} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--batch", type=int, nargs="*", default=[128, 1024])
    ap.add_argument("--eval-batch", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--grid-widths", type=int, nargs="*", default=[128, 256])
    ap.add_argument("--grid-batches", type=int, nargs="*", default=[128, 512, 1024, 4096])
    ap.add_argument(
        "--before", metavar="REV", help="also time the LBDN of this git commit (before/after)"
    )
    ap.add_argument("--fit-steps", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(
        f"torch {torch.__version__}, torch threads {torch.get_num_threads()}, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}; uptime: {load}"
    )
    for batch in args.batch:
        speed(args.width, args.depth, batch, args.eval_batch, args.steps, args.repeats)
    if args.grid_widths and args.grid_batches:
        grid(args.grid_widths, args.grid_batches, args.depth, args.steps, args.repeats)
    if args.before:
        before_after(args.before, [256, 128], [128, 1024], args.steps, args.repeats)
    tightness(args.fit_steps, args.seed)
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"\nuptime after: {load}")


if __name__ == "__main__":
    main()
