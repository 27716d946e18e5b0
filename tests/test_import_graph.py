"""No import cycle between the modules of src/mnemos, counting function-local imports too.

Every ``import`` / ``from ... import`` of a mnemos module anywhere in a module (top level, inside functions and
methods, under ``try`` or ``if``) is an edge of the graph: a function-local import that only hides a cycle from the
interpreter is still a cycle here. Only imports under ``if TYPE_CHECKING:`` are left out: they never run and name
types for annotations (eval/tables.py names ``EvalResults`` that way, whose ``markdown()`` renders through it).
An edge goes to the module imported (``from pkg import mod`` -> pkg.mod when mod is a module, else pkg). The implicit
import of a module's parent packages is not an edge: only what a module names itself.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
ROOT = "mnemos"


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted((SRC / ROOT).rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """Every Import / ImportFrom node, outside ``if TYPE_CHECKING:`` blocks, at any depth."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _known(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of a dotted name that is a mnemos module."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in modules:
            return ".".join(parts[:n])
    return None


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in _imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [_known(a.name, modules) for a in node.names]
            else:
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base_name = ".".join(base + ([node.module] if node.module else []))
                else:
                    base_name = node.module or ""
                targets = [_known(f"{base_name}.{a.name}", modules) or _known(base_name, modules) for a in node.names]
            graph[mod].update(t for t in targets if t is not None and t != mod)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [m0, m1, ..., m0], or None (depth-first search, colours)."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_the_graph_sees_the_package():
    graph = import_graph()
    assert "mnemos.ops.memory_rule.chunked" in graph and "mnemos.eval.harness" in graph
    assert "mnemos.ops.memory_rule.common" in graph["mnemos.ops.memory_rule.chunked"]  # a relative import
    assert "mnemos.layers" in graph["mnemos.models.lm"]  # `from ..layers import Attention`: the package


def test_a_function_local_import_is_an_edge():
    graph = import_graph()
    assert "mnemos.train.loop" in graph["mnemos.cli"]  # cli imports its subcommands inside functions


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Cycles until none is left, each found one with its closing edge taken out: every cycle gets reported at least
    once (not every cycle through an edge already reported)."""
    graph = {m: set(e) for m, e in graph.items()}
    out = []
    while (cycle := find_cycle(graph)) is not None:
        out.append(cycle)
        graph[cycle[-2]].discard(cycle[-1])
    return out


def test_cycles_are_found():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert cycles(graph) == [["a", "b", "c", "a"]]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_in_src():
    found = cycles(import_graph())
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)
