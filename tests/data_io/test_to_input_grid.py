"""Mapping arrays on the final grid back to the input scan's grid."""

from __future__ import annotations

import numpy as np
import pytest

from visd.data import load_case, read_ct, to_input_grid
from visd.errors import InputError

from ._helpers import data_file


@pytest.fixture(scope="module")
def ras_case(config):
    return load_case(data_file("abdomen_3mm.nii.gz"), data_file("abdomen_3mm_totalseg.nii.gz"), config)


def test_mask_maps_back_exactly(ras_case, ras_organs):
    # x and y were upsampled by exactly 3 with legacy nearest (src = dst // 3); nearest-exact back
    # (src = 3 * dst + 1) lands on a copy of the original voxel, so the organ map comes back exactly.
    back = to_input_grid(ras_case.mask, ras_case.geometry, mode="nearest")
    assert back.shape == ras_organs.shape and back.dtype == np.uint8
    np.testing.assert_array_equal(back, ras_organs)


def test_image_maps_back_to_windowed_hu(ras_case, ras_ct):
    back = to_input_grid(ras_case.image, ras_case.geometry)
    hu = np.asarray(ras_ct.dataobj).astype(np.float32)
    windowed = np.clip((hu + 1150.0) / 1500.0, 0.0, 1.0)
    # The crop in the LPS grid is x (W) 28:355 and y (H) 46:271 at 1 mm, i.e. original voxels
    # 10..117 and 16..89 are well inside it; in the RAS input order LPS index i is n - 1 - i.
    inside = (slice(122 - 1 - 117, 122 - 1 - 10 + 1), slice(101 - 1 - 89, 101 - 1 - 16 + 1), slice(None))
    assert np.abs(back[inside] - windowed[inside]).max() < 1e-5


def test_outside_the_crop_is_zero(ras_case):
    back = to_input_grid(np.ones(ras_case.geometry.final_shape, np.float32), ras_case.geometry)
    # LPS voxel (x, y) = (0, 0) is outside the crop (W starts at 28 mm, H at 46 mm); RAS index (121, 100).
    assert np.all(back[121, 100, :] == 0.0)
    assert np.all(back[60, 50, :] == 1.0)


def test_reference_lps_case_round_trip(config):
    case = load_case(data_file("ct_lps.nii.gz"), data_file("totalseg_lps.nii.gz"), config)
    ct = read_ct(data_file("ct_lps.nii.gz"))
    back = to_input_grid(case.mask, case.geometry, mode="nearest")
    assert back.shape == ct.shape
    assert np.array_equal(back > 0, to_input_grid(case.mask > 0, case.geometry, mode="nearest"))
    assert int((back == 1).sum()) == 4307 and int((back == 4).sum()) == 997  # expected.json merged counts


def test_wrong_shape_is_an_error(ras_case):
    with pytest.raises(InputError, match=r"shape \(1, 2, 3\).*\(112, 256, 352\)"):
        to_input_grid(np.zeros((1, 2, 3)), ras_case.geometry)


@pytest.mark.parametrize("mode", ["linear", "nearest"])
def test_equals_the_steps_spelled_out(config, ras_ct, ras_organs, mode):
    """Every axis resized back (spacing 0.7 x 0.8 x 1.25 mm, stored RAS): the same values as undoing the
    pad and crop, transposing, resizing a C-ordered tensor with F.interpolate and undoing the flips."""
    import torch
    import torch.nn.functional as F

    from visd.data import CTVolume, preprocess

    hu = np.asarray(ras_ct.dataobj).astype(np.float32)
    case = preprocess(CTVolume(hu, np.diag([0.7, 0.8, 1.25, 1.0]), "ras"), ras_organs, config.preprocess)
    g = case.geometry
    volume = np.random.default_rng(0).random(g.final_shape).astype(np.float32) if mode == "linear" else case.mask
    work = np.float32 if mode == "linear" else np.float64
    full = np.zeros(g.resized_shape[::-1], dtype=work)
    inner = tuple(slice(b, b + (e - s)) for (b, _), s, e in zip(g.pad, g.crop_start, g.crop_stop))
    full[tuple(slice(s, e) for s, e in zip(g.crop_start, g.crop_stop))] = volume[inner]
    t = torch.from_numpy(np.ascontiguousarray(np.transpose(full, (2, 1, 0))))[None, None]
    kwargs = {"mode": "trilinear", "align_corners": False} if mode == "linear" else {"mode": "nearest-exact"}
    resized = F.interpolate(t, size=g.reorientation.target_shape, **kwargs)[0, 0].numpy()
    expected = resized[::-1, ::-1].astype(volume.dtype)  # LPS -> RAS
    back = to_input_grid(volume, g, mode=mode)
    assert back.shape == hu.shape and back.dtype == volume.dtype and back.flags.f_contiguous
    np.testing.assert_array_equal(back, expected)
