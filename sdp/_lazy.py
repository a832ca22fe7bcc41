"""Lazy re-exports for package faces (PEP 562 module ``__getattr__``).

A package ``__init__`` that re-exports names from its submodules eagerly makes every import of
one submodule load them all (``import sdp.ir`` used to load the bound methods and the solver
registry). :func:`lazy_exports` gives the package a ``__getattr__`` that imports the defining
submodule on first access, and a ``__dir__`` that lists the exported names, so the package face
(``from sdp import Network``) stays as it was while ``import sdp.ir`` loads only the IR.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(
    package: str, exports: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """(``__getattr__``, ``__dir__``) for ``package`` re-exporting ``name -> module``.

    The loaded value is cached in the package's namespace, so ``__getattr__`` runs once per
    name. An unknown name raises AttributeError as a plain module would.
    """

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        setattr(importlib.import_module(package), name, value)
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(importlib.import_module(package)), *exports})

    return __getattr__, __dir__
