"""Reading one CT series from a folder of single-frame DICOM files.

Slices are sorted by their position along the slice normal (never by file name or InstanceNumber),
Hounsfield units are ``stored * RescaleSlope + RescaleIntercept`` applied once per slice, and the affine
is built from ImagePositionPatient / ImageOrientationPatient / PixelSpacing and converted from DICOM's
LPS world to the NIfTI RAS+ world. The array is (X, Y, Z) = (column, row, slice), like a NIfTI file.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from visd.data.volume import CTVolume, ct_volume_from_array
from visd.errors import InputError

__all__ = ["read_dicom_series", "LPS_TO_RAS"]

logger = logging.getLogger(__name__)

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_GAP_TOLERANCE = 0.05  # relative deviation of one slice step from the median step
_REQUIRED = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns")


def read_dicom_series(folder: str | os.PathLike) -> CTVolume:
    """Read the single CT series stored in ``folder``.

    Args:
        folder: a folder whose files are the slices of one series (other non-DICOM files are ignored).

    Returns:
        A :class:`~visd.data.volume.CTVolume`: (X, Y, Z) float32 HU, RAS+ affine, ``source`` = the folder.

    Raises:
        InputError: no DICOM files, several series, a modality other than CT, a single slice (2D),
            multi-frame files, inconsistent geometry, duplicate or missing slices, unreadable pixels.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"DICOM folder not found: {folder}. Expected a folder holding one series.")
    slices = []
    for f in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        try:
            ds = pydicom.dcmread(f)
        except InvalidDicomError:
            logger.debug("skipping %s: not a DICOM file", f)
            continue
        except (OSError, EOFError, ValueError, KeyError) as e:
            raise InputError(f"cannot read DICOM file {f}: {e}. The file is damaged; export the series again.") from e
        if "PixelData" not in ds:
            logger.debug("skipping %s: no pixel data (%s)", f, ds.get("SOPClassUID", "?"))
            continue
        slices.append((f, ds))
    if not slices:
        raise InputError(f"no DICOM image files in {folder}. Expected the slices of one CT series (.dcm files).")
    _check_single_series(folder, slices)
    _check_modality(slices)
    return _assemble(folder, slices)


def _check_single_series(folder: Path, slices: list) -> None:
    series: dict[str, list] = {}
    for f, ds in slices:
        series.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append(f)
    if len(series) > 1:
        listing = ", ".join(f"{uid or '<none>'} ({len(fs)} files)" for uid, fs in series.items())
        raise InputError(
            f"{folder} holds {len(series)} DICOM series: {listing}. Expected exactly one; "
            "put each series in its own folder and pass that folder."
        )


def _check_modality(slices: list) -> None:
    for f, ds in slices:
        modality = str(ds.get("Modality", ""))
        if modality != "CT":
            raise InputError(
                f"DICOM file {f} has Modality {modality or '<missing>'!r}. Expected 'CT': "
                "ViSD models read computed tomography in Hounsfield units only."
            )
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        if frames > 1:
            raise InputError(
                f"DICOM file {f} is a multi-frame image ({frames} frames). Expected one slice per file; "
                "convert the series to NIfTI (e.g. with dcm2niix) and pass the .nii.gz file."
            )
        missing = [k for k in _REQUIRED if k not in ds]
        if missing:
            raise InputError(
                f"DICOM file {f} lacks {', '.join(missing)}. Expected the image plane tags that define "
                "the scan geometry; export the series with its full header."
            )


