"""A DICOM series written from the real NIfTI scan reads back to the same HU and geometry."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest

from visd.data import load_case, read_ct
from visd.data.dicom import read_dicom_series
from visd.errors import InputError

from ._helpers import data_file, write_dicom_series


@pytest.fixture(scope="module")
def nifti_ct():
    return read_ct(data_file("abdomen_3mm.nii.gz"))


@pytest.fixture(scope="module")
def series(tmp_path_factory, nifti_ct):
    folder = tmp_path_factory.mktemp("dicom") / "series"
    write_dicom_series(nifti_ct.array_hu, nifti_ct.affine, folder)
    return folder


def test_series_reads_back_like_the_nifti(series, nifti_ct):
    first = pydicom.dcmread(sorted(series.iterdir())[0])
    assert float(first.RescaleSlope) == 1.0 and float(first.RescaleIntercept) == -1024.0
    assert first.pixel_array.min() < 0 < first.pixel_array.max()  # stored = HU + 1024, signed
    ct = read_ct(series)
    np.testing.assert_array_equal(ct.array_hu, nifti_ct.array_hu)  # rescale applied exactly once
    np.testing.assert_allclose(ct.affine, nifti_ct.affine, atol=1e-4)
    assert ct.axcodes == "RAS" and ct.source == str(series)


def test_series_with_slope_two(tmp_path, nifti_ct):
    hu = np.round(nifti_ct.array_hu / 2) * 2  # representable with slope 2
    write_dicom_series(hu, nifti_ct.affine, tmp_path / "s2", slope=2.0, intercept=-1000.0, seed=3)
    np.testing.assert_array_equal(read_dicom_series(tmp_path / "s2").array_hu, hu)


def test_dicom_series_and_nifti_give_the_same_model_input(series, config):
    from_nifti = load_case(data_file("abdomen_3mm.nii.gz"), data_file("abdomen_3mm_totalseg.nii.gz"), config)
    from_dicom = load_case(series, data_file("abdomen_3mm_totalseg.nii.gz"), config)
    np.testing.assert_array_equal(from_dicom.image, from_nifti.image)
    np.testing.assert_array_equal(from_dicom.mask, from_nifti.mask)


def test_non_ct_modality(tmp_path, nifti_ct):
    write_dicom_series(nifti_ct.array_hu[:, :, :3], nifti_ct.affine, tmp_path / "mr", modality="MR")
    with pytest.raises(InputError, match=r"IM000\d.dcm has Modality 'MR'. Expected 'CT'"):
        read_ct(tmp_path / "mr")


def test_missing_slice(tmp_path, nifti_ct):
    paths = write_dicom_series(nifti_ct.array_hu[:, :, :8], nifti_ct.affine, tmp_path / "gap")
    paths[4].unlink()
    with pytest.raises(InputError, match=r"gap: 6\.000 mm .* 3\.000 mm elsewhere \(about 1 slice\(s\) missing\)"):
        read_ct(tmp_path / "gap")


def test_single_slice_is_2d(tmp_path, nifti_ct):
    write_dicom_series(nifti_ct.array_hu[:, :, :1], nifti_ct.affine, tmp_path / "one")
    with pytest.raises(InputError, match="single DICOM slice .* 2D image"):
        read_ct(tmp_path / "one")


def test_two_series_in_one_folder(tmp_path, nifti_ct):
    write_dicom_series(nifti_ct.array_hu[:, :, :3], nifti_ct.affine, tmp_path / "mixed", seed=1)
    for p in write_dicom_series(nifti_ct.array_hu[:, :, 3:6], nifti_ct.affine, tmp_path / "other", seed=2):
        p.rename(tmp_path / "mixed" / f"B{p.name}")
    with pytest.raises(InputError, match="holds 2 DICOM series"):
        read_ct(tmp_path / "mixed")


def test_folder_without_dicom(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(InputError, match="no DICOM image files"):
        read_ct(tmp_path)
