"""How our packages import: each only the layers below it, no module cycles, never shadowing Ray's libraries.

The layers (DESIGN.md): ``core`` imports nothing of ours; ``cluster`` only
``core``; ``actors`` only ``cluster`` and ``core``; ``serve`` and ``tune`` only
``actors``, ``cluster`` and ``core``; ``raytrade``, the application, anything.
Every import counts, at the top of a module or inside a function (the graph
that matters is the one at run time), and no two modules import each other,
directly or around a ring. Our packages are imported only by from-imports, and
Ray's libraries only as ``from ray import serve, tune``.
"""

from __future__ import annotations

import ast
import importlib
import tomllib
from pathlib import Path

import ray
from ray import serve as ray_serve
from ray import tune as ray_tune

ROOT = Path(__file__).resolve().parent.parent

# Each package, and the packages of ours it may import.
LAYERS: dict[str, set[str]] = {
    "core": set(),
    "cluster": {"core"},
    "actors": {"cluster", "core"},
    "serve": {"actors", "cluster", "core"},
    "tune": {"actors", "cluster", "core"},
    "raytrade": {"actors", "cluster", "core", "serve", "tune"},
}
OURS = set(LAYERS)


def _py_files():
    for d in (*sorted(OURS), "tests", "bench"):
        yield from (ROOT / d).rglob("*.py")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    """Every module of our packages, by dotted name."""
    return {_module_name(f): f for pkg in sorted(OURS) for f in (ROOT / pkg).rglob("*.py")}


def _imports(module: str, path: Path, modules: dict[str, Path]) -> list[tuple[int, str]]:
    """(line, module of ours) for each import in ``path``, wherever it sits in the file.

    ``from a.b import c`` names the module ``a.b.c`` when there is one, else ``a.b``.
    """
    out = []
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                pkg = module.split(".") if is_package else module.split(".")[:-1]
                pkg = pkg[: len(pkg) - (node.level - 1)]
                base = ".".join(pkg + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] in OURS:
                out.append((node.lineno, name))
    return out


def upward_imports(imports: dict[str, list[tuple[int, str]]]) -> list[str]:
    """``module:line -> target`` for each import of a package its layer may not import."""
    bad = []
    for module, targets in imports.items():
        layer = module.split(".")[0]
        for line, target in targets:
            top = target.split(".")[0]
            if top != layer and top not in LAYERS[layer]:
                bad.append(f"{module}:{line} -> {target} ({layer} may import {', '.join(sorted(LAYERS[layer])) or 'nothing of ours'})")
    return sorted(bad)


def import_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Groups of modules that import each other, directly or around a ring (Tarjan's strongly
    connected components, iterative so a deep graph cannot overflow the stack)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    cycles: list[list[str]] = []
    counter = 0
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges.get(root, ()))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(edges.get(w, ())))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    group = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        group.append(w)
                        if w == v:
                            break
                    if len(group) > 1 or v in edges.get(v, ()):
                        cycles.append(sorted(group))
    return sorted(cycles)


def _graph() -> tuple[dict[str, list[tuple[int, str]]], dict[str, set[str]]]:
    modules = _modules()
    imports = {m: _imports(m, p, modules) for m, p in modules.items()}
    edges = {m: {t for _, t in targets if t in modules and t != m} for m, targets in imports.items()}
    return imports, edges


def test_every_package_has_a_layer():
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests", "bench"}
    assert packages == OURS, "a new top-level package needs its place in LAYERS (and in DESIGN.md)"


def test_every_package_is_installed():
    # A package missing from pyproject's list is absent from a wheel, though an editable install finds it.
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {_module_name(p) for pkg in OURS for p in (ROOT / pkg).rglob("__init__.py")}
    assert listed == found


def test_imports_point_down():
    imports, _ = _graph()
    assert upward_imports(imports) == []


def test_no_two_modules_import_each_other():
    _, edges = _graph()
    assert import_cycles(edges) == []


def test_the_checks_catch_what_they_look_for():
    # The checkers themselves can fail: an upward import and a ring of three are both found.
    assert upward_imports({"core.bars": [(3, "cluster.settings")], "raytrade.cli": [(5, "serve.app")]}) == [
        "core.bars:3 -> cluster.settings (core may import nothing of ours)"]
    assert upward_imports({"actors.feeds": [(9, "tune.report")]})[0].startswith("actors.feeds:9 -> tune.report")
    ring = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert import_cycles(ring) == [["a", "b", "c"], ["e"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []


def test_our_packages_only_by_from_imports():
    offenders = []
    for f in _py_files():
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] in OURS:
                        offenders.append(f"{f.relative_to(ROOT)}:{node.lineno} import {alias.name}")
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in ("ray.serve", "ray.tune"):
                offenders.append(f"{f.relative_to(ROOT)}:{node.lineno} from {node.module} import ... (use `from ray import serve, tune`)")
    assert offenders == []


def test_core_has_no_ray_import():
    for f in (ROOT / "core").rglob("*.py"):
        tree = ast.parse(f.read_text())
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n == "ray" or n.startswith("ray.") for n in names), f"{f} imports ray"


def test_ray_libraries_are_not_shadowed():
    our_serve = importlib.import_module("serve")
    our_tune = importlib.import_module("tune")

    assert ray_serve is not our_serve and ray_tune is not our_tune
    assert ray_serve.__name__ == "ray.serve" and ray_tune.__name__ == "ray.tune"
    assert hasattr(ray_serve, "deployment") and hasattr(ray_tune, "Tuner")
    assert Path(our_serve.__file__).parent == ROOT / "serve"
    assert ray.__name__ == "ray"
