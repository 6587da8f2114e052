"""The Python examples in the docs run as written."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from conftest import DATA, OFFICIAL, make_tiny_model

DOCS = Path(__file__).resolve().parents[1] / "docs"


def python_blocks(name: str) -> list[str]:
    blocks = re.findall(r"```python\n(.*?)```", (DOCS / name).read_text(), flags=re.S)
    assert blocks, f"no python example in docs/{name}"
    return blocks


def run_blocks(name: str, folder: Path) -> dict:
    namespace: dict = {"__name__": "__docs__"}
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        for code in python_blocks(name):
            exec(compile(code, f"docs/{name}", "exec"), namespace)
    finally:
        os.chdir(cwd)
    return namespace


def test_quickstart(tmp_path):
    make_tiny_model().save_pretrained(tmp_path / "visd-tiny")
    shutil.copy(DATA / "abdomen_3mm.nii.gz", tmp_path / "scan.nii.gz")
    shutil.copy(DATA / "abdomen_3mm_totalseg.nii.gz", tmp_path / "scan_totalseg.nii.gz")
    ns = run_blocks("quickstart.md", tmp_path)
    assert ns["organs"].status["lung"] == "scored" and ns["organs"].status["heart"] == "organ_absent"
    assert ns["result"]["Aortic calcification"].status == "scored"


def test_official_release(tmp_path, official_tiny_checkpoint):
    for name in ("checkpoint_vqvae.pth", "checkpoint.pth"):
        os.symlink(official_tiny_checkpoint, tmp_path / name)
    shutil.copytree(OFFICIAL / "tiny_text", tmp_path / "BiomedVLP-CXR-BERT-specialized")
    run_blocks("official_release.md", tmp_path)
    assert (tmp_path / "visd-ctrate-chest" / "model.safetensors").is_file()


def test_performance_options(tmp_path):
    make_tiny_model().save_pretrained(tmp_path / "visd-tiny")
    ns = run_blocks("performance.md", tmp_path)
    assert ns["model"].window_batch_size == 4 and ns["model"].channels_last


@pytest.mark.parametrize("name", ["quickstart.md", "official_release.md", "performance.md"])
def test_docs_have_examples(name):
    assert all("import" in b or "model" in b for b in python_blocks(name))
