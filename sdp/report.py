"""Reports of certified radii: a TSV table and a certified-accuracy-vs-radius plot."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sdp.radius import RadiusResult, certified_accuracy


def write_tsv(path: str | Path, result: RadiusResult, labels: np.ndarray | None = None) -> None:
    """One row per input: ``idx label predict radius correct`` (label/correct -1 when unknown)."""
    radius = result.best_radius
    lines = ["idx\tlabel\tpredict\tradius\tcorrect"]
    for i, (p, r) in enumerate(zip(result.prediction, radius, strict=True)):
        lab = -1 if labels is None else int(np.asarray(labels).reshape(-1)[i])
        cor = -1 if result.correct is None else int(bool(result.correct[i]))
        lines.append(f"{i}\t{lab}\t{int(p)}\t{float(r):.10g}\t{cor}")
    Path(path).write_text("\n".join(lines) + "\n")


def plot_certified_accuracy(
    path: str | Path, result: RadiusResult, *, title: str = "", points: int = 200
) -> None:
    """Certified accuracy (or certified fraction without labels) against the l2 radius (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    radius = result.best_radius
    correct = result.correct if result.correct is not None else np.ones(radius.shape, bool)
    top = float(radius.max()) * 1.05 if radius.size and radius.max() > 0 else 1.0
    eps = np.linspace(0.0, top, points)
    acc = certified_accuracy(radius, correct, eps)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(eps, acc)
    ax.set_xlabel("l2 radius")
    ax.set_ylabel("certified accuracy" if result.correct is not None else "certified fraction")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.set_title(title or f"L = {result.lipschitz:.4g}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
