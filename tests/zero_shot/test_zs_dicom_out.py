"""DICOM outputs: a findings SR and an anomaly Parametric Map for a DICOM series input, read back.

The series is the real abdomen CT written as DICOM slices (the writer of tests/data_io/test_dicom_series.py)
with the patient and frame-of-reference attributes a scanner export carries.
"""

from __future__ import annotations

import sys
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from tests.data_io._helpers import write_dicom_series
from visd.cli import main
from visd.data import read_ct
from visd.data.dicom import LPS_TO_RAS
from visd.errors import MissingDependencyError
from visd.zero_shot import diagnose
from visd.zero_shot.dicom_out import DICOM_SCHEME, write_dicom_outputs

from .conftest import CT, SEG


def _series(folder, frame_of_reference=True):
    ct = read_ct(CT)
    write_dicom_series(ct.array_hu, ct.affine, folder)
    frame = generate_uid()
    for f in folder.iterdir():
        ds = pydicom.dcmread(f)
        ds.PatientID, ds.PatientName, ds.StudyDate = "VISD-TEST-1", "Test^Patient", "20260101"
        if frame_of_reference:
            ds.FrameOfReferenceUID = frame
        ds.save_as(f)
    return folder


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    return _series(tmp_path_factory.mktemp("dicom") / "abdomen")


@pytest.fixture(scope="module")
def run(series, model, tmp_path_factory):
    out = tmp_path_factory.mktemp("dicom_run")
    report = diagnose([series], [SEG], model, anomaly_maps_dir=out / "maps", dicom_out=out / "dicom",
                      progress=False)
    return report, out


def _source(series):
    return [pydicom.dcmread(f, stop_before_pixels=True) for f in series.iterdir()]


def test_sr_holds_the_findings_and_references_the_source(run, series):
    report, out = run
    sources = _source(series)
    sr = hd.sr.srread(out / "dicom" / "abdomen" / "findings_sr.dcm")
    assert sr.SOPClassUID == pydicom.uid.Comprehensive3DSRStorage
    assert sr.StudyInstanceUID == sources[0].StudyInstanceUID and sr.PatientID == "VISD-TEST-1"
    assert sr.SeriesInstanceUID != sources[0].SeriesInstanceUID  # a new series of the same study
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == sources[0].StudyInstanceUID
    referenced = evidence.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == sources[0].SeriesInstanceUID
    assert {i.ReferencedSOPInstanceUID for i in referenced.ReferencedSOPSequence} == {s.SOPInstanceUID for s in sources}

    found = {}
    for group in sr.content.get_image_measurement_groups():
        organ = group.finding_type.meaning
        assert group.finding_type.scheme_designator == DICOM_SCHEME
        for m in group.get_measurements():
            found[(organ, m.name.meaning)] = m.value
    expected = {(r["organ"], r["finding"]): r["probability"] for r in report.records if r["status"] == "scored"}
    assert expected and found.keys() == expected.keys()  # every scored finding, nothing else
    for key, p in expected.items():
        assert abs(found[key] - p) < 1e-6, key
    assert len(expected) < len(report.records)  # this scan has unscored organs (heart), and they are left out


def test_parametric_map_is_the_nifti_map_on_the_source_grid(run, series):
    report, out = run
    sources = sorted(_source(series), key=lambda s: float(s.ImagePositionPatient[2]))
    pm = pydicom.dcmread(out / "dicom" / "abdomen" / "anomaly_pm.dcm")
    assert pm.SOPClassUID == pydicom.uid.ParametricMapStorage
    assert pm.StudyInstanceUID == sources[0].StudyInstanceUID
    assert pm.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    assert pm.ReferencedSeriesSequence[0].SeriesInstanceUID == sources[0].SeriesInstanceUID

    nifti = nib.load(report.anomaly_maps["abdomen"][0])
    volume = np.asarray(nifti.dataobj)
    assert volume.std() > 0  # a real map, not a constant
    frames = pm.pixel_array  # (frame, row, column); each frame placed by its own position
    lps = LPS_TO_RAS @ nifti.affine  # the NIfTI grid in DICOM's patient coordinates
    by_position = {tuple(np.round([float(v) for v in s.ImagePositionPatient], 3)): s for s in sources}
    slices = []
    for j, frame in enumerate(pm.PerFrameFunctionalGroupsSequence):
        position = np.asarray([float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient])
        index = np.linalg.solve(lps, np.append(position, 1.0))[:3]  # the NIfTI voxel of the frame's first pixel
        np.testing.assert_allclose(index, [0, 0, np.round(index[2])], atol=1e-4)
        k = int(np.round(index[2]))
        slices.append(k)
        np.testing.assert_array_equal(frames[j], volume[:, :, k].T)  # rows = Y, columns = X
        source = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        assert source == by_position[tuple(np.round(position, 3))].SOPInstanceUID  # derived from that slice
    assert sorted(slices) == list(range(volume.shape[2]))  # every slice once
    shared = pm.SharedFunctionalGroupsSequence[0]
    assert [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing] == [3.0, 3.0]


def test_nifti_input_gets_no_dicom_outputs(model, tmp_path, reference):
    report = diagnose([CT], [SEG], model, dicom_out=tmp_path / "dicom", progress=False)
    assert not report.failed and not list((tmp_path).rglob("*.dcm"))


def test_series_without_frame_of_reference_gets_the_sr_only(model, tmp_path, caplog):
    series = _series(tmp_path / "incomplete", frame_of_reference=False)
    report = diagnose([series], [SEG], model, anomaly_maps_dir=tmp_path / "maps", dicom_out=tmp_path / "dicom",
                      progress=False)
    assert not report.failed
    written = sorted(p.name for p in (tmp_path / "dicom" / "incomplete").iterdir())
    assert written == ["findings_sr.dcm"] and "no FrameOfReferenceUID" in caplog.text


def test_missing_highdicom(monkeypatch, series, tmp_path):
    monkeypatch.setitem(sys.modules, "highdicom", None)
    with pytest.raises(MissingDependencyError, match=r'pip install "visd\[dicom\]"') as err:
        write_dicom_outputs(series, "s", [("lung", "Emphysema", 0.5, "scored")], tmp_path)
    assert isinstance(err.value, ImportError)


def test_cli_dicom_out(series, model_dir, tmp_path, capsys):
    args = ["diagnose", series, "--mask", SEG, "--model", model_dir, "--out", tmp_path / "r.csv",
            "--dicom-out", tmp_path / "dicom", "--no-progress"]
    assert main([str(a) for a in args]) == 0, capsys.readouterr().err
    sr = hd.sr.srread(tmp_path / "dicom" / "abdomen" / "findings_sr.dcm")
    assert sr.StudyInstanceUID == pydicom.dcmread(next(series.iterdir())).StudyInstanceUID
    assert not (tmp_path / "dicom" / "abdomen" / "anomaly_pm.dcm").exists()  # no --anomaly-maps


def test_missing_highdicom_stops_the_run_before_any_scan(monkeypatch, series, model_dir, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "highdicom", None)
    out = tmp_path / "r.csv"
    args = ["diagnose", series, "--mask", SEG, "--model", model_dir, "--out", out, "--dicom-out", tmp_path / "dicom",
            "--no-progress"]
    assert main([str(a) for a in args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and 'pip install "visd[dicom]"' in err
    assert not out.exists() and not Path(str(out) + ".journal").exists()  # nothing that blocks the next run
