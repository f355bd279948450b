"""The package's layout: imports go one way, between modules and between the stages (subpackages)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.locations import REPO

PACKAGE = REPO / "p2ch_luna"



def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The package's modules that ``path`` imports anywhere (lazy imports inside functions too)."""
    found = set()
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    known = {module_name(path) for path in paths}
    graph = {}
    for path in paths:
        if path.name == "__main__.py":
            continue
        name = module_name(path)
        graph[name] = {other for other in imported_modules(path, known) if other != name
                       and not name.startswith(other + ".")}  # a module may import its own package's __init__
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of nodes (first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def stage(module: str) -> str:
    """The stage a module belongs to: its subpackage (``p2ch_luna.diagnose``) or itself when top-level."""
    return ".".join(module.split(".")[:2])


def test_no_module_imports_itself_back() -> None:
    assert find_cycle(import_graph()) is None


def test_no_two_stages_import_each_other() -> None:
    graph = import_graph()
    stages: dict[str, set[str]] = {}
    for module, imported in graph.items():
        stages.setdefault(stage(module), set()).update(stage(other) for other in imported if stage(other) != stage(module))
    assert find_cycle(stages) is None


@pytest.mark.parametrize("graph, cycle", [
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
    ({"a": {"b"}, "b": set(), "c": {"a", "b"}}, None),
])
def test_the_cycle_finder_finds_cycles(graph: dict[str, set[str]], cycle: list[str] | None) -> None:
    assert find_cycle(graph) == cycle


def test_the_graph_sees_lazy_imports() -> None:
    graph = import_graph()
    assert "p2ch_luna.diagnose.figures" in graph["p2ch_luna.diagnose.pipeline"]  # imported inside a function
    assert "p2ch_luna.metrics.froc" in graph["p2ch_luna.evaluation.scoring"]
