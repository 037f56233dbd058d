"""The modules of ``slo_torch`` and ``diagnostics`` import no private name of another module, and no two
of them import each other when imported."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("slo_torch", "diagnostics")


def modules() -> dict[str, tuple[ast.Module, bool]]:
    """``{dotted name: (syntax tree, is a package __init__)}`` of every module of the packages."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            is_init = parts[-1] == "__init__"
            found[".".join(parts[:-1] if is_init else parts)] = (ast.parse(path.read_text(encoding="utf-8")), is_init)
    return found


MODULES = modules()


def source_module(module: str, node: ast.ImportFrom) -> str:
    """The dotted name ``from <...> import`` refers to, relative imports resolved."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if MODULES[module][1] else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(module: str, at_import_time: bool) -> list[tuple[ast.ImportFrom | ast.Import, str, str]]:
    """``(node, imported module, name)`` for every import of a module of the packages (``name`` is ``""``
    for ``import x``); with ``at_import_time`` only those outside functions."""
    tree = MODULES[module][0]
    nodes = list(ast.walk(tree))
    if at_import_time:
        nested = {id(n) for f in nodes if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                  for n in ast.walk(f)}
        type_only = {id(n) for i in nodes if isinstance(i, ast.If) and "TYPE_CHECKING" in ast.unparse(i.test)
                     for n in ast.walk(i)}
        nodes = [n for n in nodes if id(n) not in nested | type_only]
    out = []
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            source = source_module(module, node)
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                out.append((node, sub, "") if sub in MODULES else (node, source, alias.name))
        elif isinstance(node, ast.Import):
            out.extend((node, alias.name, "") for alias in node.names)
    return [(node, target, name) for node, target, name in out if target in MODULES]


def test_no_module_imports_a_private_name_of_another() -> None:
    private = [f"{module}: from {target} import {name}" for module in MODULES
               for _, target, name in imports(module, at_import_time=False)
               if name.startswith("_") and not name.startswith("__") and target != module]
    assert private == []


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_sees_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_cycle_at_import_time(package: str) -> None:
    # a package's __init__ imports its modules, which may import their siblings through it: edges into an
    # __init__ are left out, so a cycle here is one between modules
    graph = {m: {t for _, t, _ in imports(m, at_import_time=True) if t != m and not MODULES[t][1]}
             for m in MODULES if m.split(".")[0] == package}
    assert cycles(graph) == []
