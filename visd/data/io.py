"""Reading CT scans: NIfTI files, DICOM series folders, nibabel images and arrays with an affine.

Every reader returns a :class:`~visd.data.volume.CTVolume` (re-exported here): the voxels in Hounsfield
units, in the array order the file stores them, and the 4x4 affine that maps voxel indices to the NIfTI
RAS+ world in millimetres.
Spacing and orientation always come from that affine, never from the array order; see
``docs/ct_conventions.md``.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path
from typing import Union

import nibabel as nib
import numpy as np

from visd.data.volume import CTVolume, check_affine, ct_volume_from_array
from visd.errors import InputError

__all__ = ["CTVolume", "read_ct", "read_nifti", "load_nifti_image", "check_affine", "NIFTI_SUFFIXES"]

NIFTI_SUFFIXES = (".nii", ".nii.gz")
CTSource = Union[str, os.PathLike, nib.spatialimages.SpatialImage, np.ndarray]

# Errors nibabel, gzip and numpy raise for an unreadable or truncated image file.
_READ_ERRORS = (OSError, EOFError, ValueError, zlib.error, nib.filebasedimages.ImageFileError)


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
        return ct_volume_from_array(source, affine, "array")
    if affine is not None:
        raise InputError(
            f"affine is only accepted with an array, got {type(source).__name__}. "
            "Files and images carry their own geometry; drop the affine argument."
        )
    if isinstance(source, nib.spatialimages.SpatialImage):
        name = source.get_filename() or type(source).__name__
        return ct_volume_from_array(_image_data(source, name), source.affine, name)
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
    return ct_volume_from_array(_image_data(img, str(path)), img.affine, str(path))


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
