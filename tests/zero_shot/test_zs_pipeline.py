"""diagnose() on the real CT: file -> preprocessing -> TotalSegmentator labels -> model -> table and maps.

The oracle is the model's own ``zero_shot_classify`` on ``load_case``; invariants: the LPS copy and a
DICOM series of the same scan give the same result, maps overlay the input.
"""

from __future__ import annotations

import json
import math
import shutil

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import ndimage

from tests.data_io._helpers import write_dicom_series
from visd.data import read_ct, read_organ_mask
from visd.data.segment import totalsegmentator_classes
from visd.errors import InputError
from visd.evaluation import load_embeddings, read_predictions
from visd.zero_shot import diagnose, scan_ids_for
from visd._io import atomic_path, atomic_write_text

from .conftest import CT, CT_LPS, SEG, SEG_LPS

ABSENT = ("heart", "esophagus")  # not in this upper-abdomen scan (tests/data/README.md)


@pytest.fixture(scope="module")
def dicom_dir(tmp_path_factory):
    img = nib.load(CT)
    folder = tmp_path_factory.mktemp("dicom") / "abdomen_dicom"
    write_dicom_series(np.asarray(img.dataobj).astype(np.float64), img.affine, folder)
    return folder


@pytest.fixture(scope="module")
def run(model, dicom_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("diagnose")
    report = diagnose(
        [CT, CT_LPS, dicom_dir, out / "missing.nii.gz"],
        [SEG, SEG_LPS, SEG, SEG],
        model,
        anomaly_maps_dir=out / "maps",
        embeddings_path=out / "emb.safetensors",
        progress=False,
    )
    return report, out


def _probabilities(report, scan):
    df = report.to_pandas()
    return df[df.scan == scan].set_index("finding")["probability"]


def test_table_is_the_models_result(run, reference, model):
    report, _ = run
    assert report.scans == ("abdomen_3mm", "ct_lps", "abdomen_dicom", "missing")
    df = report.to_pandas()
    assert list(df.columns) == ["scan", "organ", "finding", "probability", "status"]
    rows = df[df.scan == "abdomen_3mm"]
    assert list(rows.finding) == [s.finding for s in reference.scores] == [f.name for f in model.config.findings]
    assert list(rows.organ) == [s.organ for s in reference.scores]
    assert list(rows.status) == [s.status for s in reference.scores]
    np.testing.assert_allclose(rows.probability, [s.probability for s in reference.scores], atol=1e-6)


def test_absent_organs_are_reported_not_scored(run):
    df = run[0].to_pandas()
    rows = df[df.scan == "abdomen_3mm"]
    absent = rows[rows.organ.isin(ABSENT)]
    assert len(absent) == 4 and (absent.status == "organ_absent").all() and absent.probability.isna().all()
    present = rows[~rows.organ.isin(ABSENT)]
    assert set(present.organ) == {"lung", "aorta"} and (present.status == "scored").all()
    assert present.probability.between(0, 1).all() and present.probability.nunique() > 1


@pytest.mark.parametrize("scan", ["ct_lps", "abdomen_dicom"])
def test_lps_copy_and_dicom_series_give_the_same_result(run, scan):
    ras, other = _probabilities(run[0], "abdomen_3mm"), _probabilities(run[0], scan)
    np.testing.assert_allclose(other.to_numpy(), ras.to_numpy(), atol=1e-4)
    assert list(other.isna()) == list(ras.isna())


def test_a_bad_case_is_skipped_with_its_reason(run, model):
    report, out = run
    assert report.failed == [("missing", report.failed[0][1])] and report.succeeded == report.scans[:3]
    assert "CT file not found" in report.failed[0][1] and str(out / "missing.nii.gz") in report.failed[0][1]
    rows = report.to_pandas().query("scan == 'missing'")
    assert len(rows) == len(model.config.findings) and rows.probability.isna().all()
    assert (rows.status == "error: " + report.failed[0][1]).all()
    assert not (out / "maps" / "missing_anomaly.nii.gz").exists()


def test_anomaly_map_overlays_the_input(run, model):
    report, out = run
    nifti, png = report.anomaly_maps["abdomen_3mm"]
    assert nifti == out / "maps" / "abdomen_3mm_anomaly.nii.gz" and png == out / "maps" / "abdomen_3mm_anomaly.png"
    ct, img = nib.load(CT), nib.load(nifti)
    assert img.shape == ct.shape and img.get_data_dtype() == np.float32
    np.testing.assert_allclose(img.affine, ct.affine, atol=1e-5)
    amap = np.asarray(img.dataobj)
    assert np.all(np.isfinite(amap)) and amap.min() >= 0
    organs = read_organ_mask(SEG, read_ct(CT), model.config)
    for label, organ in ((1, "lung"), (4, "aorta")):
        inside = amap[organs == label]
        assert inside.size > 100 and np.mean(inside > 0) > 0.95, organ
    far = ndimage.distance_transform_edt(organs == 0, sampling=ct.header.get_zooms()) > 9.0  # mm
    assert far.sum() > 0.5 * far.size and np.all(amap[far] == 0)
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 600 and im.size[1] > 300


def test_lps_map_is_the_flipped_ras_map(run):
    maps = run[0].anomaly_maps
    ras, lps = nib.load(maps["abdomen_3mm"][0]), nib.load(maps["ct_lps"][0])
    np.testing.assert_allclose(lps.affine, nib.load(CT_LPS).affine, atol=1e-5)
    np.testing.assert_allclose(np.asarray(lps.dataobj), np.asarray(ras.dataobj)[::-1, ::-1, :], atol=1e-5)


def test_embeddings_file(run, reference, model):
    report, out = run
    emb = load_embeddings(out / "emb.safetensors")
    assert emb.scans == report.scans and emb.organs == model.organs
    assert emb.embeddings.shape == (4, len(model.organs), model.config.embed_dim)
    np.testing.assert_array_equal(emb.embeddings, report.embeddings)
    np.testing.assert_allclose(emb.organ("lung")[0], reference.embeddings["lung"].numpy(), atol=1e-6)
    np.testing.assert_allclose(emb.organ("lung")[1], emb.organ("lung")[0], atol=1e-4)
    assert np.isnan(emb.organ("heart")[:3]).all() and np.isnan(emb.embeddings[3]).all()
    np.testing.assert_allclose(np.linalg.norm(emb.organ("aorta")[:3], axis=1), 1.0, atol=1e-5)


def test_csv_and_json_exports(run, tmp_path):
    report = run[0]
    csv, js = report.to_csv(tmp_path / "r.csv"), report.to_json(tmp_path / "r.json")
    back = pd.read_csv(csv)
    pd.testing.assert_frame_equal(back, report.to_pandas())
    data = json.loads(js.read_text())
    assert data["format"] == "visd.diagnosis/1" and data["scans"] == list(report.scans)
    assert data["failed"] == [{"scan": s, "reason": r} for s, r in report.failed]
    assert len(data["rows"]) == len(report.records)
    for row, rec in zip(data["rows"], report.records):
        p = rec["probability"]
        assert (row["probability"] is None) if math.isnan(p) else row["probability"] == p
    # the long format visd evaluate reads
    pred = read_predictions(csv)
    assert pred.scores.loc["abdomen_3mm", "Emphysema"] == report.to_pandas().probability[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.csv", "r.json"]  # no temporary files left


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    path = atomic_write_text(tmp_path / "t.csv", "old\n")
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("writer failed")
    assert path.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["t.csv"]
    atomic_write_text(path, "new\n")
    assert path.read_text() == "new\n" and [p.name for p in tmp_path.iterdir()] == ["t.csv"]


@pytest.mark.parametrize("num_workers", [0, 1])
def test_loaded_scans_yaml_findings_and_extra_organ_embeddings(model, model_dir, real_case, tmp_path, num_workers):
    (tmp_path / "f.yaml").write_text(
        "- organ: lung\n  name: Emphysema\n  negative: [Not Emphysema., No emphysema.]\n  positive: Emphysema.\n"
    )
    report = diagnose([read_ct(CT)], [nib.load(SEG)], str(model_dir),
                      findings=tmp_path / "f.yaml", embeddings_path=tmp_path / "e.safetensors", progress=False,
                      num_workers=num_workers)
    ensemble = ("lung", "Emphysema", ["Not Emphysema.", "No emphysema."], "Emphysema.")
    expected = model.zero_shot_classify(real_case.image, real_case.mask, findings=[ensemble])
    assert report.scans == ("abdomen_3mm",)
    np.testing.assert_allclose(report.to_pandas().probability, [expected["Emphysema"].probability], atol=1e-6)
    emb = load_embeddings(tmp_path / "e.safetensors")  # organs not asked about are embedded as well
    assert np.isfinite(emb.organ("aorta")).all() and np.isnan(emb.organ("heart")).all()


def test_segment_dir_runs_totalsegmentator_for_missing_masks(model, reference, tmp_path, monkeypatch):
    calls = []

    def fake_segment(ct_path, out_dir, fast=False, statistics=False, *, roi_subset=None, device=None):
        calls.append((ct_path, out_dir, statistics, roi_subset))
        out_dir.mkdir(parents=True)
        return shutil.copy(SEG, out_dir / "totalsegmentator.nii.gz")

    monkeypatch.setattr("visd.zero_shot.loading.segment", fake_segment)
    report = diagnose([CT], [None], model, segment_dir=tmp_path / "seg", progress=False, scan_ids=["a"])
    # statistics off, only the classes of the model's totalsegmentator_map
    assert calls == [(CT, tmp_path / "seg" / "a", False, totalsegmentator_classes(model.config))]
    np.testing.assert_allclose(_probabilities(report, "a"), [s.probability for s in reference.scores], atol=1e-6)
    report = diagnose([CT], None, model, progress=False)
    assert "no organ mask for scan 'abdomen_3mm'" in report.failed[0][1]


def test_argument_errors_are_raised_before_any_work(model):
    with pytest.raises(InputError, match="got 2 scans and 1 masks"):
        diagnose([CT, CT_LPS], [SEG], model, progress=False)
    with pytest.raises(InputError, match="Did you mean 'totalsegmentator'"):
        diagnose([CT], [SEG], model, mask_format="totalsegmentator2", progress=False)
    with pytest.raises(InputError, match="scan ids must be distinct"):
        diagnose([CT, CT], [SEG, SEG], model, scan_ids=["a", "a"], progress=False)
    with pytest.raises(InputError, match="Did you mean 'lung'"):
        diagnose([CT], [SEG], model, findings=[("lungs", "X", "a", "b")], progress=False)
    with pytest.raises(InputError, match="num_workers must be an integer >= 0, got -1"):
        diagnose([CT], [SEG], model, num_workers=-1, progress=False)


def test_scan_ids(tmp_path):
    assert scan_ids_for(["a/ct.nii.gz", "b/ct.nii.gz", "c/other.NII", "dicom/series1"]) == [
        "a_ct", "b_ct", "other", "series1"]
    assert scan_ids_for(["x/ct.nii.gz", "x/ct.nii"]) == ["x_ct", "x_ct-2"]
    assert scan_ids_for([nib.Nifti1Image(np.zeros((2, 2, 2)), np.eye(4)), str(CT)]) == ["scan_1", "abdomen_3mm"]


def test_the_scan_list_pickles_for_spawned_workers(model, real_case):
    """With the ``spawn`` start method (macOS, Windows) DataLoader workers get the scan list by pickle."""
    import pickle

    from visd.zero_shot.loading import _Cases

    cases = pickle.loads(pickle.dumps(_Cases(["a", "b"], [CT, CT], [SEG, None], model.config, "auto", None)))
    good, bad = cases[0], cases[1]
    np.testing.assert_array_equal(good.case.image, real_case.image)
    np.testing.assert_array_equal(good.case.mask, real_case.mask)
    assert good.error is None and bad.case is None and "no organ mask for scan 'b'" in bad.error
