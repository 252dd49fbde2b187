"""Every module imports; only rainbowpo/engine.py imports deepspeed."""

import ast
import importlib
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGES = ("rainbowpo", "data_prep", "benchmarks")


def _sources():
    for pkg in PACKAGES:
        yield from sorted((ROOT / pkg).rglob("*.py"))


def _imported_roots(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def test_only_engine_imports_deepspeed():
    offenders = [
        str(p.relative_to(ROOT))
        for p in _sources()
        if "deepspeed" in _imported_roots(p) and p.name != "engine.py"
    ]
    assert offenders == [], f"deepspeed imported outside rainbowpo/engine.py: {offenders}"
    assert "deepspeed" in _imported_roots(ROOT / "rainbowpo" / "engine.py")


@pytest.mark.parametrize(
    "module",
    sorted(
        ".".join(p.relative_to(ROOT).with_suffix("").parts)
        for p in _sources()
        if p.name != "__init__.py" and p.parts[-2] != "benchmarks"
    ),
)
def test_module_imports(module):
    importlib.import_module(module)
