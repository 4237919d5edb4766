"""The package's shape: no import cycles between regablate's modules, and names that say what they are."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

PACKAGE = REPO / "regablate"


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The regablate modules that ``path`` imports, anywhere in the file (functions included)."""
    found = set()
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            # ``from regablate.x import y`` imports regablate.x.y when y is a module, else regablate.x.
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        found |= {name for name in names if name in modules}
    return found


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: imports_of(path, set(files)) - {name} for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for child in sorted(graph[node]):
            if state.get(child) == 1:
                return path[path.index(child) :] + [child]
            if child not in state and (cycle := visit(child)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_import_graph_has_no_cycles():
    graph = import_graph()
    assert "regablate.models.backbone" in graph and "regablate.cli" in graph
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def room(module: str) -> str:
    """The folder (``regablate.probe``) or top module (``regablate.runs``) a module belongs to."""
    return ".".join(module.split(".")[:2])


def test_the_folders_and_top_modules_stack():
    """Between folders and top modules the imports form no cycle either (sweep <-> report, data <-> models were two)."""
    rooms: dict[str, set[str]] = {}
    for module, imported in import_graph().items():
        rooms.setdefault(room(module), set()).update(room(name) for name in imported)
    graph = {name: targets - {name} for name, targets in rooms.items()}
    assert {"regablate.data", "regablate.models", "regablate.sweep", "regablate.report"} <= set(graph)
    cycle = find_cycle(graph)
    assert cycle is None, "folder cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_package_module_looks_like_a_test():
    assert not list(PACKAGE.rglob("test_*.py")), "pytest would collect it"
