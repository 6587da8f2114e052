"""The import graph of ``visd/``: no cycle, and the model package depends on no program built on it.

Every module under ``visd/`` is read with :mod:`ast` (nothing is imported), and every import counts:
at module level, inside functions and methods, and under ``if TYPE_CHECKING:``. A lazy import still
ties the two modules together; a cycle through one is a cycle.

Edges, at module granularity:

- ``import a.b.c`` gives ``m -> a.b.c`` (the longest prefix that is a module of ``visd``);
- ``from a.b import x`` gives ``m -> a.b.x`` when ``a/b/x.py`` (or ``a/b/x/__init__.py``) exists,
  else ``m -> a.b`` (``x`` is a name defined in ``a.b``);
- relative imports are resolved against the importing module's package first;
- importing ``a.b.c`` is *not* an edge to the parent packages ``a`` and ``a.b``, although Python runs
  their ``__init__`` first: a package ``__init__`` that re-exports its submodules would otherwise tie
  every submodule to every other, and those re-exports are lazy or one-way by design;
- only modules of ``visd`` are nodes; the standard library and third-party packages are not.
"""

from __future__ import annotations

import ast
from collections import deque
from collections.abc import Iterable, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "visd"

#: packages that the model (``visd.models``) must never import: programs built on the model
PROGRAMS = ("visd.zero_shot", "visd.training", "visd.evaluation", "visd.retrieval")


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """Every module of the package at ``root``, by dotted name."""
    return {_module_name(p, root): p for p in sorted(root.rglob("*.py"))}


def _known(name: str, modules: Iterable[str]) -> str | None:
    """The longest prefix of ``name`` that is a module (``a.b.c`` -> ``a.b`` when ``c`` is a name)."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in modules:
            return candidate
    return None


def imports_of(name: str, path: Path, modules: Mapping[str, Path]) -> set[str]:
    """The modules of the package that module ``name`` (file ``path``) imports, anywhere in the file."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                if node.level > 1:
                    base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            known = _known(target, modules)
            if known is not None and known != name:
                out.add(known)
    return out


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """``{module: modules it imports}`` over the package at ``root`` (see the module docstring)."""
    modules = module_files(root)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def tangles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """The strongly connected components that hold a cycle (modules that all reach each other), sorted."""
    graph = {k: sorted(set(v) & set(graph)) for k, v in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def strongconnect(v: str) -> None:  # Tarjan; the graph has a few hundred nodes, recursion is fine
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                strongconnect(w)
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
            components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return sorted(c for c in components if len(c) > 1 or c[0] in graph[c[0]])


def find_cycles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """One shortest cycle ``[a, b, ..., a]`` per tangle (:func:`tangles`), through its first module."""
    graph = {k: sorted(set(v) & set(graph)) for k, v in graph.items()}
    cycles = []
    for component in tangles(graph):
        members = set(component)
        start = component[0]
        # breadth-first from start back to start inside the component: a shortest cycle through it
        previous: dict[str, str] = {}
        queue = deque([start])
        while queue:
            v = queue.popleft()
            if start in graph[v]:
                chain = [v]
                while chain[-1] != start:
                    chain.append(previous[chain[-1]])
                cycles.append([start, *reversed(chain[:-1]), start] if v != start else [start, start])
                break
            for w in graph[v]:
                if w in members and w not in previous and w != start:
                    previous[w] = v
                    queue.append(w)
    return sorted(cycles)


def _in(module: str, packages: Iterable[str]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def _reachable(graph: Mapping[str, Iterable[str]], start: str) -> dict[str, str | None]:
    """``{module: the module that first imported it}`` for everything ``start`` reaches."""
    seen: dict[str, str | None] = {start: None}
    queue = deque([start])
    while queue:
        v = queue.popleft()
        for w in sorted(graph.get(v, ())):
            if w not in seen:
                seen[w] = v
                queue.append(w)
    return seen


def _chain(seen: Mapping[str, str | None], end: str) -> str:
    chain = [end]
    while seen[chain[-1]] is not None:
        chain.append(seen[chain[-1]])
    return " -> ".join(reversed(chain))


# -- the checker can fail --------------------------------------------------------------------------
def test_the_cycle_finder_finds_known_cycles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}, "f": {"g"}, "g": {"d"}}
    assert find_cycles(graph) == [["a", "b", "c", "a"], ["e", "e"]]
    assert tangles(graph) == [["a", "b", "c"], ["e"]]
    assert _chain(_reachable(graph, "f"), "d") == "f -> g -> d" and "a" not in _reachable(graph, "f")
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    # two cycles through one module are one component; the shortest cycle through its first member is shown
    assert find_cycles({"a": {"b", "c"}, "b": {"a"}, "c": {"d"}, "d": {"a"}}) == [["a", "b", "a"]]


def test_edges_follow_the_documented_rules(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.b import thing\n",
        "b.py": "def f():\n    from . import a\n    from .sub import leaf, NAME\n",
        "sub/__init__.py": "NAME = 1\n",
        "sub/leaf.py": "import pkg.sub.other\nfrom ..a import x\nimport os\n",
        "sub/other.py": "from pkg import sub\n",
    }
    for rel, text in files.items():
        (pkg / rel).write_text(text)
    assert import_graph(pkg) == {
        "pkg": set(),
        "pkg.a": {"pkg.b"},
        "pkg.b": {"pkg.a", "pkg.sub.leaf", "pkg.sub"},
        "pkg.sub": set(),
        "pkg.sub.leaf": {"pkg.sub.other", "pkg.a"},
        "pkg.sub.other": {"pkg.sub"},
    }
    assert find_cycles(import_graph(pkg)) == [["pkg.a", "pkg.b", "pkg.a"]]


# -- visd ------------------------------------------------------------------------------------------
def test_visd_has_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 50 and "visd.models.model" in graph  # the walk found the package
    cycles = find_cycles(graph)
    lines = []
    by_first = {t[0]: t for t in tangles(graph)}
    for cycle in cycles:
        members = by_first[cycle[0]]
        edges = "; ".join(f"{m} -> {', '.join(sorted(graph[m] & set(members)))}" for m in members)
        lines.append(f"{' -> '.join(cycle)}\n    all {len(members)} modules of this tangle and their edges: {edges}")
    assert not cycles, "import cycles in visd/ (a shortest one per tangle):\n" + "\n".join(lines)


def test_the_model_imports_no_program_built_on_it():
    graph = import_graph()
    bad = sorted(
        f"{m} -> {t}" for m, targets in graph.items() if _in(m, ["visd.models"]) for t in targets if _in(t, PROGRAMS)
    )
    assert not bad, f"visd.models imports from {', '.join(PROGRAMS)}:\n" + "\n".join(bad)


def test_hub_code_never_reaches_the_model_class():
    """timm's rule: the loader is handed the class (``from_pretrained(model_cls, ...)``), never imports it."""
    graph = import_graph()
    loaders = ("visd.hub", "visd.model_card", "visd.pretrained", "visd._fetch", "visd._release", "visd.models.official")
    for start in loaders:
        seen = _reachable(graph, start)
        assert "visd.models.model" not in seen, _chain(seen, "visd.models.model")
