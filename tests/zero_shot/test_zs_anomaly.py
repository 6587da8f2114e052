"""Anomaly maps: token deviations placed on the preprocessed grid, known answers and invariants."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from visd.models.outputs import OrganDetail, OrganEmbeddings
from visd.zero_shot import anomaly_map, pick_slices, render_overlay

ORGANS = ("lung", "heart", "esophagus", "aorta")


def _detail(index, deviation, grid, start) -> OrganDetail:
    n = len(index)
    return OrganDetail(
        level4_index=torch.tensor(index, dtype=torch.int64),
        level4_grid=grid,
        codes=torch.zeros(n, dtype=torch.int64),
        deviation=torch.tensor(deviation, dtype=torch.float32),
        decoded=torch.zeros(n, 4),
        attention_output=torch.zeros(4),
        projection=torch.zeros(4),
        window_start=start,
    )


def _embeddings(details: dict[str, OrganDetail]) -> OrganEmbeddings:
    names = tuple(details)
    return OrganEmbeddings(names, torch.zeros(len(names), 4), {n: "scored" for n in names}, details)


def _reference(shape, mask, label, index, deviation, grid, start):
    """Voxel by voxel: the token covering a voxel of the organ, by integer division."""
    out = np.zeros(shape, dtype=np.float32)
    value = dict(zip(index, deviation))
    for z, y, x in np.argwhere(mask == label):
        rel = (z - start[0], y - start[1], x - start[2])
        t = (rel[0] // 16, rel[1] // 32, rel[2] // 32)
        if min(rel) < 0 or any(a >= g for a, g in zip(t, grid)):
            continue
        out[z, y, x] = value.get(int(np.ravel_multi_index(t, grid)), 0.0)
    return out


def test_known_answer_blocks_organ_voxels_only():
    shape = (40, 70, 80)
    mask = np.zeros(shape, dtype=np.uint8)
    mask[3:30, 10:60, 8:70] = 1  # lung, spans several token blocks
    grid, start = (2, 2, 2), (1, 3, 5)
    index, deviation = [0, 3, 7], [1.0, 2.0, 3.0]
    amap = anomaly_map(_embeddings({"lung": _detail(index, deviation, grid, start)}), mask, ORGANS)
    assert amap.dtype == np.float32 and amap.shape == shape
    # token 0 = block [1:17, 3:35, 5:37]; token 3 = (0, 1, 1) = [1:17, 35:67, 37:69]; token 7 = (1, 1, 1).
    assert amap[5, 20, 20] == 1.0 and amap[5, 40, 40] == 2.0 and amap[20, 40, 40] == 3.0
    assert amap[20, 20, 20] == 0.0  # token 4 is not an organ token
    assert amap[2, 5, 5] == 0.0  # outside the organ
    np.testing.assert_array_equal(amap, _reference(shape, mask, 1, index, deviation, grid, start))


def test_blocks_are_clipped_at_the_volume_end():
    shape = (20, 40, 40)  # the padded window (32, 64, 64) at (2, 4, 4) runs past every axis
    mask = np.zeros(shape, dtype=np.uint8)
    mask[1:20, 2:40, 2:40] = 4  # aorta up to the last voxel, and before the window start
    grid, start = (2, 2, 2), (2, 4, 4)
    index, deviation = list(range(8)), [float(i + 1) for i in range(8)]
    amap = anomaly_map(_embeddings({"aorta": _detail(index, deviation, grid, start)}), mask, ORGANS)
    np.testing.assert_array_equal(amap, _reference(shape, mask, 4, index, deviation, grid, start))
    assert amap[19, 39, 39] == 8.0 and amap[10, 10, 10] == 1.0 and amap[19, 10, 39] == 6.0
    assert amap[1, 2, 2] == 0.0  # an organ voxel outside the window has no token


def test_overlapping_windows_take_each_organs_own_value():
    shape = (32, 64, 64)
    mask = np.zeros(shape, dtype=np.uint8)
    mask[2:14, 2:30, 2:30] = 1
    mask[2:14, 34:60, 34:60] = 4
    whole = (2, 2, 2)  # both windows cover the whole volume and overlap entirely
    lung = _detail(list(range(8)), [1.0] * 8, whole, (0, 0, 0))
    aorta = _detail(list(range(8)), [5.0] * 8, whole, (0, 0, 0))
    amap = anomaly_map(_embeddings({"lung": lung, "aorta": aorta}), mask, ORGANS)
    assert np.all(amap[mask == 1] == 1.0) and np.all(amap[mask == 4] == 5.0) and np.all(amap[mask == 0] == 0.0)
    reverse = anomaly_map(_embeddings({"aorta": aorta, "lung": lung}), mask, ORGANS)
    np.testing.assert_array_equal(amap, reverse)


def test_unknown_organ_is_an_error():
    bad = _embeddings({"liver": _detail([0], [1.0], (1, 1, 1), (0, 0, 0))})
    with pytest.raises(ValueError, match="liver"):
        anomaly_map(bad, np.zeros((16, 32, 32), np.uint8), ORGANS)


def test_pick_slices_known_answers():
    vol = np.zeros((30, 4, 4), dtype=np.float32)
    vol[10, 0, 0], vol[11, 0, 0], vol[25, 1, 1], vol[3, 2, 2] = 5.0, 4.0, 3.0, 1.0
    assert pick_slices(vol, 3) == [3, 10, 25]  # 11 is too close to 10 (gap 30 // 6 = 5)
    assert pick_slices(vol, 4) == [3, 10, 11, 25]  # filled with the next best
    assert pick_slices(np.zeros((2, 3, 3)), 3) == [0, 1]
    mask = np.zeros(vol.shape, dtype=np.uint8)
    mask[3] = 2
    mask[10:12] = 1  # the organ with the peak at 3 is shown although its value is lowest
    assert pick_slices(vol, 2, mask) == [3, 10]


def test_overlay_figure_has_the_slices_and_a_colorbar():
    image = np.random.default_rng(0).random((20, 30, 40)).astype(np.float32)
    amap = np.zeros_like(image)
    amap[5, 10:20, 10:20] = 2.0
    mask = (amap > 0).astype(np.uint8)
    fig = render_overlay(image, amap, mask, organs=ORGANS, title="case", hu_window=(-1150, 350))
    titles = [ax.get_title() for ax in fig.axes]
    assert len(fig.axes) == 4  # three slices + the colorbar
    assert sum("axial slice 5 of 20 (max 2)" in t for t in titles) == 1
    assert "deviation" in fig.axes[-1].get_ylabel()


def test_pick_slices_with_organs_equals_the_whole_volume_argmax():
    """With three organs, the three slices are each organ's peak slice: the slice of the first maximum of
    the map restricted to the organ (np.where over the whole volume), on maps with ties and negative values."""
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(200):
        vol = rng.integers(-2, 4, (12, 5, 6)).astype(np.float32)
        mask = rng.integers(0, 4, vol.shape).astype(np.uint8)
        peaks = []
        for label in (1, 2, 3):
            values = np.where(mask == label, vol, 0.0)
            if values.max() > 0:
                peaks.append(int(np.unravel_index(np.argmax(values), values.shape)[0]))
        if len(set(peaks)) == 3:
            assert pick_slices(vol, 3, mask) == sorted(peaks)
            checked += 1
    assert checked >= 10


def _half_slices_flipped(tmp_path):
    """The abdomen CT and labels at 1.5 mm slices (each slice twice) stored inferior-up: same anatomy."""
    import nibabel as nib

    from .conftest import CT, SEG

    out = []
    for src, name in ((CT, "ct.nii.gz"), (SEG, "seg.nii.gz")):
        img = nib.load(src)
        data = np.repeat(np.asarray(img.dataobj), 2, axis=2)[:, :, ::-1]
        affine = img.affine.copy()
        affine[:3, 2] *= -0.5  # half the slice distance, reversed
        affine[:3, 3] = img.affine[:3, 3] + img.affine[:3, 2] * (img.shape[2] - 0.75)  # the last half slice first
        new = nib.Nifti1Image(np.ascontiguousarray(data), affine, img.header)
        if name == "seg.nii.gz":
            new.header.extensions.extend(img.header.extensions)
        nib.save(new, tmp_path / name)
        out.append(tmp_path / name)
    return out


@pytest.mark.parametrize("variant", ["as_stored", "half_slices_flipped"])
def test_png_names_the_input_slice_of_the_organ(tmp_path, variant):
    """Known answer: the slice a panel names holds the shown organ in the input label map, and the map
    put back on the input grid (to_input_grid) lands on that slice; the padding is not drawn."""
    import nibabel as nib

    from visd.config import ViSDConfig
    from visd.data import load_case, read_ct, read_organ_mask, to_input_grid
    from visd.zero_shot import input_slice

    from .conftest import CT, SEG

    config = ViSDConfig()  # the official ROI: this scan is padded on every axis
    ct, seg = (CT, SEG) if variant == "as_stored" else _half_slices_flipped(tmp_path)
    case = load_case(ct, seg, config)
    labels = read_organ_mask(seg, read_ct(ct), config)  # organ ids on the input grid
    aorta = config.organs.index("aorta") + 1
    depths = np.flatnonzero((case.mask == aorta).any(axis=(1, 2)))
    d0 = int(depths[len(depths) // 3])
    amap = np.zeros(case.image.shape, np.float32)
    amap[d0][case.mask[d0] == aorta] = 1.0
    fig = render_overlay(case.image, amap, case.mask, organs=config.organs, geometry=case.geometry,
                         scores={"aorta": ("Arterial wall calcification", 0.25)}, n_slices=1)
    axis, k = input_slice(case.geometry, d0)
    n = nib.load(ct).shape[2]
    assert axis == 2 and fig.axes[0].get_title() == (
        f"aorta: input slice {k} of {n}\ndeviation max 1; Arterial wall calcification 0.25")
    assert (labels[:, :, k] == aorta).any()
    back = to_input_grid(amap, case.geometry, mode="nearest")
    assert back[:, :, k].any()
    if variant == "as_stored":  # 3 mm slices, stored inferior to superior: the crop offset only
        assert k == d0 - case.geometry.pad[0][0] + case.geometry.crop_start[0]
        assert np.flatnonzero(back.any(axis=(0, 1))).tolist() == [k]
    else:
        k0 = input_slice(load_case(CT, SEG, config).geometry, d0)[1]
        assert k in (n - 1 - 2 * k0, n - 2 - 2 * k0)
    assert all(sum(p) > 0 for p in case.geometry.pad)
    shown = fig.axes[0].images[0].get_array().shape
    assert shown == (case.image.shape[1] - sum(case.geometry.pad[1]), case.image.shape[2] - sum(case.geometry.pad[2]))
