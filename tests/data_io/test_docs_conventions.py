"""The python examples in docs/ct_conventions.md run and their assertions hold."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "ct_conventions.md"


def _blocks() -> list[str]:
    assert DOC.is_file(), f"missing {DOC}"
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def test_doc_has_examples():
    assert len(_blocks()) >= 2


@pytest.mark.parametrize("index", range(len(_blocks())))
def test_doc_example_runs(index, monkeypatch):
    monkeypatch.chdir(ROOT)
    namespace = {"__name__": "__doc_example__"}
    exec(compile(_blocks()[index], f"{DOC.name}[block {index}]", "exec"), namespace)
    assert len(namespace) > 2, "the example defined nothing"
