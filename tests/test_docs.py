"""The Python examples in the docs run as written."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

import torch

from conftest import DATA, OFFICIAL, make_tiny_model, save_in_cache

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def python_blocks(name: str, folder: Path = DOCS) -> list[str]:
    blocks = re.findall(r"```python\n(.*?)```", (folder / name).read_text(), flags=re.S)
    assert blocks, f"no python example in {folder.name}/{name}"
    return blocks


def run_blocks(name: str, folder: Path, docs: Path = DOCS) -> dict:
    namespace: dict = {"__name__": "__docs__"}
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        for code in python_blocks(name, docs):
            exec(compile(code, f"{docs.name}/{name}", "exec"), namespace)
    finally:
        os.chdir(cwd)
    return namespace


@pytest.fixture
def official_in_cache(tmp_path, monkeypatch):
    """A tiny model as the cached ``visd-boost-ctrate`` (VISD_HOME in tmp_path, no network): the docs' name
    loads it as a real cache hit. Returns the model saved."""
    from visd.pretrained import DEFAULT_MODEL

    monkeypatch.setenv("VISD_HOME", str(tmp_path / "visd-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = make_tiny_model(seed=5)
    save_in_cache(model, DEFAULT_MODEL)
    return model


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _scan_files(folder: Path) -> None:
    shutil.copy(DATA / "abdomen_3mm.nii.gz", folder / "scan.nii.gz")
    shutil.copy(DATA / "abdomen_3mm_totalseg.nii.gz", folder / "scan_totalseg.nii.gz")


def test_quickstart(tmp_path, official_in_cache):
    _scan_files(tmp_path)
    ns = run_blocks("quickstart.md", tmp_path)
    assert _same_weights(ns["model"], official_in_cache)  # the name loaded the cached model
    demo = ns["demo"]
    assert not demo.generated_weights and demo.files["anomaly_png"] == Path("visd-demo/abdomen_3mm_anomaly.png")
    assert (tmp_path / "visd-demo" / "abdomen_3mm_anomaly.png").is_file()
    assert ns["organs"].status["lung"] == "scored" and ns["organs"].status["heart"] == "organ_absent"
    assert ns["result"]["Aortic calcification"].status == "scored"


def test_readme(tmp_path, official_in_cache):
    text = (ROOT / "README.md").read_text()
    assert 'python -m pip install "torch==2.14.1" "torchvision==0.29.1" -e ".[test]"' in text  # the source install
    assert "pip install visd" not in text  # not on the package index yet
    for command in ("visd demo", "visd diagnose scan.nii.gz --segment --out results.csv", "python -m pytest"):
        assert command in text, command
    _scan_files(tmp_path)
    ns = run_blocks("README.md", tmp_path, ROOT)
    assert _same_weights(ns["model"], official_in_cache)
    assert ns["result"]["Emphysema"].status == "scored"


def test_official_release(tmp_path, official_tiny_checkpoint):
    for name in ("checkpoint_vqvae.pth", "checkpoint.pth"):
        os.symlink(official_tiny_checkpoint, tmp_path / name)
    shutil.copytree(OFFICIAL / "tiny_text", tmp_path / "BiomedVLP-CXR-BERT-specialized")
    run_blocks("official_release.md", tmp_path)
    assert (tmp_path / "visd-ctrate-chest" / "model.safetensors").is_file()


def test_performance_options(tmp_path, official_in_cache):
    ns = run_blocks("performance.md", tmp_path)
    assert ns["model"].window_batch_size == 4 and ns["model"].channels_last


@pytest.mark.parametrize("name", ["quickstart.md", "official_release.md", "performance.md"])
def test_docs_have_examples(name):
    assert all("import" in b or "model" in b for b in python_blocks(name))


def test_no_undefined_model_names_in_the_docs():
    for path in [ROOT / "README.md", *DOCS.glob("*.md")]:
        text = path.read_text()
        for placeholder in ("visd-tiny", "--model MODEL", "path/to/model-or-org/name"):
            assert placeholder not in text, (path.name, placeholder)
