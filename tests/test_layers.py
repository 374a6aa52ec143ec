"""The package's layers import only downward, with no cycle and no private name crossing modules.

Every import statement of every module is read from the source (those inside functions too), so
an import moved into a function to dodge a cycle is still an edge here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "latticequant"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE

# Layer of each sub-package; modules directly in the package are the top (CLI, report, API).
LAYERS = {"core": 0, "version": 0, "formats": 1, "methods": 2, "pipeline": 3}
TOP = 4


def package_sources(root: Path = ROOT) -> dict[str, str]:
    """Module name -> source text of every module of the package."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path.read_text()
    return out


def layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS.get(parts[1], TOP) if len(parts) > 1 else TOP


def imports(module: str, source: str, modules: set[str]) -> list[tuple[str, str | None, int]]:
    """``(imported module, imported name or None, line)`` for every package import in source."""
    is_package = any(m.startswith(module + ".") for m in modules)
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == PACKAGE:
                    found.append((alias.name, None, node.lineno))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                anchor = module.split(".")
                anchor = anchor if is_package else anchor[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] != PACKAGE:
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in modules:
                    found.append((sub, None, node.lineno))
                else:
                    found.append((base, alias.name, node.lineno))
    return found


def violations(sources: dict[str, str]) -> list[str]:
    """Every upward import, private name taken from another module, and import cycle."""
    modules = set(sources)
    problems = []
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, source in sources.items():
        for target, name, line in imports(module, source, modules):
            if target not in modules:
                problems.append(f"{module}:{line} imports {target}, which does not exist")
                continue
            if target != module:
                graph[module].add(target)
            if layer(target) > layer(module):
                problems.append(
                    f"{module}:{line} (layer {layer(module)}) imports {target} "
                    f"(layer {layer(target)}): imports must go downward"
                )
            if name is not None and name.startswith("_") and not name.startswith("__"):
                problems.append(f"{module}:{line} imports the private name {name} from {target}")
    problems += [f"import cycle: {' -> '.join(c)}" for c in cycles(graph)]
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_package_imports_only_downward_without_cycles():
    sources = package_sources()
    assert {"latticequant.core.gptq", "latticequant.pipeline.run", "latticequant.cli"} <= set(
        sources
    )
    assert violations(sources) == []


def test_core_imports_nothing_else_of_the_package():
    sources = package_sources()
    for module, source in sources.items():
        if layer(module) == 0:
            for target, _, line in imports(module, source, set(sources)):
                assert layer(target) == 0, f"{module}:{line} imports {target}"


@pytest.mark.parametrize(
    "sources,expected",
    [
        (  # an upward import hidden inside a function
            {
                "latticequant.core.a": "def f():\n    from latticequant.pipeline.b import g\n",
                "latticequant.pipeline.b": "def g(): pass\n",
            },
            "imports must go downward",
        ),
        (  # a cycle inside one layer
            {
                "latticequant.formats.a": "from latticequant.formats.b import x\n",
                "latticequant.formats.b": "def f():\n    from latticequant.formats import a\n",
            },
            "import cycle",
        ),
        (  # a private helper taken from another module
            {
                "latticequant.pipeline.a": "from latticequant.pipeline.b import _helper\n",
                "latticequant.pipeline.b": "def _helper(): pass\n",
            },
            "private name _helper",
        ),
        (  # a relative import resolved like an absolute one
            {
                "latticequant.methods.a": "from ..pipeline import b\n",
                "latticequant.pipeline.b": "x = 1\n",
            },
            "imports must go downward",
        ),
    ],
)
def test_the_checker_finds_each_kind_of_violation(sources, expected):
    sources = {"latticequant": "", **sources}
    for name in list(sources):  # the sub-packages themselves
        parts = name.split(".")
        for i in range(2, len(parts)):
            sources.setdefault(".".join(parts[:i]), "")
    found = violations(sources)
    assert any(expected in p for p in found), found


MAX_FUNCTION_LINES = 80


def long_functions(source: str, limit: int = MAX_FUNCTION_LINES) -> list[tuple[str, int]]:
    """``(name, lines)`` of every function of ``source`` longer than ``limit`` lines."""
    return [
        (node.name, node.end_lineno - node.lineno + 1)
        for node in ast.walk(ast.parse(source))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > limit
    ]


def test_no_library_function_is_longer_than_80_lines():
    found = [
        f"{path.relative_to(ROOT.parent)}: {name} ({n} lines)"
        for path in sorted(ROOT.rglob("*.py"))
        for name, n in long_functions(path.read_text())
    ]
    assert not found, found
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    assert long_functions(f"def f():\n{body}\n") == [("f", MAX_FUNCTION_LINES + 1)]


def test_the_architecture_document_has_a_row_for_every_registered_format():
    from latticequant.formats import format_names

    doc = (ROOT.parent / "docs" / "architecture.md").read_text()
    table = doc[doc.index("The registered formats:") :]
    table = table[: table.index("\n\n", table.index("|"))]
    missing = [name for name in format_names() if f"`{name}`" not in table]
    assert not missing, f"docs/architecture.md's format table lacks {missing}"
