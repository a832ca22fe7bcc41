"""The ``lipcert`` command line (typer). Each subcommand lives in its own module.

Contract (design.md §5): ``--json`` prints one JSON object on stdout; errors go to stderr
with a non-zero exit status and a one-line reason.

Imports inside the command functions are deliberate: each subcommand loads only what it runs
(``lipcert --help`` and ``lipcert verify`` never load torch or FastAPI, ``lipcert bound`` no
web stack), so the commands start in a fraction of the time the whole stack takes to import.
"""

from __future__ import annotations

import typer

from service.cli import bound, convert, serve, train, worker

app = typer.Typer(
    name="lipcert",
    help="Certified l2 Lipschitz bounds and robustness radii for neural networks.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

app.command("serve")(serve.serve)
app.command("worker")(worker.worker)
app.command("bound")(bound.bound)
app.command("certify")(bound.certify)
app.command("verify")(bound.verify)
app.command("train")(train.train)
app.command("convert")(convert.convert)


def main() -> None:
    app()
