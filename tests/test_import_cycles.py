"""The modules of echo and echo_kernels import one another without a cycle.

The graph is read from the source (ast), not from a running import: every `import x`, `from x import
y` and relative import counts, wherever it sits, so a lazy import inside a function is a dependency
as much as one at the top of a module. An edge goes to the most specific module named: `from .kernels
import attention` depends on echo_kernels.kernels.attention, `from .config import EchoConfig` on
echo.config. A package's own __init__ is not counted as imported by its submodules' imports (Python
runs it first, but it only re-exports them).
"""

from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("echo", "echo_kernels")
# Compiled modules (setup.py builds echo_kernels._C from csrc/): leaves of the graph, with no .py
# file, which `from . import _C` names as a submodule and not as a name of the package.
EXTENSIONS = ("echo_kernels._C",)


def _modules() -> dict[str, str]:
    """{dotted module name: path} of every .py file of PACKAGES, and EXTENSIONS (path None)."""
    found = {}
    for package in PACKAGES:
        for folder, _, files in os.walk(os.path.join(ROOT, package)):
            for name in files:
                if not name.endswith(".py"):
                    continue
                path = os.path.join(folder, name)
                parts = os.path.relpath(path, ROOT)[: -len(".py")].split(os.sep)
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                found[".".join(parts)] = path
    return found | dict.fromkeys(EXTENSIONS)


def _imported(module: str, path: str, modules: dict[str, str]) -> set[str]:
    """The modules of `modules` that `module` (at `path`) imports, anywhere in its body."""
    is_package = os.path.basename(path) == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import name`: name is a submodule, or a name defined in pkg.
            targets.update(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                           for alias in node.names)
    deps = set()
    for target in targets:
        # `import a.b.c` of a name that is not a module of ours: its nearest enclosing module of ours.
        while target and target not in modules:
            target = target.rpartition(".")[0]
        if target and target != module:
            deps.add(target)
    return deps


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {module: _imported(module, path, modules) if path else set() for module, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of `graph` as [a, b, ..., a], or None (depth-first search, iterative)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph[nxt])))
    return None


def test_graph_sees_lazy_and_relative_imports():
    """The graph holds the edges it must: a relative import, and an import inside a function."""
    graph = import_graph()
    assert "echo.model" in graph["echo"]  # `from .model import Echo` in echo/__init__.py
    assert "echo_kernels.kernels.attention" in graph["echo_kernels.aot"]  # lazy, inside _echo_launches
    assert graph["echo_kernels._extension"] == {"echo_kernels._C"}  # `from . import _C`, a compiled module


def test_find_cycle_reports_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
