"""The official per-volume window rules."""

from __future__ import annotations

import torch

from visd.models.windows import Status, _axis_window, exclusion_reason, organ_window, pad_to_token_multiple


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
