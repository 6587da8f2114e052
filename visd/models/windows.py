"""The official per-volume procedure: one organ-centred window per organ, and the exclusion rules.

All arrays here are preprocessed ``(D, H, W)`` volumes (see ``docs/ct_conventions.md``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from visd.models.vision import TOKEN_MULTIPLE

__all__ = ["OrganWindow", "organ_window", "pad_to_token_multiple", "exclusion_reason", "Status"]


class Status:
    """Why an organ was or was not scored (the strings that appear in result tables)."""

    SCORED = "scored"
    ABSENT = "organ_absent"
    BORDER = "touches_window_border"
    INCOMPLETE = "incomplete_in_window"
    NOT_REQUESTED = "not_requested"


@dataclass(frozen=True)
class OrganWindow:
    """A window of the volume centred on one organ.

    Attributes:
        start: ``(d, h, w)`` first voxel of the window in the volume.
        size: ``(d, h, w)`` extent taken from the volume (before padding).
        image: ``(1, 1, D', H', W')`` the window, zero-padded at the end to the token multiple.
        mask: same shape, only the organ's voxels kept, with their own label value.
    """

    organ_index: int
    start: tuple[int, int, int]
    size: tuple[int, int, int]
    image: torch.Tensor
    mask: torch.Tensor


def _axis_window(lo: int, hi: int, n: int, roi: int) -> tuple[int, int]:
    """Start and size of the window on one axis; ``lo``/``hi`` are the organ's inclusive bounds."""
    size = max(roi, hi - lo)  # official: no +1, an organ longer than the ROI loses its last plane
    if n <= size:
        return 0, n
    c = (lo + hi) // 2
    return min(max(0, c - size // 2), n - size), size


def pad_to_token_multiple(x: torch.Tensor) -> torch.Tensor:
    """Zero-pad the last three axes at the end to multiples of :data:`TOKEN_MULTIPLE`."""
    pads: list[int] = []
    for n, m in zip(reversed(x.shape[-3:]), reversed(TOKEN_MULTIPLE)):
        pads += [0, (-n) % m]
    return F.pad(x, pads) if any(pads) else x


def organ_window(
    image: torch.Tensor, mask: torch.Tensor, organ_index: int, roi: tuple[int, int, int]
) -> OrganWindow | None:
    """The official window for organ ``organ_index`` (label ``organ_index + 1``), or None if absent.

    Args:
        image: ``(D, H, W)`` float preprocessed volume.
        mask: ``(D, H, W)`` integer organ label map.
        roi: the model's ROI ``(d, h, w)``.
    """
    organ = mask == organ_index + 1
    by_slice = organ.flatten(1).any(1)  # (D,) which slices hold the organ
    if not bool(by_slice.any()):
        return None
    in_plane = organ.any(0)  # (H, W), so the H and W extents need no further pass over the volume
    start, size = [], []
    for axis, profile in enumerate((by_slice, in_plane.any(1), in_plane.any(0))):
        idx = torch.nonzero(profile).flatten()
        s, n = _axis_window(int(idx[0]), int(idx[-1]), mask.shape[axis], roi[axis])
        start.append(s)
        size.append(n)
    sl = tuple(slice(s, s + n) for s, n in zip(start, size))
    win_organ = organ[sl]
    win_mask = torch.where(win_organ, mask[sl], torch.zeros((), dtype=mask.dtype, device=mask.device))
    win_image = pad_to_token_multiple(image[sl][None, None])
    win_mask = pad_to_token_multiple(win_mask[None, None])
    return OrganWindow(organ_index, tuple(start), tuple(size), win_image, win_mask)


def _touches_border(organ: torch.Tensor) -> bool:
    """True when the organ has a voxel at index 0, 1, n-2 or n-1 of any axis."""
    for axis in range(organ.dim()):
        n = organ.shape[axis]
        edge = [i for i in (0, 1, n - 2, n - 1) if 0 <= i < n]
        if bool(organ.index_select(axis, torch.tensor(edge, device=organ.device)).any()):
            return True
    return False


def exclusion_reason(organ: torch.Tensor, whole_size: int | None, min_fraction: float) -> str | None:
    """Why a non-target organ is not scored in a window (None when it is).

    Args:
        organ: ``(D, H, W)`` bool voxels of the organ in the padded window.
        whole_size: voxel count of the organ in the whole volume, or None to skip the fraction rule.
        min_fraction: the smallest fraction of the organ that must lie in the window.
    """
    if not bool(organ.any()):
        return Status.ABSENT
    if _touches_border(organ):
        return Status.BORDER
    if whole_size is not None and int(organ.sum()) / whole_size < min_fraction:
        return Status.INCOMPLETE
    return None
