"""``lipcert train``: train a sandwich (LBDN) network and save it as .safetensors.

Adam on cross-entropy with the true logit lowered by sqrt(2) * gamma * eps (models.train),
rich progress (loss, running accuracy, validation clean/certified accuracy per epoch), then
clean and certified accuracy on a held-out split and the closed-form check of the saved file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer

from service.cli._common import fail

THREADS_ENV = "LIPCERT_TORCH_THREADS"


def train(
    data: Path = typer.Option(
        ..., help="Training data: .npz (arrays x, y) or an MNIST IDX folder."
    ),
    split: str = typer.Option(
        "train",
        help="IDX folder: which split to train on, train or t10k (the test split: its "
        "held-out accuracy is then no test accuracy).",
    ),
    out: Path = typer.Option(..., help="Output .safetensors file."),
    arch: str = typer.Option(
        "lbdn", help="lbdn (dense) | lbdn-conv (circular-conv sandwich layers, then dense)."
    ),
    widths: str | None = typer.Option(
        None,
        help="Hidden widths (lbdn, default 64,64) or conv channels (lbdn-conv, default 8,16), "
        "comma separated.",
    ),
    strides: str | None = typer.Option(
        None,
        help="lbdn-conv: stride 1|2 per conv layer, comma separated (default 2,2 with the "
        "default channels, else all 1).",
    ),
    kernel_size: int = typer.Option(3, min=1, help="lbdn-conv: taps of the free kernels."),
    dense_widths: str | None = typer.Option(
        None,
        help="lbdn-conv: widths of dense sandwich layers after the flatten, comma separated "
        "(default none).",
    ),
    gamma: float = typer.Option(2.0, help="Lipschitz bound of the network (l2)."),
    epochs: int = typer.Option(10, min=1),
    batch_size: int = typer.Option(128, min=1),
    lr: float = typer.Option(1e-3, min=0.0),
    eps: float = typer.Option(0.5, min=0.0, help="Radius for the margin offset and cert. acc."),
    limit: int | None = typer.Option(None, min=1, help="Use only the first N examples."),
    val_fraction: float = typer.Option(0.1, min=0.0, max=0.9, help="Held-out fraction."),
    seed: int = typer.Option(0),
    threads: int | None = typer.Option(
        None, min=1, help=f"torch threads (default ${THREADS_ENV} or 2)."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON summary on stdout."),
) -> None:
    """Train an LBDN (dense or convolutional) with Lipschitz bound GAMMA; save .safetensors."""
    if arch not in ("lbdn", "lbdn-conv"):
        fail(f"unknown arch {arch!r}; expected lbdn or lbdn-conv")
    if gamma <= 0:
        fail("gamma must be > 0")
    if widths is None:
        widths = "8,16" if arch == "lbdn-conv" else "64,64"
        if arch == "lbdn-conv" and strides is None:
            strides = "2,2"
    try:
        hidden = [int(w) for w in widths.split(",") if w.strip()]
    except ValueError:
        fail(f"widths must be comma-separated integers, got {widths!r}")
    if not hidden or min(hidden) <= 0:
        fail("widths must be positive")
    try:
        conv_strides = [int(v) for v in (strides or "").split(",") if v.strip()] or [1] * len(
            hidden
        )
    except ValueError:
        fail(f"strides must be comma-separated integers, got {strides!r}")
    if arch == "lbdn-conv" and (
        len(conv_strides) != len(hidden) or not set(conv_strides) <= {1, 2}
    ):
        fail("strides: one stride (1 or 2) per conv layer")
    if dense_widths is not None and arch != "lbdn-conv":
        fail("--dense-widths is for --arch lbdn-conv (lbdn takes its widths from --widths)")
    try:
        dense = [int(w) for w in (dense_widths or "").split(",") if w.strip()]
    except ValueError:
        fail(f"dense widths must be comma-separated integers, got {dense_widths!r}")
    if dense and min(dense) <= 0:
        fail("dense widths must be positive")

    import numpy as np
    import torch
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from models.data import load_dataset
    from models.io import load_network, save_lbdn
    from models.lbdn import LBDN
    from models.train import TrainConfig, evaluate, split_holdout, train_classifier
    from sdp.bounds.sandwich import sandwich_bound

    torch.set_num_threads(threads or int(os.environ.get(THREADS_ENV, "2")))
    torch.manual_seed(seed)
    if split not in ("train", "t10k"):
        fail(f"unknown split {split!r}; expected train or t10k")
    try:
        x_all, y_all = load_dataset(data, split=split)
    except FileNotFoundError as e:
        hint = "; pass --split t10k to train on the test split" if split == "train" else ""
        fail(f"{e}{hint}")
    except (OSError, ValueError) as e:
        fail(f"cannot read {data}: {e}")
    if limit is not None:
        x_all, y_all = x_all[:limit], y_all[:limit]
    if len(x_all) < 2:
        fail("need at least 2 examples")
    if y_all.min() < 0:
        fail("labels must be non-negative class indices")
    n_classes = int(y_all.max()) + 1
    x_tr, y_tr, x_va, y_va = split_holdout(x_all, y_all, val_fraction, seed)
    in_shape = tuple(int(v) for v in x_all.shape[1:])
    in_dim = int(np.prod(in_shape))
    model: torch.nn.Module
    if arch == "lbdn-conv":
        from models.conv_lbdn import ConvLBDN

        img_shape = (1, *in_shape) if len(in_shape) == 2 else in_shape
        if len(img_shape) != 3 or img_shape[1] != img_shape[2]:
            fail(f"lbdn-conv needs square images (n x n or c x n x n), got shape {in_shape}")
        try:
            model = ConvLBDN(
                img_shape,
                hidden,
                n_classes,
                gamma,
                strides=conv_strides,
                kernel_size=kernel_size,
                dense_widths=dense,
            )
        except ValueError as e:
            fail(f"invalid conv architecture: {e}")
    else:
        model = LBDN(in_dim, hidden, n_classes, gamma=gamma, input_shape=in_shape)
    xt, yt = torch.from_numpy(x_tr.reshape(len(x_tr), -1)), torch.from_numpy(y_tr)
    xv, yv = torch.from_numpy(x_va.reshape(len(x_va), -1)), torch.from_numpy(y_va)
    val = (xv, yv) if len(xv) else None

    # soft_wrap: one line per epoch also when stderr is a file or a pipe (no 80-column wrap);
    # the live bar only on a terminal (elsewhere it leaves a blank line behind)
    err = Console(stderr=True, soft_wrap=True)
    n_batches = -(-len(xt) // batch_size)
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, eps=eps, seed=seed)
    with Progress(
        TextColumn("epoch {task.fields[epoch]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}  acc {task.fields[acc]:.3f}"),
        console=err,
        transient=True,
        disable=not err.is_terminal,
    ) as progress:
        task = progress.add_task("train", total=n_batches, epoch=1, loss=0.0, acc=0.0)

        def on_batch(epoch: int, b: int, loss: float, acc: float) -> None:
            progress.update(task, completed=b + 1, epoch=epoch + 1, loss=loss, acc=acc)

        def on_epoch(s: object) -> None:
            v = getattr(s, "val", None)
            line = (
                f"epoch {s.epoch + 1}/{epochs}  loss {s.loss:.4f}  "  # type: ignore[attr-defined]
                f"train acc {s.train_accuracy:.4f}  {s.seconds:.1f}s"  # type: ignore[attr-defined]
            )
            if v is not None:
                line += f"  val acc {v.clean:.4f}  certified@{eps:g} {v.certified:.4f}"
            err.print(line)
            progress.reset(task, total=n_batches)

        train_classifier(model, xt, yt, gamma, cfg, val=val, on_batch=on_batch, on_epoch=on_epoch)
    if arch == "lbdn-conv":
        from models.conv_lbdn import save_conv_lbdn

        save_conv_lbdn(model, out, claimed_gamma=gamma)  # type: ignore[arg-type]
    else:
        save_lbdn(model, out, claimed_gamma=gamma)  # type: ignore[arg-type]
    result = sandwich_bound(load_network(out))
    final = evaluate(model, xv, yv, gamma, eps) if val is not None else None
    summary = {
        "out": str(out),
        "gamma": gamma,
        "lipschitz_bound": result.value,
        "closed_form_confirmed": bool(
            result.certificate and result.certificate.meta.get("closed_form_confirmed")
        ),
        "train_examples": len(xt),
        "heldout_examples": len(xv),
        "accuracy": None if final is None else final.clean,
        "certified_accuracy": None if final is None else final.certified,
        "eps": eps,
    }
    if json_out:
        typer.echo(json.dumps(summary))
        return
    if final is not None:
        typer.echo(
            f"held-out ({len(xv)}): clean accuracy {final.clean:.4f}, "
            f"certified accuracy at eps={eps:g}: {final.certified:.4f}"
        )
    typer.echo(f"saved {out}; verified Lipschitz bound {result.value:.6g} (gamma = {gamma:g})")
