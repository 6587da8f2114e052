"""The suite's folders never shadow an installed package.

pytest puts only the repository root on ``sys.path`` (``pythonpath`` in ``pyproject.toml``), so the
test packages are ``tests.kernels``, ``tests.training`` and so on. With ``tests/`` itself on the path,
``tests/kernels`` was the top-level ``kernels`` and hid the PyPI package of that name, which
transformers imports when it is installed: every test that built a text tower failed.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def _inside_tests(spec) -> bool:
    places = list(spec.submodule_search_locations or []) or [spec.origin]
    return any(p and Path(p).resolve().is_relative_to(TESTS) for p in places)


def test_no_folder_or_module_of_the_suite_is_a_top_level_module():
    names = sorted(p.stem for p in TESTS.iterdir() if (p.is_dir() or p.suffix == ".py") and p.stem.isidentifier())
    assert "kernels" in names and "conftest" in names  # the names that clashed or could
    shadowing = []
    for name in names:
        if name.startswith("__"):
            continue
        module = sys.modules.get(name)
        spec = module.__spec__ if module is not None else importlib.util.find_spec(name)
        if spec is not None and _inside_tests(spec):
            shadowing.append(name)
    assert not shadowing, f"tests/ is on sys.path and shadows top-level modules: {shadowing}"


def test_the_suite_is_the_package_tests():
    import tests.conftest

    assert Path(tests.conftest.__file__).resolve() == TESTS / "conftest.py"
