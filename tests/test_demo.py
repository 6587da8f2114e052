"""``visd demo``: the whole path on the shipped scan; the printed table is the CSV; the PNG is the expected image."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import numpy as np
import pandas as pd
from PIL import Image

from tests.conftest import DATA, make_tiny_model, save_in_cache
from tests.printed_table import assert_table_is_the_csv, parse_table


def _reference(model, ct, labels):
    """The model's own result on the preprocessed demo scan: (organ, finding) -> (probability, status)."""
    from visd.data import load_case

    case = load_case(ct, labels, model.config)
    return {(s.organ, s.finding): (s.probability, s.status) for s in model.zero_shot_classify(case.image, case.mask).scores}


def test_the_shipped_scan_is_the_test_scan():
    from visd.demo import demo_files

    for shipped, original in zip(demo_files(), (DATA / "abdomen_3mm.nii.gz", DATA / "abdomen_3mm_totalseg.nii.gz")):
        assert hashlib.sha256(shipped.read_bytes()).digest() == hashlib.sha256(original.read_bytes()).digest()


def test_visd_demo_prints_the_table_and_writes_the_png(tmp_path):
    from visd.demo import demo_files, generated_model

    out = tmp_path / "visd-demo"
    env = {**os.environ, "VISD_HOME": str(tmp_path / "empty-cache")}  # the official model is not in this cache
    proc = subprocess.run([sys.executable, "-m", "visd.cli", "demo", "--out", str(out), "--no-progress"],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "GENERATED weights" in proc.stdout and "ITS PROBABILITIES MEAN NOTHING" in proc.stdout
    printed = parse_table(proc.stdout)
    csv = pd.read_csv(out / "results.csv")
    assert_table_is_the_csv(printed, csv)
    scored = printed[printed.status == "scored"]
    assert set(scored.organ) == {"lung", "aorta"}  # the organs this scan shows; heart and esophagus are absent
    assert set(printed[printed.status == "organ_absent"].organ) == {"heart", "esophagus"}
    assert ((scored.probability >= 0) & (scored.probability <= 1)).all()
    want = _reference(generated_model(), *demo_files())  # seeded: the same model in this process
    for r in csv.itertuples():
        p, status = want[(r.organ, r.finding)]
        assert r.status == status
        assert (np.isnan(p) and np.isnan(r.probability)) or abs(r.probability - p) < 1e-5, r
    with Image.open(out / "abdomen_3mm_anomaly.png") as im:
        im.load()
        assert im.format == "PNG" and im.size == (1200, 460)  # three panels and the colour bar, 12 x 4.6 in at 100 dpi
        rgb = np.asarray(im.convert("RGB"), dtype=np.float32)
    assert rgb.std() > 20  # a CT image, not a blank canvas
    for name in ("results.json", "abdomen_3mm_anomaly.nii.gz"):
        assert (out / name).stat().st_size > 0, name


def test_the_official_model_in_the_cache_is_used(tmp_path, monkeypatch):
    from visd.demo import demo_files, run_demo
    from visd.pretrained import DEFAULT_MODEL

    monkeypatch.setenv("VISD_HOME", str(tmp_path / "cache"))
    model = make_tiny_model(seed=3)
    folder = save_in_cache(model, DEFAULT_MODEL)
    result = run_demo(tmp_path / "out", progress=False)
    assert not result.generated_weights and result.notice == "" and result.model == str(folder)
    want = _reference(model, *demo_files())
    got = result.report.to_pandas()
    scored = got[got.status == "scored"]
    assert len(scored) == 12
    np.testing.assert_allclose(scored.probability, [want[(o, f)][0] for o, f in zip(scored.organ, scored.finding)],
                               atol=1e-5)
    assert sorted(result.files) == ["anomaly_nifti", "anomaly_png", "csv", "json"]
    assert all(p.parent == tmp_path / "out" and p.is_file() for p in result.files.values())


def test_the_demo_files_are_package_data():
    """Every file of visd/demo_data matches a package-data pattern, so a wheel (pip install) carries it."""
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["visd"]
    files = {p for p in (root / "visd" / "demo_data").rglob("*") if p.is_file()}
    covered = {p for pattern in patterns for p in (root / "visd").glob(pattern)}
    assert files and files <= covered, sorted(str(p) for p in files - covered)
    assert "recursive-include visd/demo_data" in (root / "MANIFEST.in").read_text()  # and the sdist
