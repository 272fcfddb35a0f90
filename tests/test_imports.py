"""Our packages never shadow Ray's `serve` and `tune`, and are imported only by from-imports."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OURS = {"cluster", "actors", "serve", "tune", "core"}


def _py_files():
    for d in ("cluster", "actors", "serve", "tune", "core", "tests", "bench"):
        yield from (ROOT / d).rglob("*.py")


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
    import ray
    from ray import serve as ray_serve
    from ray import tune as ray_tune

    import importlib

    our_serve = importlib.import_module("serve")
    our_tune = importlib.import_module("tune")

    assert ray_serve is not our_serve and ray_tune is not our_tune
    assert ray_serve.__name__ == "ray.serve" and ray_tune.__name__ == "ray.tune"
    assert hasattr(ray_serve, "deployment") and hasattr(ray_tune, "Tuner")
    assert Path(our_serve.__file__).parent == ROOT / "serve"
    assert ray.__name__ == "ray"
