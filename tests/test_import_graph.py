"""The package's import graph has no cycles, counting imports inside functions (they still tie two modules
together), and the decode runtime does not reach into the exporters.

The graph is read from the sources (``ast``), not by importing: modules of ``mindhier_rt/`` and of the three
trees installed under it (``kernels/`` as ``mindhier_rt.kernels``, ``export/`` as ``mindhier_rt.export``,
``train/`` as ``mindhier_rt.train``, pyproject's package-dir). An edge A -> B means module A names B in an
``import`` or ``from ... import`` anywhere in its file (``TYPE_CHECKING`` blocks included: a cycle there is a
cycle in what the modules mean to each other).
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TREES = {"mindhier_rt": ROOT / "mindhier_rt"} | {
    f"mindhier_rt.{name}": ROOT / name for name in ("kernels", "export", "train")
}


def module_files(trees: Mapping[str, Path] = TREES) -> dict[str, Path]:
    """Dotted module name -> source file, for every ``.py`` under the trees (packages by their ``__init__``)."""
    files: dict[str, Path] = {}
    for package, folder in trees.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            files[".".join((package, *parts))] = path
    return files


def _resolve(module: str, is_package: bool, level: int, name: str | None) -> str:
    """The absolute module named by ``from <level dots><name> import ...`` in ``module``."""
    if level == 0:
        assert name is not None
        return name
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join([*base, name] if name else base)


def imported_modules(module: str, source: str, is_package: bool, known: Iterable[str]) -> set[str]:
    """The known modules that ``module``'s source imports, at any depth of its syntax tree.

    ``from pkg import name`` counts as importing ``pkg.name`` where that is a module, else ``pkg``.
    """
    known = set(known)
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, is_package, node.level, node.module)
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t in known and t != module)
    return found


def import_graph(files: Mapping[str, Path]) -> dict[str, set[str]]:
    return {
        name: imported_modules(name, path.read_text(encoding="utf-8"), path.name == "__init__.py", files)
        for name, path in files.items()
    }


def cycles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (each holds at least one cycle), sorted; Tarjan's
    algorithm, iterative."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            nxt = next((m for m in edges if m in graph), None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    component.append(m)
                    if m == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return sorted(found)


def edges_between(graph: Mapping[str, Iterable[str]], source: str, target: str) -> list[str]:
    """``a -> b`` for every module a in package ``source`` that imports a module b in package ``target``."""
    inside = lambda m, p: m == p or m.startswith(p + ".")  # noqa: E731
    return sorted(f"{a} -> {b}" for a, bs in graph.items() if inside(a, source) for b in bs if inside(b, target))


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph(module_files())


def test_the_graph_sees_every_tree_and_function_level_imports(graph: dict[str, set[str]]) -> None:
    for package in TREES:
        assert package in graph
    # imported inside functions only: the graph must still hold these edges
    assert "mindhier_rt.kernels.scale_attention" in graph["mindhier_rt.models.attention"]
    assert "mindhier_rt.runtime.torch_backend" in graph["mindhier_rt.runtime.open"]


def test_no_import_cycles(graph: dict[str, set[str]]) -> None:
    assert cycles(graph) == []


def test_the_runtime_does_not_import_the_exporters(graph: dict[str, set[str]]) -> None:
    assert edges_between(graph, "mindhier_rt.runtime", "mindhier_rt.export") == []


def test_a_lazy_import_cycle_is_found(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..c import g\n    return g\n")
    (pkg / "c.py").write_text("import pkg.a\n\ndef g():\n    return 1\n")
    (pkg / "leaf.py").write_text("from pkg import c\n")
    g = import_graph(module_files({"pkg": pkg}))
    assert g["pkg.a"] == {"pkg.sub.b"} and g["pkg.sub.b"] == {"pkg.c"} and g["pkg.leaf"] == {"pkg.c"}
    assert cycles(g) == [["pkg.a", "pkg.c", "pkg.sub.b"]]
    (pkg / "c.py").write_text("def g():\n    return 1\n")
    assert cycles(import_graph(module_files({"pkg": pkg}))) == []


def test_cycles_finds_each_component_once() -> None:
    g = {"a": {"b"}, "b": {"a", "c"}, "c": {"d"}, "d": {"c"}, "e": {"a"}, "f": set()}
    assert cycles(g) == [["a", "b"], ["c", "d"]]
    assert edges_between({"x.y": {"z.w", "x"}, "q": {"z"}}, "x", "z") == ["x.y -> z.w"]
