"""The official per-volume windows and the rule of which organs count in a window."""

from __future__ import annotations

import torch

from visd.inference.windows import _axis_window, organ_window
from visd.models.windows import STATUSES, Status, exclusion_reason, pad_to_token_multiple, window_status


def test_axis_window_known_answers():
    # small organ in the middle: ROI-sized window centred on (lo + hi) // 2
    assert _axis_window(40, 50, 200, 112) == (0, 112)  # c = 45, 45 - 56 < 0 -> 0
    assert _axis_window(100, 120, 300, 112) == (110 - 56, 112)
    # near the end: clamped to n - size
    assert _axis_window(280, 299, 300, 112) == (188, 112)
    # organ longer than the ROI: size = hi - lo (no +1), centred
    assert _axis_window(10, 150, 300, 112) == (80 - 70, 140)
    # axis not longer than the window: taken whole
    assert _axis_window(0, 50, 112, 112) == (0, 112)
    assert _axis_window(0, 150, 140, 112) == (0, 140)


def test_organ_window_keeps_only_the_organ_with_its_label():
    image = torch.rand(20, 40, 40)
    mask = torch.zeros(20, 40, 40, dtype=torch.int64)
    mask[5:8, 10:20, 10:20] = 2
    mask[12:15, 25:30, 25:30] = 3
    w = organ_window(image, mask, organ_index=1, roi=(16, 32, 32))
    assert w.start == (0, 0, 0) and w.size == (16, 32, 32)
    assert set(w.mask.unique().tolist()) == {0, 2}
    assert int((w.mask == 2).sum()) == int((mask == 2).sum())
    torch.testing.assert_close(w.image[0, 0], image[:16, :32, :32])
    assert organ_window(image, mask, organ_index=0, roi=(16, 32, 32)) is None


def test_organ_window_is_centred_on_the_organs_extent_along_every_axis():
    """Known answer of the official rule (inclusive bounds lo..hi, size max(roi, hi - lo), centre
    (lo + hi) // 2, clamped to the volume) on an organ away from every border."""
    mask = torch.zeros(40, 80, 90, dtype=torch.uint8)
    mask[20:31, 50:71, 60:86] = 3  # inclusive bounds d 20..30, h 50..70, w 60..85
    mask[0, 0, 0] = 1  # another organ elsewhere changes nothing
    w = organ_window(torch.rand(40, 80, 90), mask, organ_index=2, roi=(16, 32, 32))
    # d: c 25, start 25 - 8; h: c 60, start 60 - 16; w: c 72, start min(72 - 16, 90 - 32)
    assert w.start == (17, 44, 56) and w.size == (16, 32, 32)
    assert int((w.mask == 3).sum()) == 11 * 21 * 26 and set(w.mask.unique().tolist()) == {0, 3}


def test_pad_to_token_multiple_pads_at_the_end_with_zeros():
    x = torch.ones(1, 1, 17, 33, 64)
    y = pad_to_token_multiple(x)
    assert tuple(y.shape) == (1, 1, 32, 64, 64)
    assert float(y.sum()) == 17 * 33 * 64
    assert float(y[..., 17:, :, :].abs().sum()) == 0.0


def test_exclusion_rules():
    organ = torch.zeros(16, 32, 32, dtype=torch.bool)
    assert exclusion_reason(organ, None, 0.9) == Status.ABSENT
    organ[5:8, 5:8, 5:8] = True  # 27 voxels, inside
    assert exclusion_reason(organ, None, 0.9) is None
    assert exclusion_reason(organ, 30, 0.9) is None  # 0.9 exactly is kept
    assert exclusion_reason(organ, 31, 0.9) == Status.INCOMPLETE
    for edge in (0, 1, 30, 31):
        touching = organ.clone()
        touching[6, 6, edge] = True
        assert exclusion_reason(touching, None, 0.9) == Status.BORDER
    inner = organ.clone()
    inner[6, 6, 2] = True
    assert exclusion_reason(inner, None, 0.9) is None


def _reference_status(mask, o, target, whole, min_fraction):
    """The rule written out for one organ of one window, voxel by voxel."""
    organ = mask == o + 1
    if not bool(organ.any()):
        return Status.ABSENT
    if o == target:
        return Status.SCORED
    idx = torch.nonzero(organ)
    for axis, n in enumerate(mask.shape):
        if bool(((idx[:, axis] <= 1) | (idx[:, axis] >= n - 2)).any()):
            return Status.BORDER
    if whole is not None and int(organ.sum()) / whole < min_fraction:
        return Status.INCOMPLETE
    return Status.SCORED


def test_window_status_of_a_batch_equals_the_rule_organ_by_organ(generator):
    masks = torch.zeros(3, 16, 32, 32, dtype=torch.uint8)
    masks[0, 4:8, 4:8, 4:8] = 1  # inside
    masks[0, 1, 10, 10] = 2  # plane 1 is border
    masks[0, 5:7, 29, 5:7] = 3  # plane n-3: inside
    masks[1, 4:6, 4:6, 30] = 1  # plane n-2: border, but the window's target
    masks[1, 6:9, 6:9, 6:9] = 2  # 27 voxels: incomplete against 100
    masks[2] = torch.randint(0, 5, (16, 32, 32), generator=generator, dtype=torch.uint8)
    targets, whole, fraction = [None, 0, 3], [None, 100, 4, None], 0.5
    codes = window_status(masks, 4, targets=targets, whole_sizes=whole, min_fraction=fraction)
    got = [[STATUSES[int(c)] for c in row] for row in codes]
    expected = [[_reference_status(masks[b], o, targets[b], whole[o], fraction) for o in range(4)] for b in range(3)]
    assert got == expected
    assert got[0] == [Status.SCORED, Status.BORDER, Status.SCORED, Status.ABSENT]
    assert got[1] == [Status.SCORED, Status.INCOMPLETE, Status.ABSENT, Status.ABSENT]
