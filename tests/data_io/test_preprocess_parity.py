"""The official preprocessing: parity with the reference output, invariants and known answers."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from visd.config import PreprocessConfig
from visd.data import CTVolume, load_case, preprocess, read_ct, read_organ_mask
from visd.data.preprocess import _resize_dhw, source_spacing, target_size
from visd.errors import InputError

from ._helpers import data_file


@pytest.fixture(scope="module")
def reference_case(config):
    return load_case(data_file("ct_lps.nii.gz"), data_file("totalseg_lps.nii.gz"), config)


@pytest.fixture(scope="module")
def reference_arrays():
    with np.load(data_file("expected.npz")) as z:
        return {k: z[k] for k in z.files}


def test_parity_geometry(reference_case, expected):
    pre = expected["case"]["preprocess"]
    g = reference_case.geometry
    assert g.reorientation.is_identity  # the reference input is already LPS
    assert list(g.spacing) == expected["case"]["resize"]["spacing_read"]
    assert list(g.resized_shape) == expected["case"]["resize"]["target_size"]
    assert list(g.crop_start) == pre["crop_lo_zyx"]
    assert list(g.crop_stop) == pre["crop_hi_zyx_exclusive"]
    assert [list(p) for p in g.pad] == pre["pad_before_after_zyx"]
    assert list(g.final_shape) == pre["final_shape"]


def test_parity_arrays(reference_case, reference_arrays):
    image = np.pad(reference_arrays["image_inner"], reference_arrays["pad"])
    assert reference_case.image.shape == image.shape
    assert reference_case.image.dtype == np.float32
    assert np.abs(reference_case.image - image).max() <= 1e-4
    np.testing.assert_array_equal(reference_case.mask, reference_arrays["mask"])
    assert reference_case.mask.dtype == np.uint8


def test_parity_bit_exact(reference_case, expected):
    pre = expected["case"]["preprocess"]
    assert hashlib.sha256(reference_case.image.tobytes()).hexdigest() == pre["final_image_sha256_float32"]
    mask32 = reference_case.mask.astype(np.float32)
    assert hashlib.sha256(mask32.tobytes()).hexdigest() == pre["final_mask_sha256_float32"]


def test_merged_mask_counts_match_reference(config, expected):
    ct = read_ct(data_file("ct_lps.nii.gz"))
    merged = read_organ_mask(data_file("totalseg_lps.nii.gz"), ct, config)
    values, counts = np.unique(merged, return_counts=True)
    assert {str(v): int(c) for v, c in zip(values, counts)} == expected["case"]["merged_mask"]["voxels_per_label"]


def test_orientation_invariance_ras_vs_lps(reference_case, config):
    ras = load_case(data_file("abdomen_3mm.nii.gz"), data_file("abdomen_3mm_totalseg.nii.gz"), config)
    assert not ras.geometry.reorientation.is_identity
    np.testing.assert_array_equal(ras.image, reference_case.image)
    np.testing.assert_array_equal(ras.mask, reference_case.mask)


def test_orientation_invariance_permuted_axes(reference_case, config, ras_ct, ras_organs):
    # Store the RAS scan with axes permuted to (Z, X, Y) and flipped in X: a "SLA"-like file.
    data = np.asarray(ras_ct.dataobj)
    perm = np.transpose(data, (2, 0, 1))[:, ::-1, :]
    organs = np.transpose(ras_organs, (2, 0, 1))[:, ::-1, :]
    old = ras_ct.affine
    n_x = data.shape[0]
    new = np.zeros((4, 4))
    new[:, 0] = old[:, 2]  # new axis 0 = old z
    new[:, 1] = -old[:, 0]  # new axis 1 = old x reversed
    new[:, 2] = old[:, 1]  # new axis 2 = old y
    new[:, 3] = old[:, 3] + old[:, 0] * (n_x - 1)
    new[3, 3] = 1.0
    ct = read_ct(np.ascontiguousarray(perm), affine=new)
    case = preprocess(ct, np.ascontiguousarray(organs), config.preprocess)
    np.testing.assert_array_equal(case.image, reference_case.image)
    np.testing.assert_array_equal(case.mask, reference_case.mask)


def test_target_size_swaps_x_and_y_spacing():
    cfg = PreprocessConfig()
    # X * sy, Y * sx, Z * (sz / 3) with int() truncation
    assert target_size((100, 200, 50), (0.5, 0.8, 2.5), cfg) == (80, 100, 41)
    assert target_size((100, 200, 50), (0.5, 0.8, 2.5), cfg.replace(swap_xy_spacing=False)) == (50, 160, 41)
    # float64 and int() truncation in the official order: 90 * 0.7 = 62.99999999999999 -> 62, and
    # 5 * (0.6 / 3.0) = 0.9999999999999999 -> 0 (5 * 0.6 / 3.0 would give 1)
    assert target_size((90, 90, 10), (0.7, 0.7, 3.0), cfg) == (62, 62, 10)
    with pytest.raises(InputError, match="at least one voxel"):
        target_size((10, 10, 5), (1.0, 1.0, 0.6), cfg)
    with pytest.raises(InputError, match="at least one voxel"):
        target_size((10, 10, 1), (1.0, 1.0, 1.0), cfg)


def test_spacing_from_diagonal_or_column_norms():
    assert source_spacing(np.diag([-0.7, -0.7, 2.5, 1.0])) == (0.7, 0.7, 2.5)
    c, s = np.cos(0.3), np.sin(0.3)
    oblique = np.eye(4)
    oblique[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.diag([0.8, 0.8, 3.0])
    assert np.allclose(source_spacing(oblique), (0.8, 0.8, 3.0))


@pytest.mark.parametrize("dtype", [np.float32, np.uint8])
def test_label_resize_is_legacy_nearest(dtype):
    labels = np.array([1, 2, 3], dtype=dtype).reshape(3, 1, 1)
    out = _resize_dhw(labels, (5, 1, 1), "nearest")  # (X, Y, Z) in, (Z, Y, X) out
    assert out.shape == (1, 1, 5) and out.dtype == dtype
    np.testing.assert_array_equal(out[0, 0], [1, 1, 2, 2, 3])  # src = floor(dst * 3 / 5); nearest-exact gives 1 1 2 3 3


def _official_steps(hu_xyz, labels_xyz, size, cfg):
    """The official order, spelled out: resize C-ordered (X, Y, Z) float32 tensors, transpose, window,
    crop to the organ box (argwhere), pad."""
    import torch
    import torch.nn.functional as F

    def resize(a, mode):
        t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[None, None]
        kwargs = {"align_corners": False} if mode == "trilinear" else {}
        return F.interpolate(t, size=size, mode=mode, **kwargs)[0, 0].numpy()

    image = np.transpose(resize(hu_xyz, "trilinear"), (2, 1, 0))
    labels = np.transpose(resize(labels_xyz, "nearest"), (2, 1, 0))
    lo, hi = cfg.hu_window
    image = np.clip((image - np.float32(lo)) / np.float32(hi - lo), 0.0, 1.0)
    nz = np.argwhere(labels > 0)
    start = np.maximum(nz.min(0) - np.asarray(cfg.crop_margin), 0)
    stop = np.minimum(nz.max(0) + np.asarray(cfg.crop_margin), labels.shape)
    box = tuple(slice(a, b) for a, b in zip(start, stop))
    pad = [(max(r - n, 0) // 2, max(r - n, 0) - max(r - n, 0) // 2) for n, r in zip(image[box].shape, cfg.roi)]
    return np.pad(image[box], pad).astype(np.float32), np.pad(labels[box], pad).astype(np.uint8)


@pytest.mark.parametrize("layout", ["fortran", "c"])
def test_resizing_in_any_memory_layout_is_bit_exact(ras_ct, ras_organs, config, layout):
    """Every axis resized with non-trivial weights (spacing 0.7 x 0.8 x 1.25 mm), an LPS file stored
    in NIfTI's Fortran order or in C order (as DICOM): equal to the official steps to the bit."""
    hu = np.asarray(ras_ct.dataobj).astype(np.float32)[::-1, ::-1]  # RAS -> LPS by flips
    organs = np.asarray(ras_organs)[::-1, ::-1]
    order = "F" if layout == "fortran" else "C"
    hu, organs = np.array(hu, order=order), np.array(organs, dtype=np.uint8, order=order)
    affine = np.diag([-0.7, -0.8, 1.25, 1.0])
    before = hu.copy()
    case = preprocess(CTVolume(hu, affine, "lps"), organs, config.preprocess)
    size = target_size(hu.shape, (0.7, 0.8, 1.25), config.preprocess)
    assert size == (97, 70, 12)  # every axis resized
    image, mask = _official_steps(hu, organs, size, config.preprocess)
    assert case.image.flags.c_contiguous and case.mask.flags.c_contiguous
    np.testing.assert_array_equal(case.image, image)
    np.testing.assert_array_equal(case.mask, mask)
    np.testing.assert_array_equal(hu, before)  # the input is never written


