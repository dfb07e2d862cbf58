"""No import loops among the modules of `mesh/` and `meshxds/`, and meshxds imports nothing
from mesh.

Every import statement counts, wherever it stands: at the top, inside a function, under
`if TYPE_CHECKING:`. An import inside a function is still a dependency (it runs on the first
call), and one under TYPE_CHECKING is still two modules knowing each other: both are how a
loop gets hidden rather than removed, so neither may close one.

`from package import name` depends on `package.name` when that is a module, else on
`package`. A submodule's import does not count as depending on its parent packages' own
imports: a package's `__init__` that imports its submodules (the HTTP filters' list) is not
a loop with a submodule that imports a sibling.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("mesh", "meshxds")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    """Every module of the packages, by dotted name."""
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _imported(node: ast.AST, module: str, is_package: bool) -> Iterator[str]:
    """The dotted names one import statement asks for (absolute; submodule or not)."""
    if isinstance(node, ast.Import):
        for alias in node.names:
            yield alias.name
    elif isinstance(node, ast.ImportFrom):
        if node.level:
            package = module.split(".")
            if not is_package:
                package.pop()
            package = package[: len(package) - (node.level - 1)]
            base = ".".join(package + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        for alias in node.names:
            yield f"{base}.{alias.name}"
            yield base


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    """The module of ours `name` is or lives in (its longest known prefix), or None."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        candidate = ".".join(parts[:i])
        if candidate in known:
            return candidate
    return None


def import_graph() -> dict[str, set[str]]:
    known = modules()
    graph: dict[str, set[str]] = {}
    for name, path in known.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_package = path.name == "__init__.py"
        deps: set[str] = set()
        for node in ast.walk(tree):
            if not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            targets = list(_imported(node, name, is_package))
            if isinstance(node, ast.ImportFrom):
                # `from p import x`: p.x when it is a module, else p itself.
                pairs = zip(targets[::2], targets[1::2], strict=True)
                targets = [sub if sub in known else base for sub, base in pairs]
            for t in targets:
                dep = _resolve(t, known)
                if dep is not None and dep != name:
                    deps.add(dep)
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components; for each with more than one module, one
    loop through it (a path back to its first module), to name in the failure."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(v: str) -> None:
        # Recursion depth is bounded by the number of modules (a few hundred).
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
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
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return [_loop(graph, c) for c in components]


def _loop(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """A shortest loop from the component's first module back to it (breadth first)."""
    members = set(component)
    start = component[0]
    came: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & members):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(came[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if w not in came:
                    came[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no loop in a strongly connected component: {component}")


def test_finds_a_loop() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_loops() -> None:
    found = cycles(import_graph())
    assert not found, "import loops:\n" + "\n".join(" -> ".join(c) for c in found)


def test_meshxds_imports_nothing_from_mesh() -> None:
    graph = import_graph()
    wrong = {m: sorted(d for d in deps if d.split(".")[0] == "mesh")
             for m, deps in graph.items() if m.split(".")[0] == "meshxds"}
    assert not {m: d for m, d in wrong.items() if d}
