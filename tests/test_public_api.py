"""The public surface imports, the layering holds, and every CLI command has working help.

Layering (design.md §1): ``sdp`` imports neither torch, FastAPI, pydantic, starlette, ``models``
nor ``service``; ``models`` never imports ``service``. Checked in a fresh interpreter, after
importing every submodule, by looking at ``sys.modules``.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

_IMPORT_ALL = """
import importlib, json, pkgutil, sys
failed = {}
pkg = importlib.import_module(sys.argv[1])
for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
    try:
        importlib.import_module(info.name)
    except Exception as e:
        failed[info.name] = f"{type(e).__name__}: {e}"
roots = sorted({name.split(".")[0] for name in sys.modules})
print(json.dumps({"roots": roots, "failed": failed}))
"""


def _import_everything(package: str) -> dict[str, object]:
    """Import ``package`` and all its submodules in a fresh interpreter; report top-level roots."""
    proc = subprocess.run(
        [sys.executable, "-c", _IMPORT_ALL, package],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_sdp_imports_no_torch_web_or_upper_layers() -> None:
    report = _import_everything("sdp")
    assert report["failed"] == {}, report["failed"]
    forbidden = {"torch", "fastapi", "pydantic", "starlette", "models", "service"}
    assert forbidden.isdisjoint(report["roots"]), forbidden & set(report["roots"])


def test_models_never_imports_service() -> None:
    report = _import_everything("models")
    assert report["failed"] == {}, report["failed"]
    assert "service" not in report["roots"]


def test_service_submodules_import() -> None:
    report = _import_everything("service")
    assert report["failed"] == {}, report["failed"]


@pytest.mark.parametrize("package", ["sdp", "models", "service"])
def test_public_names_resolve(package: str) -> None:
    """Every name a package (or subpackage) lists in ``__all__`` exists."""
    pkg = importlib.import_module(package)
    modules = [pkg] + [
        importlib.import_module(info.name)
        for info in pkgutil.walk_packages(pkg.__path__, package + ".")
        if info.ispkg
    ]
    for module in modules:
        for name in getattr(module, "__all__", []):
            assert hasattr(module, name), f"{module.__name__}.__all__ lists missing {name!r}"


def test_sdp_public_api() -> None:
    import sdp

    for name in ("Network", "Dense", "Conv2d", "Activation", "BoundResult", "Certificate"):
        assert name in sdp.__all__
    assert issubclass(sdp.ModelRejected, sdp.LipcertError)


def _lipcert() -> list[str]:
    """The installed console script next to this interpreter (what users run)."""
    script = Path(sys.executable).parent / "lipcert"
    assert script.is_file(), "console script missing: run `pip install -e .`"
    return [str(script)]


def test_console_script_help_lists_every_command() -> None:
    proc = subprocess.run(
        [*_lipcert(), "--help"], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr
    for command in ("serve", "bound", "certify", "verify", "train", "worker"):
        assert command in proc.stdout


@pytest.mark.parametrize("command", ["serve", "bound", "certify", "verify", "train", "worker"])
def test_subcommand_help(command: str) -> None:
    from typer.testing import CliRunner

    from service.cli import app

    result = CliRunner().invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output
