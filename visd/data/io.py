"""Reading CT scans: NIfTI files, DICOM series folders, nibabel images and arrays with an affine.

Every reader returns a :class:`CTVolume`: the voxels in Hounsfield units, in the array order the file
stores them, and the 4x4 affine that maps voxel indices to the NIfTI RAS+ world in millimetres.
Spacing and orientation always come from that affine, never from the array order; see
``docs/ct_conventions.md``.
"""

from __future__ import annotations

import logging
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import nibabel as nib
import numpy as np

from visd.errors import InputError

__all__ = ["CTVolume", "read_ct", "read_nifti", "load_nifti_image", "check_affine", "NIFTI_SUFFIXES"]

logger = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii", ".nii.gz")
CTSource = Union[str, os.PathLike, nib.spatialimages.SpatialImage, np.ndarray]

# Errors nibabel, gzip and numpy raise for an unreadable or truncated image file.
_READ_ERRORS = (OSError, EOFError, ValueError, zlib.error, nib.filebasedimages.ImageFileError)


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


def read_ct(source: CTSource, affine: np.ndarray | None = None) -> CTVolume:
    """Read a CT scan in Hounsfield units.

    Args:
        source: a ``.nii`` / ``.nii.gz`` file, a folder holding one DICOM series, a nibabel image,
            or an (X, Y, Z) array in Hounsfield units (then ``affine`` is required).
        affine: (4, 4) voxel-to-RAS+ world affine in mm, only with an array ``source``.

    Returns:
        A :class:`CTVolume` with float32 HU in the source's array order and its RAS+ affine.

    Raises:
        InputError: missing file, unsupported file type, unreadable or truncated file, an image that
            is not 3D, non-finite voxels or affine, a DICOM series that is not CT or has gaps.
    """
    if isinstance(source, np.ndarray):
        if affine is None:
            raise InputError(
                f"a CT array needs its affine: got an array of shape {source.shape} and affine=None. "
                "Expected a 4x4 voxel-to-world (RAS+, mm) matrix; pass read_ct(array, affine=...) "
                "(spacing and orientation are never guessed from the array order)."
            )
        return _volume(source, affine, "array")
    if affine is not None:
        raise InputError(
            f"affine is only accepted with an array, got {type(source).__name__}. "
            "Files and images carry their own geometry; drop the affine argument."
        )
    if isinstance(source, nib.spatialimages.SpatialImage):
        name = source.get_filename() or type(source).__name__
        return _volume(_image_data(source, name), source.affine, name)
    if not isinstance(source, (str, os.PathLike)):
        raise InputError(
            f"cannot read a CT from {type(source).__name__}. Expected a NIfTI path, a DICOM folder, "
            "a nibabel image or a numpy array with its affine."
        )
    path = Path(source)
    if not path.exists():
        raise InputError(f"CT file not found: {path}. Expected an existing .nii/.nii.gz file or DICOM folder.")
    if path.is_dir():
        from visd.data.dicom import read_dicom_series

        return read_dicom_series(path)
    return read_nifti(path)


def read_nifti(path: str | os.PathLike) -> CTVolume:
    """Read a CT from a ``.nii`` or ``.nii.gz`` file; see :func:`read_ct`."""
    img = load_nifti_image(path, what="CT")
    return _volume(_image_data(img, str(path)), img.affine, str(path))


def load_nifti_image(path: str | os.PathLike, what: str = "image") -> nib.Nifti1Image:
    """Open a NIfTI file (header only), with a clear :class:`InputError` for bad paths."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} file not found: {path}. Expected an existing .nii or .nii.gz file.")
    if not path.name.lower().endswith(NIFTI_SUFFIXES):
        hint = " For DICOM, pass the folder that holds the series." if path.suffix.lower() in (".dcm", ".ima") else ""
        raise InputError(
            f"unsupported {what} file type: {path.name!r} in {path.parent}. "
            f"Expected a NIfTI file ending in {' or '.join(NIFTI_SUFFIXES)} or a DICOM series folder.{hint}"
        )
    try:
        img = nib.load(path)
    except _READ_ERRORS as e:
        raise InputError(f"cannot read {what} file {path}: {e}. The file is damaged or not NIfTI; re-export it.") from e
    return img


def _image_data(img: nib.spatialimages.SpatialImage, name: str) -> np.ndarray:
    """The voxel values with the header's scaling applied once (nibabel's ``dataobj``)."""
    try:
        return np.asarray(img.dataobj)
    except _READ_ERRORS as e:
        raise InputError(
            f"cannot read the voxels of {name}: {type(e).__name__}: {e}. "
            "The file is truncated or damaged; copy or export it again."
        ) from e


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


def _volume(array: np.ndarray, affine: np.ndarray, name: str) -> CTVolume:
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
