"""The CT volume every reader returns: Hounsfield units in the source's array order plus its affine.

Shared by :mod:`visd.data.io` (NIfTI, nibabel images, arrays) and :mod:`visd.data.dicom` (DICOM
series), which both build it with :func:`ct_volume_from_array`; the conventions (axes, RAS+ world,
spacing from the affine) are in ``docs/ct_conventions.md``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import nibabel as nib
import numpy as np

from visd.errors import InputError

__all__ = ["CTVolume", "check_affine", "ct_volume_from_array"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class CTVolume:
    """A CT scan as read, before any preprocessing.

    Attributes:
        array_hu: (X, Y, Z) float32 Hounsfield units, in the array order of the source.
        affine: (4, 4) float64 map from voxel index (i, j, k, 1) to RAS+ world millimetres.
        source: where the scan came from (a path or a short description), used in messages.
    """

    array_hu: np.ndarray
    affine: np.ndarray
    source: str

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.array_hu.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along the three array axes (the affine's column norms)."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]

    @property
    def axcodes(self) -> str:
        """The world direction each array axis points to, e.g. ``"RAS"`` or ``"LPS"``."""
        return "".join(nib.aff2axcodes(self.affine))


def check_affine(affine: np.ndarray, name: str) -> np.ndarray:
    """Validate a 4x4 voxel-to-world affine and return it as float64."""
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise InputError(f"the affine of {name} has shape {affine.shape}. Expected a 4x4 matrix.")
    if not np.all(np.isfinite(affine)):
        raise InputError(f"the affine of {name} holds non-finite values: {affine.tolist()}. Fix the file's header.")
    if abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise InputError(
            f"the affine of {name} is singular: {affine[:3, :3].tolist()}. "
            "Expected a voxel-to-world matrix with non-zero voxel sizes; fix the file's header."
        )
    return affine


def _as_3d(array: np.ndarray, name: str) -> np.ndarray:
    if array.ndim == 4 and array.shape[3] == 1:
        array = array[..., 0]  # a 3D scan saved as (X, Y, Z, 1), as some converters do
    if array.ndim != 3 or min(array.shape) < 2:
        kind = "2D" if array.ndim == 2 or (array.ndim == 3 and min(array.shape) < 2) else f"{array.ndim}D"
        raise InputError(
            f"{name} is a {kind} image of shape {tuple(array.shape)}. Expected one 3D CT volume "
            "(X, Y, Z) with at least 2 voxels per axis; for a 4D series pass one time point."
        )
    return array


def ct_volume_from_array(array: np.ndarray, affine: np.ndarray, name: str) -> CTVolume:
    """A validated :class:`CTVolume`: 3D (a trailing axis of 1 dropped), real, finite, float32 HU.

    ``affine`` is checked with :func:`check_affine`; ``name`` names the scan in messages and becomes
    ``source``. Values all within [-1, 1] are logged as a warning: they look normalised, not HU.
    """
    array = _as_3d(np.asarray(array), name)
    integer = np.issubdtype(array.dtype, np.integer)  # always finite
    if not (integer or np.issubdtype(array.dtype, np.floating)):
        raise InputError(f"{name} holds {array.dtype} voxels. Expected real numbers in Hounsfield units.")
    array = array.astype(np.float32, copy=False)
    with np.errstate(invalid="ignore", over="ignore"):  # inf + -inf: the element-wise check says which
        bad = None if integer or np.isfinite(array.sum(dtype=np.float64)) else ~np.isfinite(array)
    if bad is not None and bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise InputError(
            f"{name} has {int(bad.sum())} non-finite (NaN/inf) voxels, the first at index {first}. "
            "Expected finite Hounsfield units; fill them (e.g. with -1024) before loading."
        )
    lo, hi = float(array.min()), float(array.max())
    if lo >= -1.0 and hi <= 1.0:
        logger.warning("%s has values in [%g, %g]: it looks normalised, not in Hounsfield units", name, lo, hi)
    return CTVolume(array_hu=array, affine=check_affine(affine, name), source=name)
