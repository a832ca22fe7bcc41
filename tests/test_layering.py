"""The import structure (design.md §1): the IR is the ground floor, and no module import circles.

- ``import sdp.ir`` (and ``import sdp.importers``) in a fresh interpreter loads neither the bound
  methods, the solvers, cvxpy nor torch: the IR and the importers are usable alone.
- The graph of imports between the project's own modules (read with :mod:`ast`, imports inside
  functions included, ``if TYPE_CHECKING:`` blocks left out) has no circle.
- The service's routers are not optional: an ImportError in one fails ``service.app``'s import
  instead of silently dropping its endpoints.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("sdp", "models", "service")

_LOADED = """
import importlib, json, sys
importlib.import_module(sys.argv[1])
print(json.dumps(sorted(sys.modules)))
"""


def _loaded_by(module: str) -> list[str]:
    """sys.modules after importing ``module`` alone in a fresh interpreter."""
    proc = subprocess.run(
        [sys.executable, "-c", _LOADED, module],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    loaded: list[str] = json.loads(proc.stdout.strip().splitlines()[-1])
    return loaded


@pytest.mark.parametrize("module", ["sdp.ir", "sdp.importers", "sdp.sandwich", "sdp.radius"])
def test_ground_floor_loads_no_bounds_solvers_cvxpy_or_torch(module: str) -> None:
    loaded = _loaded_by(module)
    heavy = [
        m
        for m in loaded
        if m.startswith(("sdp.bounds", "sdp.solvers", "cvxpy", "torch", "models", "service"))
    ]
    assert heavy == [], f"import {module} loaded {heavy}"


def test_package_face_still_resolves_every_name() -> None:
    import sdp
    import sdp.bounds

    for pkg in (sdp, sdp.bounds):
        for name in pkg.__all__:
            assert getattr(pkg, name) is not None, name
        assert set(pkg.__all__) <= set(dir(pkg))
    with pytest.raises(AttributeError):
        _ = sdp.no_such_name  # type: ignore[attr-defined]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement, at module level or inside a function (an import deferred into a
    function still ties the two modules), except those under ``if TYPE_CHECKING:``."""
    found: list[ast.Import | ast.ImportFrom] = []
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        elif isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
        else:
            stack.extend(ast.iter_child_nodes(node))
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (``from a import b`` names the submodule a.b
    when b is one, else the module a)."""
    files = {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        tree = ast.parse(path.read_text(), str(path))
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges: set[str] = set()
        for node in _imports(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - node.level + 1]
                    base = ".".join([*anchor, *([base] if base else [])])
                targets = [
                    f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base
                    for alias in node.names
                ]
            edges |= {t for t in targets if t in files and t != name}
        graph[name] = edges
    return graph


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circles() -> None:
    graph = import_graph()
    assert "sdp.sandwich.dense" in graph["sdp.sandwich.config"]  # the reader sees the edges
    assert _circles(graph) == []


def test_circle_finder_finds_a_circle() -> None:
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_layers_point_one_way() -> None:
    """sdp never imports models/service; models never imports service."""
    for name, edges in import_graph().items():
        root = name.split(".")[0]
        below = {"sdp": ("models", "service"), "models": ("service",), "service": ()}[root]
        assert not [e for e in edges if e.split(".")[0] in below], name


_BLOCKED_ROUTER = """
import sys
sys.modules["service.routes.jobs"] = None  # what a broken install looks like to `import`
try:
    import service.app
except ImportError as e:
    print("ImportError", e)
else:
    print("imported")
"""


def test_a_router_that_cannot_import_fails_start_up() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _BLOCKED_ROUTER],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ImportError"), proc.stdout
