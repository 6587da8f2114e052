"""The Python examples in the docs run as written."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

import torch

from tests.conftest import DATA, OFFICIAL, make_tiny_model, save_in_cache

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
TESTS = ROOT / "tests"

#: docs whose python blocks no test runs, and why; each must still have python blocks and stay unrun
NOT_RUN = {
    "kernels.md": "a call sketch with undefined inputs and a CUDA/Triton benchmark (never run by tests); "
                  "the kernels are checked against visd/kernels/reference.py in tests/kernels",
}


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
    """Same keys, each tensor equal; two modules without weights are not 'the same model'."""
    sa, sb = a.state_dict(), b.state_dict()
    return bool(sa) and sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_same_weights_can_say_no():
    model = make_tiny_model(seed=5)
    assert _same_weights(model, make_tiny_model(seed=5))  # the seed fixes every weight
    assert not _same_weights(model, make_tiny_model(seed=6))
    assert not _same_weights(torch.nn.Module(), torch.nn.Module())  # empty state dicts prove nothing
    nudged = make_tiny_model(seed=5)
    with torch.no_grad():
        next(nudged.parameters()).view(-1)[0] += 1e-3  # one element of one tensor
    assert not _same_weights(model, nudged)


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
    assert ns["previous"].mode == "fused"  # what set_numerics("official") replaced: the default
    assert ns["model"].numerics.describe() == "fused"  # restored at the end of the block


def docs_with_python(root: Path = ROOT) -> set[str]:
    """File names of ``README.md`` and ``docs/*.md`` under ``root`` that hold a ```python block."""
    paths = [root / "README.md", *sorted((root / "docs").glob("*.md"))]
    return {p.name for p in paths if p.is_file() and "```python" in p.read_text()}


def docs_run_by_tests(tests: Path = TESTS) -> set[str]:
    """Doc file names whose python blocks some test module runs.

    A module runs a doc when it calls ``run_blocks("name.md", ...)`` (which runs every block), or when
    it executes code (``exec(``) and names the doc as a string (``"name.md"`` or ``".../name.md"``), as
    the subpackage doc tests do (this module counts by its ``run_blocks`` calls only). Names alone, as
    in the model-card tests' ``"README.md"``, do not count.
    """
    run: set[str] = set()
    for path in tests.rglob("*.py"):
        text = path.read_text()
        run.update(re.findall(r'run_blocks\(\s*"([\w.-]+\.md)"', text))
        if "exec(" in text and path.resolve() != Path(__file__).resolve():  # here: run_blocks only (NOT_RUN names docs)
            run.update(re.findall(r'["/]([\w.-]+\.md)"', text))
    return run


def test_the_doc_scan_finds_an_unrun_example(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "tests").mkdir()
    (tmp_path / "README.md").write_text("```python\nimport visd\n```\n")
    (tmp_path / "docs" / "run.md").write_text("```python\nx = 1\n```\n")
    (tmp_path / "docs" / "unrun.md").write_text("text, then\n```python\nx = 2\n```\n")
    (tmp_path / "docs" / "prose.md").write_text("```bash\nvisd demo\n```\n")
    (tmp_path / "tests" / "test_a.py").write_text('run_blocks("README.md", tmp_path, ROOT)\n')
    (tmp_path / "tests" / "test_b.py").write_text('DOC = ROOT / "docs" / "run.md"\nexec(code)\n')
    (tmp_path / "tests" / "test_c.py").write_text('card = folder / "unrun.md"  # named, nothing executed\n')
    assert docs_with_python(tmp_path) == {"README.md", "run.md", "unrun.md"}
    assert docs_with_python(tmp_path) - docs_run_by_tests(tmp_path / "tests") == {"unrun.md"}


def test_docs_have_examples():
    """Every doc with a python example has a test that runs it (or a stated reason in NOT_RUN)."""
    with_python, run = docs_with_python(), docs_run_by_tests()
    assert {"README.md", "quickstart.md", "official_release.md", "performance.md"} <= with_python & run
    unrun = sorted(with_python - run - NOT_RUN.keys())
    assert not unrun, f"python examples that no test runs: {unrun}; run them (run_blocks) or add them to NOT_RUN"
    stale = sorted((NOT_RUN.keys() & run) | (NOT_RUN.keys() - with_python))
    assert not stale, f"NOT_RUN lists docs that are run by a test or hold no python block: {stale}"


def test_no_undefined_model_names_in_the_docs():
    for path in [ROOT / "README.md", *DOCS.glob("*.md")]:
        text = path.read_text()
        for placeholder in ("visd-tiny", "--model MODEL", "path/to/model-or-org/name"):
            assert placeholder not in text, (path.name, placeholder)
