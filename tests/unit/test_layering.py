"""The package's layering, read from the import statements: methods → core → models; no method
imports another; a paper's summaries and report sections import no method; the report imports no
torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from recallscope.core.steps import ROLES
from recallscope.methods import PAPERS, REGISTRY
from recallscope.methods.yan_jia2025 import summaries

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "recallscope"

# what each layer may not import (subpackages of recallscope)
FORBIDDEN = {
    "models": ("core", "methods", "runner", "report", "data"),
    "core": ("methods", "runner", "report", "data"),
}
READERS = ("summaries", "report")  # a paper's modules that read stored tables


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


def _method_of(name: str) -> str | None:
    """The method a dotted module name is (or is inside), if any."""
    parts = name.split(".")
    return next((part for part in parts[2:4] if part in REGISTRY), None) if parts[1] == "methods" else None


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layers_import_only_downwards(layer):
    bad = [
        f"{path.relative_to(PACKAGE)} imports {name}"
        for path in sorted((PACKAGE / layer).rglob("*.py"))
        for name in _imports(path)
        if name.split(".")[1] in FORBIDDEN[layer]
    ]
    assert not bad, "\n".join(bad)


def test_every_method_lives_in_its_papers_folder():
    found = {path.stem for path in (PACKAGE / "methods").glob("*/*.py")} - {"__init__", *READERS}
    assert found == set(REGISTRY) == {name for names in PAPERS.values() for name in names}
    for paper, names in PAPERS.items():
        assert all((PACKAGE / "methods" / paper / f"{name}.py").exists() for name in names)


def test_no_method_imports_another_and_readers_import_none():
    edges, readers = set(), []
    for path in sorted((PACKAGE / "methods").glob("*/*.py")):
        for imported in _imports(path):
            other = _method_of(imported)
            if path.stem in READERS and other:
                readers.append(f"{path.relative_to(PACKAGE)} imports {imported}")
            elif path.stem in REGISTRY and other and other != path.stem:
                edges.add((path.stem, other))
            if path.stem in REGISTRY and imported.startswith("recallscope.report"):
                readers.append(f"method {path.stem} imports the report ({imported})")
    assert not edges, edges
    assert not readers, "\n".join(readers)


def test_the_report_imports_no_torch():
    code = "import sys, recallscope.report; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_summaries_roles_are_the_core_roles():
    assert summaries.ROLES == ROLES