def _synthetic_ct(hu: float = -400.0) -> tuple[CTVolume, np.ndarray]:
    """A 60 x 60 x 20 LPS scan at 1 x 1 x 3 mm (nothing is resized) with one organ voxel."""
    array = np.full((60, 60, 20), -1000.0, dtype=np.float32)
    array[30, 25, 10] = hu
    mask = np.zeros(array.shape, dtype=np.uint8)
    mask[30, 25, 10] = 2
    return CTVolume(array, np.diag([-1.0, -1.0, 3.0, 1.0]), "synthetic"), mask


def test_crop_pad_window_known_answer():
    ct, mask = _synthetic_ct()
    cfg = PreprocessConfig().replace(roi=(16, 32, 32))
    case = preprocess(ct, mask, cfg)
    g = case.geometry
    assert g.resized_shape == (60, 60, 20)
    assert g.crop_start == (5, 5, 10)  # voxel (z, y, x) = (10, 25, 30) minus margins (5, 20, 20)
    assert g.crop_stop == (15, 45, 50)  # plus margins, exclusive: 5 before / 4 after in D
    assert g.pad == ((3, 3), (0, 0), (0, 0))
    assert case.image.shape == case.mask.shape == (16, 40, 40)
    assert case.mask[8, 20, 20] == 2 and case.mask.sum() == 2
    assert case.image[8, 20, 20] == np.float32((-400.0 + 1150.0) / 1500.0)
    assert case.image[8, 20, 21] == np.float32(150.0 / 1500.0)  # -1000 HU
    assert case.image[0, 0, 0] == 0.0  # padding


def test_window_values_in_unit_range():
    ct, mask = _synthetic_ct(hu=2000.0)
    case = preprocess(ct, mask, PreprocessConfig().replace(roi=(16, 32, 32)))
    assert case.image[8, 20, 20] == 1.0  # 2000 HU clipped at the top of the window
    ct.array_hu[0, 0, 0] = -2000.0
    case = preprocess(ct, mask, PreprocessConfig().replace(roi=(16, 32, 32), crop_margin=(30, 60, 60)))
    assert case.image[0, 0, 0] == 0.0  # -2000 HU clipped at the bottom
    assert case.image.max() == 1.0 and case.image.min() == 0.0


def test_mask_without_organs_is_an_error():
    ct, mask = _synthetic_ct()
    with pytest.raises(InputError, match="no organ voxels.*skip"):
        preprocess(ct, np.zeros_like(mask), PreprocessConfig())


def test_preprocess_rejects_mask_of_other_shape():
    ct, mask = _synthetic_ct()
    with pytest.raises(InputError, match=r"differ in shape: mask \(60, 60, 19\), CT \(60, 60, 20\)"):
        preprocess(ct, mask[:, :, :19], PreprocessConfig())