def _assemble(folder: Path, slices: list) -> CTVolume:
    first_file, first = slices[0]
    if len(slices) < 2:
        raise InputError(
            f"{folder} holds a single DICOM slice ({first_file.name}): a 2D image. "
            "Expected a 3D CT series with at least 2 slices; pass the folder with the whole series."
        )
    orient = np.asarray([float(v) for v in first.ImageOrientationPatient], dtype=np.float64)
    spacing = np.asarray([float(v) for v in first.PixelSpacing], dtype=np.float64)
    rows, cols = int(first.Rows), int(first.Columns)
    for f, ds in slices[1:]:
        o = np.asarray([float(v) for v in ds.ImageOrientationPatient])
        s = np.asarray([float(v) for v in ds.PixelSpacing])
        if not np.allclose(o, orient, atol=1e-4) or not np.allclose(s, spacing, atol=1e-4):
            raise InputError(
                f"DICOM slices of {folder} disagree on orientation or pixel spacing: {f.name} has "
                f"{o.tolist()} / {s.tolist()}, {first_file.name} has {orient.tolist()} / {spacing.tolist()}. "
                "Expected one series acquired in one plane; pass a folder with a single series."
            )
        if (int(ds.Rows), int(ds.Columns)) != (rows, cols):
            raise InputError(
                f"DICOM slices of {folder} differ in size: {f.name} is {int(ds.Rows)}x{int(ds.Columns)}, "
                f"{first_file.name} is {rows}x{cols}. Expected slices of one series."
            )
    row_dir, col_dir = orient[:3], orient[3:]
    normal = np.cross(row_dir, col_dir)
    positions = np.asarray([[float(v) for v in ds.ImagePositionPatient] for _, ds in slices], dtype=np.float64)
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    slices = [slices[i] for i in order]
    positions, along = positions[order], along[order]
    _check_steps(folder, [f for f, _ in slices], along)

    # (X=column, Y=row, Z=slice), Fortran-ordered: each slice's (row, column) pixels are one contiguous block
    array = np.empty((cols, rows, len(slices)), dtype=np.float32, order="F")
    try:
        for k, (f, ds) in enumerate(slices):
            stored = np.asarray(ds.pixel_array)
            if stored.shape != (rows, cols):
                raise InputError(
                    f"DICOM file {f} has pixel data of shape {stored.shape}. Expected ({rows}, {cols}) grey "
                    "values; colour or multi-sample images are not CT."
                )
            slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
            intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
            array[:, :, k] = (stored.astype(np.float64) * slope + intercept).T  # float64, then rounded to float32
    except InputError:
        raise
    except (OSError, EOFError, ValueError, AttributeError, NotImplementedError, RuntimeError) as e:
        raise InputError(
            f"cannot decode the pixel data of {f}: {type(e).__name__}: {e}. The file is damaged or uses a "
            "compression pydicom cannot decode here; install pylibjpeg/gdcm or convert the series with dcm2niix."
        ) from e

    lps = np.eye(4)
    lps[:3, 0] = row_dir * spacing[1]  # along a row: increasing column index, step = column spacing
    lps[:3, 1] = col_dir * spacing[0]  # down a column: increasing row index, step = row spacing
    lps[:3, 2] = (positions[-1] - positions[0]) / (len(slices) - 1)
    lps[:3, 3] = positions[0]
    logger.info("read DICOM series %s: %d slices of %dx%d", folder, len(slices), rows, cols)
    return ct_volume_from_array(array, LPS_TO_RAS @ lps, str(folder))


def _check_steps(folder: Path, files: list[Path], along: np.ndarray) -> None:
    steps = np.diff(along)
    dup = np.flatnonzero(steps < 1e-3)
    if dup.size:
        i = int(dup[0])
        raise InputError(
            f"DICOM series {folder} has two slices at the same position {along[i]:.3f} mm "
            f"({files[i].name}, {files[i + 1].name}). Expected one slice per position; "
            "remove duplicates or pass a folder with a single series."
        )
    step = float(np.median(steps))
    off = np.flatnonzero(np.abs(steps - step) > _GAP_TOLERANCE * step)
    if off.size:
        i = int(off[0])
        missing = round(steps[i] / step) - 1
        what = f"about {missing} slice(s) missing" if missing >= 1 else "uneven slice spacing"
        raise InputError(
            f"DICOM series {folder} has a gap: {steps[i]:.3f} mm between slices at {along[i]:.3f} mm "
            f"({files[i].name}) and {along[i + 1]:.3f} mm ({files[i + 1].name}), {step:.3f} mm elsewhere "
            f"({what}). Expected evenly spaced slices; export the complete series."
        )
