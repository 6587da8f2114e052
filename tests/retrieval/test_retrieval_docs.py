"""The Python examples of docs/retrieval.md run as written, on the real abdomen scan."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from tests.conftest import make_tiny_model, save_in_cache

from .conftest import CT, SEG

DOC = Path(__file__).resolve().parents[2] / "docs" / "retrieval.md"


def test_docs_examples_run(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) == 3, "docs/retrieval.md lost its Python examples"
    monkeypatch.setenv("VISD_HOME", str(tmp_path / "cache"))  # the named model, as a finished first use left it
    save_in_cache(make_tiny_model(seed=0), "visd-boost-ctrate")
    shutil.copy(CT, tmp_path / "scan.nii.gz")
    shutil.copy(SEG, tmp_path / "scan_totalseg.nii.gz")
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__docs__"}
    for i, block in enumerate(blocks):
        exec(compile(block, f"{DOC}:block{i}", "exec"), namespace)
    assert namespace["hits"]["scan"].tolist() == ["scan"] and namespace["skipped"] == []
