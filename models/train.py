"""Training LBDNs with a certified-margin loss, and clean/certified accuracy.

Certified accuracy at radius eps (design.md §4): an input counts when it is classified correctly
and its margin m = f_y - max_{j != y} f_j exceeds sqrt(2) * gamma * eps, because then every
x' with ||x' - x||_2 <= eps keeps the class (Lip(f) <= gamma).

The loss is cross-entropy on logits whose true-class entry is lowered by
``sqrt(2) * gamma * eps`` (the margin a certificate at radius eps needs), so minimising it
pushes margins past the certified threshold (cf. Wang & Manchester 2023, §6).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F


def margin_offset(gamma: float, eps: float) -> float:
    """sqrt(2) * gamma * eps: the margin that certifies radius eps."""
    return math.sqrt(2.0) * gamma * eps


def offset_cross_entropy(logits: Tensor, labels: Tensor, offset: float) -> Tensor:
    """CE(f - offset * onehot(y), y): cross-entropy with the true logit lowered by ``offset``."""
    if offset:
        logits = logits - offset * F.one_hot(labels, logits.shape[1]).to(logits.dtype)
    return F.cross_entropy(logits, labels)


def margins(logits: Tensor, labels: Tensor) -> Tensor:
    """f_y - max_{j != y} f_j per row (negative when misclassified)."""
    true = logits.gather(1, labels[:, None])[:, 0]
    other = logits.scatter(1, labels[:, None], float("-inf")).max(dim=1).values
    return true - other


@dataclass
class Accuracy:
    clean: float
    certified: float
    eps: float


@torch.no_grad()
def evaluate(
    model: nn.Module, x: Tensor, y: Tensor, gamma: float, eps: float, batch_size: int = 1000
) -> Accuracy:
    """Clean accuracy and certified accuracy at l2 radius ``eps`` (model in eval mode)."""
    was_training = model.training
    model.eval()
    ok = cert = 0
    for i in range(0, len(x), batch_size):
        m = margins(model(x[i : i + batch_size]), y[i : i + batch_size])
        ok += int((m > 0).sum())
        cert += int((m > margin_offset(gamma, eps)).sum())
    model.train(was_training)
    n = max(len(x), 1)
    return Accuracy(ok / n, cert / n, eps)


@dataclass
class EpochStats:
    epoch: int
    loss: float
    train_accuracy: float
    seconds: float
    val: Accuracy | None = None


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    eps: float = 0.5
    seed: int = 0
    history: list[EpochStats] = field(default_factory=list)


def train_classifier(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    gamma: float,
    config: TrainConfig,
    *,
    val: tuple[Tensor, Tensor] | None = None,
    on_batch: Callable[[int, int, float, float], None] | None = None,
    on_epoch: Callable[[EpochStats], None] | None = None,
) -> list[EpochStats]:
    """Adam on the offset cross-entropy (offset sqrt(2) gamma eps); returns per-epoch stats.

    ``on_batch(epoch, batch, loss, running_accuracy)`` and ``on_epoch(stats)`` report progress.
    """
    gen = torch.Generator().manual_seed(config.seed)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    offset = margin_offset(gamma, config.eps)
    history: list[EpochStats] = []
    for epoch in range(config.epochs):
        model.train()
        t0 = time.perf_counter()
        perm = torch.randperm(len(x), generator=gen)
        tot_loss, tot_ok, seen = 0.0, 0, 0
        for b, i in enumerate(range(0, len(x), config.batch_size)):
            idx = perm[i : i + config.batch_size]
            logits = model(x[idx])
            loss = offset_cross_entropy(logits, y[idx], offset)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            n = len(idx)
            tot_loss += loss.item() * n
            tot_ok += int((logits.argmax(1) == y[idx]).sum())
            seen += n
            if on_batch is not None:
                on_batch(epoch, b, loss.item(), tot_ok / seen)
        stats = EpochStats(epoch, tot_loss / seen, tot_ok / seen, time.perf_counter() - t0)
        if val is not None:
            stats.val = evaluate(model, val[0], val[1], gamma, config.eps)
        history.append(stats)
        if on_epoch is not None:
            on_epoch(stats)
    model.eval()
    return history


def split_holdout(
    x: np.ndarray, y: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Random (x_train, y_train, x_val, y_val) with ``fraction`` held out."""
    perm = np.random.default_rng(seed).permutation(len(x))
    n_val = max(1, round(len(x) * fraction)) if fraction > 0 else 0
    val, tr = perm[:n_val], perm[n_val:]
    return x[tr], y[tr], x[val], y[val]
