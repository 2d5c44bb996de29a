"""The daemon's import graph: no cycles between `cnvmd` modules, and no lab code in it.

Static: every file of the `cnvmd` package is parsed (not imported) and each
`import` / `from ... import` statement, also inside functions, becomes an edge to
the `cnvmd` module it names. Imports under `if TYPE_CHECKING:` are not edges
(they never run). `from cnvmd.x import y` is an edge to `cnvmd.x.y` when that is a
module, else to `cnvmd.x` (for a package: its `__init__`). Parent packages a
statement imports implicitly are not edges.

The lab (`cnvmlab`) starts cnvmd processes, so it may import cnvmd; the daemon
imports every module of its package at start (plug-in discovery), so nothing in
`cnvmd` may import `cnvmlab`.
"""

from __future__ import annotations

import ast
import importlib.util
import itertools
import subprocess
import sys
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

PACKAGE = "cnvmd"
FORBIDDEN = "cnvmlab"


@dataclass(frozen=True)
class Import:
    target: str  # absolute dotted name, as far as it could be resolved
    line: int
    type_only: bool  # under `if TYPE_CHECKING:`


def package_modules(package: str = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> source file, for the package and everything under it."""
    spec = importlib.util.find_spec(package)
    assert spec is not None and spec.submodule_search_locations, package
    root = Path(next(iter(spec.submodule_search_locations)))
    mods: dict[str, Path] = {}
    for f in sorted(root.rglob("*.py")):
        rel = f.relative_to(root).with_suffix("")
        parts = [package, *rel.parts]
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = f
    return mods


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _walk(nodes: list[ast.stmt], type_only: bool) -> Iterator[tuple[ast.stmt, bool]]:
    """Every statement under nodes (all nesting levels), flagged when it is type-only."""
    for node in nodes:
        yield node, type_only
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            yield from _walk(node.body, True)
            yield from _walk(node.orelse, type_only)
            continue
        for field in ("body", "orelse", "finalbody", "handlers", "cases"):
            children = getattr(node, field, None)
            if isinstance(children, list):
                for child in children:
                    if isinstance(child, ast.stmt):
                        yield from _walk([child], type_only)
                    elif isinstance(child, ast.ExceptHandler | ast.match_case):
                        yield from _walk(child.body, type_only)


def imports_of(name: str, path: Path, is_package: bool) -> list[Import]:
    """The absolute names a module imports (relative imports resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = name if is_package else name.rpartition(".")[0]
    out: list[Import] = []
    for node, type_only in _walk(tree.body, False):
        if isinstance(node, ast.Import):
            out += [Import(a.name, node.lineno, type_only) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = here.split(".")
                if node.level > 1:
                    base_parts = base_parts[: -(node.level - 1)]
                base = ".".join([*base_parts, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            out += [Import(f"{base}.{a.name}" if a.name != "*" else base, node.lineno, type_only)
                    for a in node.names]
    return out


def _resolve(target: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of target that is a module of ours (None: not ours)."""
    parts = target.split(".")
    while parts:
        cand = ".".join(parts)
        if cand in modules:
            return cand
        parts.pop()
    return None


Graph = dict[str, dict[str, int]]  # module -> {imported module: line of the first import}


def import_graph(modules: dict[str, Path]) -> tuple[Graph, list[str]]:
    """The runtime import graph restricted to the package, and imports of FORBIDDEN."""
    graph: Graph = {m: {} for m in modules}
    forbidden: list[str] = []
    for mod, path in modules.items():
        for imp in imports_of(mod, path, path.name == "__init__.py"):
            if imp.target == FORBIDDEN or imp.target.startswith(FORBIDDEN + "."):
                forbidden.append(f"{path}:{imp.line}: {mod} imports {imp.target}")
            if imp.type_only:
                continue
            dep = _resolve(imp.target, modules)
            if dep is not None and dep != mod:
                graph[mod].setdefault(dep, imp.line)
    return graph, forbidden


def strongly_connected(graph: Graph) -> list[list[str]]:
    """Tarjan's algorithm (iterative): the components with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
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
    return sorted(out)


def shortest_cycle(graph: Graph, component: list[str]) -> list[str]:
    """A shortest cycle inside one component: [a, b, ..., a]."""
    inside = set(component)
    best: list[str] = []
    for start in component:
        prev: dict[str, str] = {}
        queue = deque([start])
        found = None
        while queue and found is None:
            v = queue.popleft()
            for w in sorted(graph[v]):
                if w not in inside:
                    continue
                if w == start:
                    found = v
                    break
                if w not in prev:
                    prev[w] = v
                    queue.append(w)
        if found is None:
            continue
        path = [found]
        while path[-1] != start:
            path.append(prev[path[-1]])
        cycle = [*reversed(path), start]
        if not best or len(cycle) < len(best):
            best = cycle
    return best


def describe(graph: Graph, component: list[str]) -> str:
    cycle = shortest_cycle(graph, component)
    steps = "\n".join(f"    {a} -> {b}  (line {graph[a][b]})" for a, b in itertools.pairwise(cycle))
    return f"  component {component}\n  e.g.\n{steps}"


# ---- the checks on the helpers themselves


def test_graph_helpers_find_cycles_and_skip_type_only_imports(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg import b\n")
    (pkg / "b.py").write_text("def f():\n    from . import c\n")
    (pkg / "c.py").write_text("import pkg.a\n")
    (pkg / "d.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import e\n"
        "else:\n    import pkg.sub\n")
    (pkg / "e.py").write_text("from pkg.d import x\n")
    (pkg / "sub" / "__init__.py").write_text("from .g import y\n")
    (pkg / "sub" / "g.py").write_text("from ..sub import h\ntry:\n    import cnvmlab.lab\n"
                                      "except ImportError:\n    pass\n")
    (pkg / "sub" / "h.py").write_text("")
    mods = {f"pkg.{p}": pkg / f"{p}.py" for p in "abcde"}
    mods |= {"pkg": pkg / "__init__.py", "pkg.sub": pkg / "sub" / "__init__.py",
             "pkg.sub.g": pkg / "sub" / "g.py", "pkg.sub.h": pkg / "sub" / "h.py"}
    graph, forbidden = import_graph(mods)
    assert graph["pkg.a"] == {"pkg.b": 1}
    assert graph["pkg.b"] == {"pkg.c": 2}  # function-level, relative
    assert graph["pkg.d"] == {"pkg.sub": 5}  # the TYPE_CHECKING import is no edge
    assert graph["pkg.sub"] == {"pkg.sub.g": 1}
    assert graph["pkg.sub.g"] == {"pkg.sub.h": 1}
    assert forbidden and "pkg.sub.g imports cnvmlab.lab" in forbidden[0]
    comps = strongly_connected(graph)
    assert comps == [["pkg.a", "pkg.b", "pkg.c"]]
    assert shortest_cycle(graph, comps[0]) in (
        ["pkg.a", "pkg.b", "pkg.c", "pkg.a"], ["pkg.b", "pkg.c", "pkg.a", "pkg.b"],
        ["pkg.c", "pkg.a", "pkg.b", "pkg.c"])


# ---- the checks on cnvmd


def test_daemon_does_not_import_the_lab() -> None:
    _, forbidden = import_graph(package_modules())
    assert not forbidden, "cnvmd must not import the lab:\n" + "\n".join(forbidden)


def test_no_import_cycles_in_the_daemon() -> None:
    graph, _ = import_graph(package_modules())
    comps = strongly_connected(graph)
    report = "\n".join(describe(graph, c) for c in comps)
    if report:
        print(f"import cycles in {PACKAGE}:\n{report}")
    assert not comps, f"import cycles in {PACKAGE}:\n{report}"


def test_importing_every_daemon_module_leaves_the_lab_unloaded() -> None:
    """What the daemon does at start (import everything), in a fresh interpreter."""
    script = (
        "import importlib, pkgutil, sys, cnvmd\n"
        "for m in pkgutil.walk_packages(cnvmd.__path__, 'cnvmd.'):\n"
        "    if m.name.endswith('__main__'):\n"
        "        continue\n"
        "    try:\n"
        "        importlib.import_module(m.name)\n"
        "    except Exception as exc:\n"
        "        print('import failed:', m.name, exc, file=sys.stderr)\n"
        f"print(sorted(n for n in sys.modules if n.split('.')[0] == {FORBIDDEN!r}))\n")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       timeout=60, cwd=Path(__file__).resolve().parents[2])
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", r.stdout + r.stderr
