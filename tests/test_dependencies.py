"""Every runtime dependency in pyproject.toml is imported by visd/; the test-oracle libraries are not.

A library that does no work in the package belongs in the extra where it is used
(docs/dependencies.md gives the verdict and reason for each candidate).
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement.strip())
    assert match, requirement
    return re.sub(r"[-_.]+", "-", match.group(0)).lower()  # PEP 503 normalised


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _imported_distributions() -> set[str]:
    """The distributions that provide the top-level modules imported anywhere in visd/."""
    modules: set[str] = set()
    for path in (ROOT / "visd").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                modules.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    providers = importlib.metadata.packages_distributions()
    return {_name(dist) for module in modules for dist in providers.get(module, ())}


def test_each_runtime_dependency_is_imported_by_visd():
    runtime = {_name(r) for r in _project()["dependencies"]}
    imported = _imported_distributions()
    assert {"torch", "numpy", "nibabel"} <= runtime  # the parse found the list
    unused = sorted(runtime - imported)
    assert not unused, (
        f"runtime dependencies that no module of visd/ imports: {unused}. Move them to the extra where they "
        "are used (test, train, ...) and give the reason in docs/dependencies.md."
    )


def test_test_oracles_are_not_runtime_dependencies():
    project = _project()
    runtime = {_name(r) for r in project["dependencies"]}
    oracles = {"monai", "open-clip-torch", "timm"}
    assert oracles <= {_name(r) for r in project["optional-dependencies"]["test"]}
    assert not oracles & runtime
    assert not oracles & _imported_distributions()  # else they do work in the package and are runtime


def test_dependency_table_has_a_row_per_candidate():
    table = (ROOT / "docs" / "dependencies.md").read_text()
    for library in ("monai", "timm", "open_clip", "huggingface_hub", "highdicom", "TotalSegmentator"):
        assert f"`{library}" in table, library
