"""Helpers shared by the data tests (paths to tests/data, reference merge, writers)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

DATA = Path(__file__).resolve().parents[1] / "data"

# Independent reference for the merge: TotalSegmentator v2 'total' ids of the chest organs
# (tests/data/README.md), organ value = position in ViSDConfig().organs + 1.
CHEST_IDS = {1: (10, 11, 12, 13, 14), 2: (51, 61), 3: (15,), 4: (52,)}

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def data_file(name: str) -> Path:
    path = DATA / name
    assert path.is_file(), f"missing test data file {path} (see tests/data/README.md)"
    return path


def merge_by_ids(labels: np.ndarray) -> np.ndarray:
    out = np.zeros(labels.shape, dtype=np.uint8)
    for organ, ids in CHEST_IDS.items():
        out[np.isin(labels, ids)] = organ
    return out


def save_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    nib.save(nib.Nifti1Image(array, affine), path)
    return path


def write_dicom_series(
    hu: np.ndarray,
    affine_ras: np.ndarray,
    folder: Path,
    *,
    modality: str = "CT",
    slope: float = 1.0,
    intercept: float = -1024.0,
    seed: int = 0,
) -> list[Path]:
    """Write an (X, Y, Z) HU volume as one DICOM file per slice, in shuffled file-name order.

    Stored values are ``(hu - intercept) / slope`` as int16; the geometry tags are derived from the
    RAS affine converted to DICOM's LPS world. Returns the file paths in slice order.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid
    from pydicom.valuerep import format_number_as_ds

    def ds_values(values) -> list[str]:
        return [format_number_as_ds(float(v)) for v in values]

    folder.mkdir(parents=True, exist_ok=True)
    lps = LPS_TO_RAS @ affine_ras
    col_step, row_step = np.linalg.norm(lps[:3, 0]), np.linalg.norm(lps[:3, 1])
    orientation = np.concatenate([lps[:3, 0] / col_step, lps[:3, 1] / row_step])
    stored = np.round((hu.astype(np.float64) - intercept) / slope).astype(np.int16)
    sop_class = CTImageStorage if modality == "CT" else MRImageStorage
    series_uid, study_uid = generate_uid(), generate_uid()
    n = hu.shape[2]
    names = np.random.default_rng(seed).permutation(n)
    paths = []
    for k in range(n):
        uid = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = sop_class, uid
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.Modality = modality
        ds.InstanceNumber = int(names[k]) + 1  # deliberately unrelated to position
        ds.ImagePositionPatient = ds_values(lps @ np.array([0.0, 0.0, k, 1.0]))[:3]
        ds.ImageOrientationPatient = ds_values(orientation)
        ds.PixelSpacing = ds_values([row_step, col_step])
        ds.SliceThickness = format_number_as_ds(float(np.linalg.norm(lps[:3, 2])))
        ds.Rows, ds.Columns = hu.shape[1], hu.shape[0]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = format_number_as_ds(slope), format_number_as_ds(intercept)
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).astype("<i2").tobytes()  # (rows, cols)
        path = folder / f"IM{int(names[k]):04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
