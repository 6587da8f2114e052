"""Validation of the model's array inputs at the public boundary (see ``docs/ct_conventions.md``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from visd.errors import InputError
from visd.models.vision import TOKEN_MULTIPLE

__all__ = ["as_image_and_mask", "as_volume", "check_window_shape"]


def as_volume(x: Any, name: str, *, num_organs: int | None, device: torch.device) -> torch.Tensor:
    """One preprocessed volume as a ``(D, H, W)`` tensor on ``device``.

    Args:
        x: array or tensor of shape ``(D, H, W)`` or ``(1, D, H, W)``.
        name: how to call it in error messages.
        num_organs: None for an image (float32, finite values); for an organ label map, the number
            of organs O (integer labels 0..O, returned as uint8).
    """
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    if t.dim() == 4 and t.shape[0] == 1:
        t = t[0]
    if t.dim() != 3:
        raise InputError(
            f"{name} must have shape (D, H, W) or (1, D, H, W), got {tuple(t.shape)}. "
            "Pass one preprocessed volume (visd.data.load_case does the preprocessing)."
        )
    if num_organs is None:
        t = t.to(torch.float32)
        # one reduction instead of a full isfinite pass: a NaN or infinity makes the sum non-finite;
        # only a non-finite sum (possibly an overflow of finite values) needs the element-wise check
        if not bool(torch.isfinite(t.sum())) and not bool(torch.isfinite(t).all()):
            raise InputError(f"{name} has NaN or infinite values; preprocessed images hold values in [0, 1]")
        return t.to(device)
    if t.is_floating_point() and not bool(torch.equal(t, t.round())):
        raise InputError(f"{name} must hold integer organ labels, found non-integer values")
    lo, hi = torch.aminmax(t) if t.numel() else (0, 0)
    if lo < 0 or hi > num_organs:
        bad = t[(t < 0) | (t > num_organs)].unique()
        raise InputError(
            f"{name} has labels {bad.tolist()[:10]} outside 0..{num_organs}; organ labels are 1..{num_organs}, "
            "one per organ of the model. Map the label map with visd.data first."
        )
    return t.to(device=device, dtype=torch.uint8)  # labels are small: keep large masks light


def as_image_and_mask(
    image: Any, organ_mask: Any, *, num_organs: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """A preprocessed image and its organ label map, each checked by :func:`as_volume`, of one shape."""
    img = as_volume(image, "image", num_organs=None, device=device)
    mask = as_volume(organ_mask, "organ_mask", num_organs=num_organs, device=device)
    if img.shape != mask.shape:
        raise InputError(
            f"organ mask and image differ in shape: mask {tuple(mask.shape)}, image {tuple(img.shape)}. "
            "Pass the label map that was computed on this CT."
        )
    return img, mask


def check_window_shape(shape: Sequence[int]) -> None:
    """A window's (D, H, W) must be multiples of the level-4 token stride."""
    if any(n % m for n, m in zip(shape, TOKEN_MULTIPLE)):
        raise InputError(
            f"window shape {tuple(shape)} is not a multiple of {TOKEN_MULTIPLE} (D, H, W); pad it with "
            "visd.models.windows.pad_to_token_multiple"
        )
