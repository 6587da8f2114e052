"""The 3D ResNet backbone and organ token flags."""

from __future__ import annotations

import torch

from visd.config import VisionConfig
from visd.models.vision import LEVEL_STRIDES, ResNet3d, _ShortcutA, organ_token_flags


def test_shortcut_a_subsamples_and_appends_zero_channels():
    x = torch.arange(2 * 3 * 5 * 4 * 4, dtype=torch.float32).reshape(2, 3, 5, 4, 4)
    y = _ShortcutA(out_channels=5, stride=2)(x)
    assert torch.equal(y[:, :3], x[:, :, ::2, ::2, ::2])
    assert float(y[:, 3:].abs().sum()) == 0.0 and y.shape[1] == 5


def test_level_grids_follow_the_strides():
    net = ResNet3d(VisionConfig(layers=(1, 1, 1, 1), widths=(4, 8, 8, 8), token_dim=8)).eval()
    x = torch.randn(1, 1, 32, 64, 96)
    feats = net(x)
    for f, s, c in zip(feats, LEVEL_STRIDES, (4, 8, 8, 8)):
        assert tuple(f.shape) == (1, c, 32 // s[0], 64 // s[1], 96 // s[2])


def test_organ_token_flags_known_answer():
    mask = torch.zeros(1, 16, 32, 32, dtype=torch.int64)
    mask[0, 0, 0, 0] = 1  # first cell of every level
    mask[0, 15, 31, 31] = 2  # last cell of every level
    mask[0, 3, 5, 9] = 2  # level-1 cell (1, 1, 2) of grid (8, 8, 8)
    flags = organ_token_flags(mask, num_organs=3)
    lv1 = flags[0][0]
    assert lv1.shape == (3, 8 * 8 * 8)
    assert torch.nonzero(lv1[0]).flatten().tolist() == [0]
    assert torch.nonzero(lv1[1]).flatten().tolist() == [1 * 64 + 1 * 8 + 2, 511]
    assert not lv1[2].any()
    assert torch.nonzero(flags[3][0][1]).flatten().tolist() == [0]  # one level-4 cell holds everything
    assert torch.nonzero(flags[3][0][0]).flatten().tolist() == [0]
