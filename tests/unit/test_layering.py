"""The package's layering, read from the import statements: methods → core → models; no method
imports another; nothing in core or models imports methods, the runner or the report."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "recallscope"

# what each layer may not import (subpackages of recallscope)
FORBIDDEN = {
    "models": ("core", "methods", "runner", "report", "data"),
    "core": ("methods", "runner", "report", "data"),
    "methods": ("runner", "report"),
}
# methods that still call another method: the declared dependencies the runner will hand over
DEPENDENCIES = {("neuron_ablation", "logprob_attribution"), ("query_attribution", "logprob_attribution")}


def _imports(path: Path) -> set[str]:
    """``recallscope.*`` modules imported by ``path`` (``from recallscope.x import y`` gives both)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if name.startswith("recallscope.")}


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layers_import_only_downwards(layer):
    bad = [
        f"{path.relative_to(PACKAGE)} imports {name}"
        for path in sorted((PACKAGE / layer).rglob("*.py"))
        for name in _imports(path)
        if name.split(".")[1] in FORBIDDEN[layer]
    ]
    assert not bad, "\n".join(bad)


def test_no_method_imports_another():
    methods = {path.stem for path in (PACKAGE / "methods").glob("*.py")} - {"__init__", "base"}
    edges = set()
    for name in methods:
        for imported in _imports(PACKAGE / "methods" / f"{name}.py"):
            parts = imported.split(".")
            if parts[1] == "methods" and len(parts) > 2 and parts[2] in methods:
                edges.add((name, parts[2]))
    assert edges == DEPENDENCIES
