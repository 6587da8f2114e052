"""The anatomy-aware 3D image encoder: a MedicalNet-style ResNet and four levels of organ tokens.

Input volumes are ``(B, C, D, H, W)`` float32 with D the slice axis (see ``docs/ct_conventions.md``).
Level k has stride :data:`LEVEL_STRIDES` ``[k]``; a token belongs to an organ when any voxel of the
organ falls in its cell (``max_pool3d(mask, stride) > 0``). Tokens are flattened row-major over
``(d, h, w)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from visd.config import VisionConfig

__all__ = ["LEVEL_STRIDES", "TOKEN_MULTIPLE", "ResNet3d", "VisionEncoder", "organ_token_flags"]

LEVEL_STRIDES: tuple[tuple[int, int, int], ...] = ((2, 4, 4), (4, 8, 8), (8, 16, 16), (16, 32, 32))
TOKEN_MULTIPLE: tuple[int, int, int] = LEVEL_STRIDES[-1]


class _ShortcutA(nn.Module):
    """Parameter-free shortcut: strided subsampling, then zero channels appended."""

    def __init__(self, out_channels: int, stride: int) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stride
        x = x[:, :, ::s, ::s, ::s]
        pad = self.out_channels - x.shape[1]
        return F.pad(x, (0, 0, 0, 0, 0, 0, 0, pad))


class _BasicBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int, dilation: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(in_ch, out_ch, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)
        self.bn1 = nn.BatchNorm3d(out_ch)
        self.conv2 = nn.Conv3d(out_ch, out_ch, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm3d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _ShortcutA(out_ch, stride) if (stride != 1 or in_ch != out_ch) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.shortcut is None else self.shortcut(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + residual)


class ResNet3d(nn.Module):
    """3D ResNet with BasicBlocks, shortcut type A; returns the four stage outputs.

    ``grad_checkpointing`` (default False): while gradients are recorded, each of the four stages
    recomputes its activations in the backward pass instead of keeping them.
    """

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.grad_checkpointing = False
        w = config.widths
        self.conv1 = nn.Conv3d(config.in_channels, w[0], 7, stride=(1, 2, 2), padding=3, bias=False)
        self.bn1 = nn.BatchNorm3d(w[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool3d(3, stride=2, padding=1)
        in_ch = w[0]
        for i, (blocks, width, dilation) in enumerate(zip(config.layers, w, config.dilations)):
            stride = 1 if i == 0 else 2
            layer = []
            for b in range(blocks):
                layer.append(_BasicBlock(in_ch, width, stride if b == 0 else 1, dilation))
                in_ch = width
            self.add_module(f"layer{i + 1}", nn.Sequential(*layer))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.stages(self.maxpool(self.relu(self.bn1(self.conv1(x)))))

    def stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The outputs of the four residual stages for the stem's output ``x``."""
        feats = []
        for name in ("layer1", "layer2", "layer3", "layer4"):
            layer = getattr(self, name)
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
            feats.append(x)
        return feats


class VisionEncoder(nn.Module):
    """Backbone plus one 1x1x1 projection per level to ``token_dim``."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.backbone = ResNet3d(config)
        for k, width in enumerate(config.widths, start=1):
            self.add_module(f"proj{k}", nn.Conv3d(width, config.token_dim, 1))

    def projections(self) -> list[nn.Conv3d]:
        return [self.proj1, self.proj2, self.proj3, self.proj4]

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        """Tokens of the four levels, each ``(B, L_k, token_dim)``.

        Args:
            image: ``(B, C, D, H, W)`` float, with D % 16 == H % 32 == W % 32 == 0.
        """
        feats = self.backbone(image)
        return [proj(f).flatten(2).transpose(1, 2) for proj, f in zip(self.projections(), feats)]


def organ_token_flags(organ_mask: torch.Tensor, num_organs: int) -> list[torch.Tensor]:
    """Which tokens of each level belong to each organ (``max_pool3d(organ, stride) > 0``).

    Args:
        organ_mask: ``(B, 1, D, H, W)`` or ``(B, D, H, W)`` integer label map, organ ``o`` has value
            ``o + 1``; D, H, W multiples of :data:`TOKEN_MULTIPLE`.
        num_organs: number of organs O.

    Returns:
        One bool tensor ``(B, O, L_k)`` per level, tokens flattened row-major over ``(d, h, w)``.
    """
    if organ_mask.dim() == 5:
        organ_mask = organ_mask[:, 0]
    b, d, h, w = organ_mask.shape
    if any(n % m for n, m in zip((d, h, w), TOKEN_MULTIPLE)):
        raise ValueError(f"mask shape {(d, h, w)} is not a multiple of {TOKEN_MULTIPLE}")
    s0, s1, s2 = LEVEL_STRIDES[0]
    present = (torch.bincount(organ_mask.flatten(), minlength=num_organs + 1)[1 : num_organs + 1] > 0).tolist()
    grid = (b, d // s0, h // s1, w // s2)
    cells = [
        (organ_mask == o + 1).view(b, d // s0, s0, h // s1, s1, w // s2, s2).any(6).any(4).any(2)
        if present[o]
        else torch.zeros(grid, dtype=torch.bool, device=organ_mask.device)
        for o in range(num_organs)
    ]
    level = torch.stack(cells, 1)  # (B, O, d1, h1, w1)
    levels = [level]
    for _ in LEVEL_STRIDES[1:]:  # each level halves the grid of the one before
        bb, oo, dd, hh, ww = level.shape
        level = level.view(bb, oo, dd // 2, 2, hh // 2, 2, ww // 2, 2).any(7).any(5).any(3)
        levels.append(level)
    return [lv.flatten(2) for lv in levels]
