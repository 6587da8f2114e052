"""Array reorientation by axis flips and permutations (no resampling), with nibabel's utilities.

A reorientation only reorders voxels, so it is exact and invertible: the voxel values and the world
position of every voxel are unchanged, only the array order and the affine change.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from nibabel.orientations import (
    apply_orientation,
    axcodes2ornt,
    inv_ornt_aff,
    io_orientation,
    ornt2axcodes,
    ornt_transform,
)

__all__ = ["Reorientation", "reorientation_to"]


@dataclass(frozen=True, eq=False)
class Reorientation:
    """The flips and permutation that bring an array from its stored orientation to ``target``.

    Attributes:
        transform: (3, 2) nibabel orientation transform (``ornt_transform(start, target)``).
        source_shape: shape of the array as stored.
        source_axcodes: the stored orientation, e.g. ``"RAS"``.
        target_axcodes: the orientation after :meth:`apply`, e.g. ``"LPS"``.
    """

    transform: np.ndarray
    source_shape: tuple[int, int, int]
    source_axcodes: str
    target_axcodes: str

    @property
    def is_identity(self) -> bool:
        return bool(np.array_equal(self.transform, [[0, 1], [1, 1], [2, 1]]))

    @property
    def target_shape(self) -> tuple[int, int, int]:
        perm = self.transform[:, 0].astype(int)
        shape = [0, 0, 0]
        for src_axis, dst_axis in enumerate(perm):
            shape[dst_axis] = self.source_shape[src_axis]
        return tuple(shape)  # type: ignore[return-value]

    def apply(self, array: np.ndarray) -> np.ndarray:
        """Reorder a stored-order (X, Y, Z) array into the target orientation (a view when possible)."""
        if tuple(array.shape[:3]) != self.source_shape:
            raise ValueError(f"array shape {array.shape} does not match the source shape {self.source_shape}")
        return array if self.is_identity else apply_orientation(array, self.transform)

    def invert(self, array: np.ndarray) -> np.ndarray:
        """Reorder a target-orientation array back into the stored order; inverse of :meth:`apply`."""
        if tuple(array.shape[:3]) != self.target_shape:
            raise ValueError(f"array shape {array.shape} does not match the target shape {self.target_shape}")
        if self.is_identity:
            return array
        back = ornt_transform(axcodes2ornt(self.target_axcodes), axcodes2ornt(self.source_axcodes))
        return apply_orientation(array, back)

    def apply_affine(self, affine: np.ndarray) -> np.ndarray:
        """The affine of the reoriented array (same world positions, new voxel order)."""
        return affine @ inv_ornt_aff(self.transform, self.source_shape)


def reorientation_to(affine: np.ndarray, shape: tuple[int, ...], target: str = "LPS") -> Reorientation:
    """Plan the reorientation of an array with ``affine`` and ``shape`` to ``target`` axis codes.

    For an oblique affine the closest axis-aligned orientation is used (nibabel ``io_orientation``);
    the array is never resampled.
    """
    start = io_orientation(affine)
    transform = ornt_transform(start, axcodes2ornt(target))
    return Reorientation(
        transform=transform,
        source_shape=tuple(int(n) for n in shape[:3]),  # type: ignore[arg-type]
        source_axcodes="".join(ornt2axcodes(start)),
        target_axcodes=target,
    )
