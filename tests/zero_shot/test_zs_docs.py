"""The examples of docs/diagnosis.md run as written (tiny model, the test CT under the doc's names)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from .conftest import CT, SEG

DOC = Path(__file__).resolve().parents[2] / "docs" / "diagnosis.md"


def test_docs_examples_run(tmp_path, monkeypatch, model):
    from tests.conftest import save_in_cache
    from visd.pretrained import DEFAULT_MODEL

    text = DOC.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    (yaml_block,) = re.findall(r"```yaml\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 3, "docs/diagnosis.md lost its Python examples"
    monkeypatch.setenv("VISD_HOME", str(tmp_path / "visd-home"))  # the doc's named model: a cache hit
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    save_in_cache(model, DEFAULT_MODEL)
    shutil.copy(CT, tmp_path / "scan.nii.gz")
    shutil.copy(SEG, tmp_path / "scan_totalseg.nii.gz")
    (tmp_path / "my_findings.yaml").write_text(yaml_block)
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__docs__"}
    for i, block in enumerate(blocks):
        exec(compile(block, f"{DOC}:block{i}", "exec"), namespace)
    table = pd.read_csv(tmp_path / "results.csv")
    assert set(table.scan) == {"scan", "missing"}
    assert table[table.scan == "missing"].status.str.startswith("error: CT file not found").all()
    assert list(namespace["findings"][i].name for i in range(2)) == ["Emphysema", "Aortic calcification"]
    ct = nib.load(tmp_path / "scan.nii.gz")
    for name in ("scan", "scan_again"):
        amap = nib.load(tmp_path / "maps" / f"{name}_anomaly.nii.gz")
        assert amap.shape == ct.shape and (tmp_path / "maps" / f"{name}_anomaly.png").is_file()
    np.testing.assert_allclose(  # the doc's building blocks give the map diagnose wrote
        np.asarray(nib.load(tmp_path / "maps" / "scan_again_anomaly.nii.gz").dataobj),
        np.asarray(nib.load(tmp_path / "maps" / "scan_anomaly.nii.gz").dataobj), atol=1e-6,
    )
    assert (tmp_path / "embeddings.safetensors").is_file() and (tmp_path / "results.json").is_file()
