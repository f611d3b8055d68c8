"""The job's layout as a newcomer reads it: four parts (finder, record, training, processes) under the entry modules,
imports that only go down, no import cycle, and no function-level import that hides one."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import REPO

PACKAGE = REPO / "mlproject"
# From the bottom: each layer imports only itself and the layers below it (the arrows of docs/architecture.md).
LAYERS = [
    {"errors", "logs", "markdown", "progress", "catalog", "plots", "config", "configfile", "options", "__init__"},
    {"processes"},
    {"record"},
    {"training"},
    {"finder"},
    {"session"},
    {"pipeline"},
    {"study"},
    {"__main__"},
]
PARTS = ("finder", "record", "training", "processes")
HEAVY = ("torch", "torchvision", "pytorch_lightning", "lightning", "mlflow", "matplotlib")


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, root: Path) -> Iterator[tuple[str, int, bool]]:
    """(the package's module imported, line, whether at module level) for every import in the file, those under
    `if TYPE_CHECKING:` included; `from pkg import name` is pkg.name where that is a module of the package."""
    found: list[tuple[str, int, bool]] = []

    def modules(node: ast.AST) -> list[str]:
        if isinstance(node, ast.Import):
            return [alias.name for alias in node.names]
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            return [_module_of(root, node.module, alias.name) for alias in node.names]
        return []

    def visit(node: ast.AST, in_function: bool) -> None:
        for name in modules(node):
            if name.split(".")[0] == root.name:
                found.append((name, getattr(node, "lineno", 0), not in_function))
        inner = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    visit(ast.parse(path.read_text()), False)
    return iter(found)


def _module_of(root: Path, module: str, name: str) -> str:
    """`from module import name`: module.name when that is a module or package of ours, else module."""
    candidate = root.parent / Path(*f"{module}.{name}".split("."))
    return f"{module}.{name}" if candidate.is_dir() or candidate.with_suffix(".py").exists() else module


def graph(root: Path) -> dict[str, set[str]]:
    """module -> the package's modules it imports, at any level."""
    edges: dict[str, set[str]] = {}
    for path in sorted(root.rglob("*.py")):
        edges[module_name(path, root)] = {name for name, _, _ in imports(path, root)}
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), or of one importing itself."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in edges.get(node, ()):
            if nxt not in edges:
                continue
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in edges.get(node, ()):
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def layer(module: str) -> int:
    """The layer of mlproject.<first part>..."""
    first = module.split(".")[1] if "." in module else "__init__"
    return next(i for i, names in enumerate(LAYERS) if first in names)


def write_package(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_the_cycle_finder_sees_a_cycle_hidden_in_a_function(tmp_path):
    pkg = write_package(
        tmp_path / "pkg",
        {
            "__init__.py": "",
            "a.py": "from pkg import b\n",
            "b.py": "def f():\n    from pkg import a\n",
            "c.py": "from pkg import b\n",
        },
    )
    assert cycles(graph(pkg)) == [["pkg.a", "pkg.b"]]


def test_no_import_cycle_among_the_jobs_modules():
    assert cycles(graph(PACKAGE)) == []


def test_every_module_belongs_to_a_layer_and_imports_only_its_own_and_the_layers_below():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        here = module_name(path, PACKAGE)
        for name, line, _ in imports(path, PACKAGE):
            if layer(name) > layer(here):
                upward.append(f"{path.relative_to(REPO)}:{line} {here} imports {name}")
    assert upward == []


def test_the_four_parts_are_packages_whose_init_imports_nothing():
    """Importing one part's module (the host side imports record.environment) costs no other import."""
    for part in PARTS:
        init = PACKAGE / part / "__init__.py"
        assert init.exists(), part
        tree = ast.parse(init.read_text())
        assert not [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))], part


def test_a_function_level_import_of_the_package_only_keeps_a_heavy_import_off_a_light_path():
    """Inside a function, the package's own modules are imported by the command line alone (each command loads
    what it runs); anywhere else a function-level import of our own would hide a cycle."""
    inner = [
        f"{path.relative_to(REPO)}:{line} {name}"
        for path in sorted(PACKAGE.rglob("*.py"))
        for name, line, top in imports(path, PACKAGE)
        if not top and module_name(path, PACKAGE) != "mlproject.__main__"
    ]
    assert inner == []


@pytest.mark.parametrize("module", ["logs", "errors", "catalog", "markdown", "record/environment"])
def test_the_leaves_the_host_side_imports_are_free_of_heavy_packages(module):
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found = [
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
        if alias.name.split(".")[0] in HEAVY
    ] + [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and (n.module or "").split(".")[0] in HEAVY]
    assert found == []
