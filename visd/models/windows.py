"""Which organs count in a window or a crop: the one rule of inference, training and the normality stage.

An organ counts in a window when it is present and has no voxel on the window border (index 0, 1,
n-2 or n-1 of an axis); at inference a non-target organ must also hold at least ``min_fraction`` of
its whole-volume voxels. :func:`window_status` decides it for a batch of windows at once.
All arrays here are preprocessed label maps (see ``docs/ct_conventions.md``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from visd.models.vision import TOKEN_MULTIPLE

__all__ = ["STATUSES", "Status", "exclusion_reason", "pad_to_token_multiple", "window_status"]


class Status:
    """Why an organ was or was not scored (the strings that appear in result tables)."""

    SCORED = "scored"
    ABSENT = "organ_absent"
    BORDER = "touches_window_border"
    INCOMPLETE = "incomplete_in_window"


#: The statuses in code order: :func:`window_status` returns indices into this tuple.
STATUSES: tuple[str, ...] = (Status.SCORED, Status.ABSENT, Status.BORDER, Status.INCOMPLETE)


def pad_to_token_multiple(x: torch.Tensor) -> torch.Tensor:
    """Zero-pad the last three axes at the end to multiples of :data:`TOKEN_MULTIPLE`."""
    pads: list[int] = []
    for n, m in zip(reversed(x.shape[-3:]), reversed(TOKEN_MULTIPLE)):
        pads += [0, (-n) % m]
    return F.pad(x, pads) if any(pads) else x


def _label_counts(labels: torch.Tensor, num_organs: int) -> torch.Tensor:
    """``(B, O + 1)`` voxel count of each label 0..O in each batch item of ``labels`` ``(B, ...)``.

    Counted in the labels' own integer type, window by window: a lung window holds ~30 million
    voxels, and an int64 copy of them would cost more than the count.
    """
    rows = [torch.bincount(item.flatten(), minlength=num_organs + 1)[: num_organs + 1] for item in labels]
    return torch.stack(rows)


def _border_planes(mask: torch.Tensor) -> torch.Tensor:
    """The voxels on the border planes (index 0, 1, n-2, n-1 of each spatial axis) of ``(B, D, H, W)``."""
    parts = []
    for axis in range(1, 4):
        n = mask.shape[axis]
        edge = sorted({i for i in (0, 1, n - 2, n - 1) if 0 <= i < n})
        parts.append(mask.index_select(axis, torch.tensor(edge, device=mask.device)).flatten(1))
    return torch.cat(parts, 1)


def window_status(
    mask: torch.Tensor,
    num_organs: int,
    *,
    targets: Sequence[int | None] | None = None,
    whole_sizes: Sequence[int | None] | None = None,
    min_fraction: float = 0.0,
) -> torch.Tensor:
    """Whether each organ counts in each window, as codes into :data:`STATUSES`.

    Args:
        mask: ``(B, D, H, W)`` or ``(B, 1, D, H, W)`` organ labels of the windows (organ ``o`` has
            label ``o + 1``).
        num_organs: the model's organ count O.
        targets: per window, the organ it was cut for (only required to be present), or None.
        whole_sizes: per organ, its voxel count in the whole volume, or None to skip the fraction rule.
        min_fraction: the smallest fraction of a non-target organ that must lie in the window.

    Returns:
        ``(B, O)`` int64 on the CPU: 0 counts (``scored``), 1 ``organ_absent``,
        2 ``touches_window_border``, 3 ``incomplete_in_window``.
    """
    mask = mask[:, 0] if mask.dim() == 5 else mask
    counts = _label_counts(mask, num_organs)[:, 1:].cpu()
    on_border = _label_counts(_border_planes(mask), num_organs)[:, 1:].cpu() > 0
    codes = torch.zeros(counts.shape, dtype=torch.int64)
    if whole_sizes is not None:
        whole = torch.tensor([float("nan") if n is None else float(n) for n in whole_sizes], dtype=torch.float64)
        codes[counts.double() / whole < min_fraction] = 3  # NaN (no size given) compares False
    codes[on_border] = 2
    if targets is not None:  # the window's own organ need only be present
        for b, t in enumerate(targets):
            if t is not None:
                codes[b, t] = 0
    codes[counts == 0] = 1
    return codes


def exclusion_reason(organ: torch.Tensor, whole_size: int | None, min_fraction: float) -> str | None:
    """Why one non-target organ is not scored in a window (None when it is): :func:`window_status`
    for a single organ's voxels.

    Args:
        organ: ``(D, H, W)`` bool voxels of the organ in the padded window.
        whole_size: voxel count of the organ in the whole volume, or None to skip the fraction rule.
        min_fraction: the smallest fraction of the organ that must lie in the window.
    """
    code = int(window_status(organ[None].to(torch.uint8), 1, whole_sizes=[whole_size], min_fraction=min_fraction)[0, 0])
    return None if code == 0 else STATUSES[code]
