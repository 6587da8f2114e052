"""Putting a label map onto a CT's voxel grid.

A label map normally shares the CT's grid (same shape, same affine). One with another shape or
orientation but the same physical extent (the same world bounding box) is resampled with nearest
neighbour; anything else is rejected, because a mask of another scan would silently select the
wrong anatomy.
"""

from __future__ import annotations

import itertools
import logging

import numpy as np

from visd.errors import InputError

__all__ = ["align_to_grid", "world_bounds"]

logger = logging.getLogger(__name__)

_SAME_GRID = 0.1  # voxel-centre corners within this fraction of the smallest CT voxel: the same grid
_SAME_EXTENT = 0.5  # world bounding boxes within this fraction of the smallest CT voxel: the same extent


def world_bounds(shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    """(2, 3) axis-aligned world bounding box (min, max) of a grid, voxel edges included, in mm."""
    corners = np.array(list(itertools.product(*[(-0.5, n - 0.5) for n in shape[:3]])))
    world = corners @ affine[:3, :3].T + affine[:3, 3]
    return np.stack([world.min(axis=0), world.max(axis=0)])


def _corner_centres(shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    corners = np.array(list(itertools.product(*[(0, n - 1) for n in shape[:3]])), dtype=np.float64)
    return corners @ affine[:3, :3].T + affine[:3, 3]


def align_to_grid(
    labels: np.ndarray,
    affine: np.ndarray,
    ct_shape: tuple[int, int, int],
    ct_affine: np.ndarray,
    *,
    what: str = "organ mask",
    name: str = "",
) -> np.ndarray:
    """Return ``labels`` on the CT grid (same array order and shape as the CT).

    Args:
        labels: (X, Y, Z) integer label map as stored.
        affine: its (4, 4) voxel-to-world affine.
        ct_shape, ct_affine: the CT's grid.
        what, name: how to name the label map in error messages.

    Raises:
        InputError: the label map covers another part of space than the CT (other shape or extent),
            or its grid is rotated relative to the CT's.
    """
    ct_shape = tuple(int(n) for n in ct_shape)  # type: ignore[assignment]
    shape = tuple(int(n) for n in labels.shape)
    voxel = float(np.linalg.norm(ct_affine[:3, :3], axis=0).min())
    src = f" ({name})" if name else ""
    if shape == ct_shape:
        dist = np.abs(_corner_centres(shape, affine) - _corner_centres(ct_shape, ct_affine)).max()
        if dist <= _SAME_GRID * voxel:
            return labels
    box, ct_box = world_bounds(shape, affine), world_bounds(ct_shape, ct_affine)
    if np.abs(box - ct_box).max() > _SAME_EXTENT * voxel:
        if shape != ct_shape:
            problem = f"differ in shape: mask {shape}, CT {ct_shape}"
        else:
            problem = (
                f"cover different parts of space: mask world box {np.round(box, 1).tolist()} mm, "
                f"CT {np.round(ct_box, 1).tolist()} mm"
            )
        raise InputError(f"{what}{src} and CT {problem}. Pass the label map that was computed on this CT.")
    logger.info("%s%s: resampling %s -> CT grid %s with nearest neighbour", what, src, shape, ct_shape)
    return _resample_nearest(labels, affine, ct_shape, ct_affine, what + src)


def _resample_nearest(
    labels: np.ndarray, affine: np.ndarray, ct_shape: tuple[int, int, int], ct_affine: np.ndarray, what: str
) -> np.ndarray:
    """Nearest-neighbour resampling for grids whose axes are parallel (a separable gather)."""
    m = np.linalg.solve(affine, ct_affine)  # CT voxel index -> mask voxel index
    lin = m[:3, :3]
    ct_axis_of = np.argmax(np.abs(lin), axis=1)  # for each mask axis, the CT axis it follows
    off_axis = np.abs(lin).copy()
    off_axis[np.arange(3), ct_axis_of] = 0.0
    if sorted(ct_axis_of.tolist()) != [0, 1, 2] or off_axis.max() > 1e-3 * np.abs(lin).max():
        raise InputError(
            f"{what} and CT have the same extent but rotated grids (voxel map {np.round(lin, 3).tolist()}). "
            "Expected a label map on the CT's grid; pass the label map that was computed on this CT."
        )
    index = []
    for a in range(3):
        b = int(ct_axis_of[a])
        pos = lin[a, b] * np.arange(ct_shape[b]) + m[a, 3]
        index.append(np.clip(np.floor(pos + 0.5).astype(np.int64), 0, labels.shape[a] - 1))
    gathered = labels[np.ix_(*index)]  # axis a of gathered runs along CT axis ct_axis_of[a]
    return np.ascontiguousarray(np.transpose(gathered, np.argsort(ct_axis_of)))
