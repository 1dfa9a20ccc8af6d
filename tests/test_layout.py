"""The code layout of docs/code-layout.md holds: layers import one way (downwards or within their own
layer) and no module imports itself back, counting imports inside functions and annotation-only ones."""

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "patchgd"
# Bottom to top; a unit is a top-level module or folder of patchgd. The leaves share the lowest layer.
LAYERS = [
    {"io", "normalize", "memory", "metrics", "runlog", "rundir", "distributed", "plots", "checkpoint", "config", "registry",
     "zstore"},
    {"grid"},
    {"data"},
    {"model"},
    {"methods"},
    {"explain", "skips"},
    {"heatmaps"},
    {"engine"},
    {"inference", "cells", "extract"},
    {"sweep"},
    {"cv"},
    {"cli", "__main__"},
]
RANK = {unit: rank for rank, units in enumerate(LAYERS) for unit in units}


def module_names() -> dict[str, Path]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ("patchgd",) + path.relative_to(PACKAGE).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def imports() -> dict[str, set[str]]:
    """Every module's patchgd imports (wherever they stand in the file), as the modules they load."""
    names = module_names()

    def known(name: str) -> str:
        while name not in names:
            name = name.rpartition(".")[0]
        return name

    edges = {}
    for module, path in names.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                found |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in names else base for alias in node.names}
        edges[module] = {known(name) for name in found if name.split(".")[0] == "patchgd"} - {module}
    return edges


def unit(module: str) -> str:
    return module.split(".")[1] if "." in module else "patchgd"


def test_every_unit_has_a_layer():
    units = {unit(m) for m in module_names()} - {"patchgd"}
    assert units <= set(RANK), f"place {sorted(units - set(RANK))} in LAYERS and in docs/code-layout.md"


def test_no_upward_import():
    upward = [f"{a} -> {b}" for a, targets in imports().items() for b in targets
              if unit(a) != "patchgd" and unit(b) != "patchgd" and RANK[unit(b)] > RANK[unit(a)]]
    assert upward == []


def test_no_import_cycle():
    edges = imports()
    state = {}  # 1: on the current path, 2: done

    def visit(module, path):
        state[module] = 1
        for target in sorted(edges.get(module, ())):
            if state.get(target) == 1:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(target):] + [target]))
            if target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])


def test_layout_page_names_every_unit():
    page = (PACKAGE.parents[1] / "docs" / "code-layout.md").read_text()
    missing = [u for u in RANK if u != "__main__" and not re.search(rf"\b{u}(/|\.py|\b)", page)]
    assert missing == []
