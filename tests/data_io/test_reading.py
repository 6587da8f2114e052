"""Reading CT scans from NIfTI files, nibabel images and arrays; bad inputs give one clear error."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest

from visd.data import read_ct
from visd.errors import InputError

from ._helpers import data_file, save_nifti


def test_nifti_reads_hu_and_geometry(ras_ct):
    ct = read_ct(data_file("abdomen_3mm.nii.gz"))
    assert ct.array_hu.dtype == np.float32
    np.testing.assert_array_equal(ct.array_hu, np.asarray(ras_ct.dataobj).astype(np.float32))
    np.testing.assert_array_equal(ct.affine, ras_ct.affine)
    assert ct.spacing == (3.0, 3.0, 3.0) and ct.axcodes == "RAS" and ct.shape == (122, 101, 30)
    assert ct.source.endswith("abdomen_3mm.nii.gz")


def test_image_and_array_sources_agree(ras_ct):
    from_file = read_ct(data_file("abdomen_3mm.nii.gz"))
    from_image = read_ct(ras_ct)
    from_array = read_ct(np.asarray(ras_ct.dataobj), affine=ras_ct.affine)
    for other in (from_image, from_array):
        np.testing.assert_array_equal(other.array_hu, from_file.array_hu)
        np.testing.assert_array_equal(other.affine, from_file.affine)


def test_header_scaling_is_applied_once(tmp_path):
    hu = np.arange(-1024, -1024 + 4 * 5 * 6 * 2, 2, dtype=np.float64).reshape(4, 5, 6)
    img = nib.Nifti1Image(((hu + 1024) / 2).astype(np.int16), np.diag([0.7, 0.7, 2.0, 1.0]))
    img.header.set_slope_inter(2.0, -1024.0)
    path = tmp_path / "scaled.nii.gz"
    nib.save(img, path)
    np.testing.assert_array_equal(read_ct(path).array_hu, hu.astype(np.float32))


def test_singleton_fourth_axis_is_squeezed(tmp_path, ras_ct):
    data = np.asarray(ras_ct.dataobj)
    path = save_nifti(data[..., None], ras_ct.affine, tmp_path / "ct4d1.nii.gz")
    np.testing.assert_array_equal(read_ct(path).array_hu, data.astype(np.float32))


def test_array_without_affine_is_an_error():
    with pytest.raises(InputError, match="needs its affine"):
        read_ct(np.zeros((4, 4, 4), np.float32))


def test_missing_file(tmp_path):
    path = tmp_path / "nope.nii.gz"
    with pytest.raises(InputError, match=f"not found: {path}"):
        read_ct(path)


def test_wrong_extension(tmp_path):
    path = tmp_path / "scan.mha"
    path.write_bytes(b"x" * 100)
    with pytest.raises(InputError, match=r"unsupported CT file type: 'scan.mha'.*\.nii\.gz"):
        read_ct(path)


def test_single_dicom_file_points_to_the_folder(tmp_path):
    path = tmp_path / "IM0001.dcm"
    path.write_bytes(b"x" * 100)
    with pytest.raises(InputError, match="pass the folder that holds the series"):
        read_ct(path)


def test_truncated_nifti_gz(tmp_path):
    raw = data_file("abdomen_3mm.nii.gz").read_bytes()
    path = tmp_path / "truncated.nii.gz"
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(InputError, match="truncated.nii.gz.*(truncated|damaged)"):
        read_ct(path)


def test_not_a_nifti_file(tmp_path):
    path = tmp_path / "fake.nii.gz"
    path.write_bytes(gzip.compress(b"this is not an image" * 10))
    with pytest.raises(InputError, match="fake.nii.gz"):
        read_ct(path)


def test_2d_image(tmp_path):
    path = save_nifti(np.zeros((64, 64), np.int16), np.eye(4), tmp_path / "slice.nii.gz")
    with pytest.raises(InputError, match=r"slice.nii.gz is a 2D image of shape \(64, 64\)"):
        read_ct(path)


def test_single_slice_volume_is_2d(tmp_path):
    path = save_nifti(np.zeros((64, 64, 1), np.int16), np.eye(4), tmp_path / "one.nii.gz")
    with pytest.raises(InputError, match="2D image"):
        read_ct(path)


def test_4d_image(tmp_path):
    path = save_nifti(np.zeros((8, 8, 8, 3), np.int16), np.eye(4), tmp_path / "series.nii.gz")
    with pytest.raises(InputError, match=r"series.nii.gz is a 4D image of shape \(8, 8, 8, 3\)"):
        read_ct(path)


@pytest.mark.parametrize("values", [(np.nan, np.nan), (np.inf, -np.inf), (np.inf, 5.0), (-np.inf, -np.inf)])
def test_nan_voxels(tmp_path, values):
    data = np.zeros((8, 8, 8), np.float32)
    data[1, 2, 3], data[4, 4, 4] = values
    path = save_nifti(data, np.eye(4), tmp_path / "nan.nii.gz")
    count = sum(not np.isfinite(v) for v in values)
    with pytest.raises(InputError, match=rf"nan.nii.gz has {count} non-finite .* index \(1, 2, 3\)"):
        read_ct(path)
    data[1, 2, 3], data[4, 4, 4] = 3.0e38, 3.0e38  # finite, though their sum is not in float32
    assert read_ct(save_nifti(data, np.eye(4), tmp_path / "big.nii.gz")).array_hu.max() == np.float32(3.0e38)


def test_singular_affine(tmp_path):
    with pytest.raises(InputError, match="singular"):
        read_ct(np.zeros((4, 4, 4)), affine=np.diag([1.0, 0.0, 1.0, 1.0]))
