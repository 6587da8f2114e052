"""The Python examples of docs/evaluation.md run as written."""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "evaluation.md"


def test_docs_examples_run(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) >= 2, "docs/evaluation.md lost its Python examples"
    monkeypatch.chdir(tmp_path)
    for i, block in enumerate(blocks):
        exec(compile(block, f"{DOC}:block{i}", "exec"), {"__name__": "__docs__"})
    assert (tmp_path / "report" / "metrics.md").is_file()
    assert (tmp_path / "embeddings.safetensors").is_file()
