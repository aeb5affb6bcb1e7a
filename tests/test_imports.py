"""No import cycles among the project's modules (salmonn/, schemas/, pipelines/).

The graph is built from the source with ``ast``: an edge for every module-level import of a
project module (``import a.b``, ``from a import b`` where ``a.b`` is a module, ``from .x import
y``). Imports inside functions are not edges (they run late), which is exactly why they must not
be used to dodge a cycle: :func:`function_level_imports` lists them for review.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("salmonn", "schemas", "pipelines")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _module_level(body: list[ast.stmt]) -> Iterator[ast.stmt]:
    """Statements that run at import: the body, and the bodies of module-level if/try/with
    (except ``if TYPE_CHECKING:``), not function or class bodies."""
    for node in body:
        if isinstance(node, ast.If):
            test = node.test
            if (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
                    isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"):
                yield from _module_level(node.orelse)
                continue
            yield from _module_level(node.body)
            yield from _module_level(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody, *[h.body for h in node.handlers]):
                yield from _module_level(block)
        elif isinstance(node, ast.With):
            yield from _module_level(node.body)
        else:
            yield node


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, modules: set[str]) -> set[str]:
    out = set()
    if isinstance(node, ast.Import):
        for alias in node.names:
            name = alias.name
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name:
                out.add(name)
        return out
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        source = ".".join([*base, node.module] if node.module else base)
    else:
        source = node.module or ""
    if source in modules:
        out.add(source)
    for alias in node.names:
        sub = f"{source}.{alias.name}"
        if sub in modules:
            out.add(sub)
    return out


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    names = set(modules)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        edges: set[str] = set()
        for node in _module_level(tree.body):
            if isinstance(node, ast.Import | ast.ImportFrom):
                edges |= _targets(node, name, path.name == "__init__.py", names)
        edges.discard(name)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
    return sorted(out)


def function_level_imports(package: str = "pipelines") -> dict[str, list[str]]:
    """module -> project modules it imports inside functions (late imports to review)."""
    modules = _modules()
    names = set(modules)
    out: dict[str, list[str]] = {}
    for name, path in modules.items():
        if not name.startswith(package):
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        top = {id(n) for n in _module_level(tree.body)}
        late = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom) and id(node) not in top:
                targets = _targets(node, name, path.name == "__init__.py", names)
                late.extend(f"{t} (line {node.lineno})" for t in sorted(targets))
        if late:
            out[name] = late
    return out


def test_the_checker_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_relative_and_from_imports():
    graph = import_graph()
    assert "salmonn.checkpoint" in graph["salmonn.load"] and "salmonn.tiny" in graph["salmonn.load"]
    assert "schemas.vocabulary" in graph["schemas"]
    assert "salmonn.load" not in graph["salmonn.checkpoint"]


@pytest.mark.parametrize("package", ["salmonn", "schemas"])
def test_no_import_cycle_in(package):
    found = [c for c in cycles(import_graph()) if any(m.split(".")[0] == package for m in c)]
    assert not found, f"import cycles: {found}"


def test_no_import_cycle_anywhere():
    found = cycles(import_graph())
    assert not found, f"import cycles: {found}"


def test_no_cycle_hidden_in_a_function_level_import():
    """A function-level import that closes a cycle only hides it: count those edges too."""
    graph = import_graph()
    for module, late in function_level_imports().items():
        graph[module] = graph[module] | {entry.split(" ")[0] for entry in late}
    found = cycles(graph)
    assert not found, f"import cycles: {found}"
