"""DICOM outputs for a DICOM input (``pip install "visd[dicom]"``, which brings highdicom).

For a scan read from a DICOM series folder, :func:`write_dicom_outputs` writes into
``<out_dir>/<scan>/``:

* ``findings_sr.dcm``: a Comprehensive 3D SR holding a TID 1500 Measurement Report; one measurement
  group per organ, one measurement per finding whose value is the zero-shot probability (unit UCUM
  ``1``, no units). Findings and organs are coded in visd's private scheme ``99VISD`` (code value = the
  name, meaning = the name), since the catalogue is configurable and has no standard codes; findings
  that were not scored (organ absent or excluded) are left out and named in the group's tracking
  identifier instead of a value. The algorithm (visd and its version) is recorded with each group.
* ``anomaly_pm.dcm`` (when the anomaly map was written): a Parametric Map, one float32 frame per source
  slice in the source's slice order, on exactly the source grid, with a real-world value mapping
  ``value = pixel`` (normality deviation, no units).

Both objects reference the source study and series (same StudyInstanceUID and patient, the source
series and instances in their evidence / referenced series sequences) and are new series of that study.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from visd._io import atomic_path
from visd.errors import InputError, MissingDependencyError

__all__ = ["DICOM_SCHEME", "read_source_series", "require_highdicom", "write_dicom_outputs", "write_scan_outputs"]

logger = logging.getLogger(__name__)

DICOM_SCHEME = "99VISD"  # private coding scheme designator of visd's organ and finding names
SR_NAME, PM_NAME = "findings_sr.dcm", "anomaly_pm.dcm"
_NO_UNITS = ("1", "UCUM", "no units")


def require_highdicom():
    """The highdicom module; :class:`MissingDependencyError` with the install command when it is missing."""
    try:
        import highdicom
    except ImportError as e:
        raise MissingDependencyError(
            f"DICOM outputs need highdicom, which is not installed ({e}). "
            'Install it with: pip install "visd[dicom]", or leave out --dicom-out.'
        ) from e
    return highdicom


def read_source_series(folder: str | os.PathLike) -> list[Any]:
    """The headers of a DICOM series (no pixel data), in visd's slice order (along the slice normal)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    headers = []
    for f in sorted(p for p in Path(folder).iterdir() if p.is_file() and not p.name.startswith(".")):
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except InvalidDicomError:
            continue
        if "ImagePositionPatient" in ds:
            headers.append(_with_type2(ds))
    if not headers:
        raise InputError(f"no DICOM image files in {folder}. Expected the CT series the scan was read from.")
    orientation = np.asarray([float(v) for v in headers[0].ImageOrientationPatient])
    normal = np.cross(orientation[:3], orientation[3:])
    along = [float(np.dot([float(v) for v in ds.ImagePositionPatient], normal)) for ds in headers]
    return [headers[i] for i in np.argsort(along, kind="stable")]


# Type 2 attributes of the Patient and General Study modules that the derived objects copy from the
# source: present but possibly empty in a conformant file; an export that drops them gets them empty
_TYPE2 = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "StudyID", "StudyDate", "StudyTime",
          "AccessionNumber", "ReferringPhysicianName")


def _with_type2(ds: Any) -> Any:
    missing = [k for k in _TYPE2 if k not in ds]
    for keyword in missing:
        setattr(ds, keyword, None)
    if missing:
        logger.debug("%s lacks the type 2 attributes %s; they are empty in the outputs", ds.filename, missing)
    return ds


def write_dicom_outputs(
    source: str | os.PathLike,
    scan: str,
    rows: Sequence[tuple[str, str, float, str]],
    out_dir: str | os.PathLike,
    anomaly_map: np.ndarray | None = None,
) -> list[Path]:
    """Write the findings SR (and the anomaly Parametric Map) of one scan read from a DICOM series.

    Args:
        source: the DICOM series folder the scan was read from.
        scan: the scan id (the output sub-folder).
        rows: ``(organ, finding, probability, status)`` per finding, as in the findings table.
        out_dir: output folder; the objects go to ``<out_dir>/<scan>/``.
        anomaly_map: ``(X, Y, Z)`` float map on the input grid (the NIfTI anomaly map's array), or ``None``.

    Returns:
        The paths written.

    Raises:
        MissingDependencyError: highdicom is not installed.
        InputError: ``source`` is not a DICOM series folder, or the map does not fit the series.
    """
    hd = require_highdicom()
    if not Path(source).is_dir():
        raise InputError(
            f"DICOM outputs need a DICOM series input, got {source}. Pass the series folder, or leave out --dicom-out."
        )
    images = read_source_series(source)
    folder = Path(out_dir) / scan
    folder.mkdir(parents=True, exist_ok=True)
    paths = [_write(folder / SR_NAME, _findings_sr(hd, images, rows))]
    if anomaly_map is not None:
        paths.append(_write(folder / PM_NAME, _parametric_map(hd, images, np.asarray(anomaly_map, np.float32))))
    logger.info("wrote DICOM outputs of %s: %s", scan, ", ".join(p.name for p in paths))
    return paths


def _write(path: Path, dataset: Any) -> Path:
    with atomic_path(path) as tmp:
        dataset.save_as(tmp, enforce_file_format=True)
    return path


def _code(hd, name: str):
    return hd.sr.CodedConcept(value=name[:64], scheme_designator=DICOM_SCHEME, meaning=name[:64])


def _version() -> str:
    from visd._version import __version__

    return __version__


def _findings_sr(hd, images: list, rows: Sequence[tuple[str, str, float, str]]):
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    algorithm = hd.sr.AlgorithmIdentification(name="visd zero-shot", version=_version())
    groups = []
    for organ in dict.fromkeys(r[0] for r in rows):
        scored = [r for r in rows if r[0] == organ and r[3] == "scored" and np.isfinite(r[2])]
        other = [f"{r[1]}: {r[3]}" for r in rows if r[0] == organ and r not in scored]
        label = f"{organ} findings" + (f" (not scored: {'; '.join(other)})" if other else "")
        measurements = [
            hd.sr.Measurement(name=_code(hd, finding), value=float(p), unit=hd.sr.CodedConcept(*_NO_UNITS),
                              algorithm_id=algorithm)
            for _, finding, p, _ in scored
        ]
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier=label[:64]),
            finding_type=_code(hd, organ),
            algorithm_id=algorithm,
            measurements=measurements or None,
        ))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(
            observer_device_context=hd.sr.ObserverContext(
                observer_type=codes.DCM.Device,
                observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                    uid=generate_uid(), name="visd", model_name="ViSD-Boost", manufacturer_name="visd",
                ),
            ),
        ),
        procedure_reported=codes.LN.CTUnspecifiedBodyRegion,
        imaging_measurements=groups,
    )
    return hd.sr.Comprehensive3DSR(
        evidence=images, content=report, series_instance_uid=generate_uid(), series_number=9001,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer="visd",
        series_description="visd zero-shot findings (research use)",
    )


def _parametric_map(hd, images: list, volume: np.ndarray):
    from pydicom.uid import generate_uid

    rows, cols = int(images[0].Rows), int(images[0].Columns)
    if volume.shape != (cols, rows, len(images)):
        raise InputError(
            f"anomaly map of shape {volume.shape} does not fit the DICOM series ({cols} columns, {rows} rows, "
            f"{len(images)} slices). Expected the map on the input scan's grid (X, Y, Z)."
        )
    if "FrameOfReferenceUID" not in images[0]:
        raise InputError(
            f"the DICOM series {Path(images[0].filename).parent} has no FrameOfReferenceUID, so a parametric map "
            "cannot be placed on it. Expected a complete CT export (the Frame of Reference module is required)."
        )
    frames = np.ascontiguousarray(volume.transpose(2, 1, 0))  # (slice, row, column)
    mapping = hd.pm.RealWorldValueMapping(
        lut_label="anomaly", lut_explanation="visd normality deviation (anomaly map)",
        unit=hd.sr.CodedConcept(*_NO_UNITS), value_range=(float(frames.min()), float(frames.max())),
        slope=1.0, intercept=0.0,
    )
    lo, hi = float(frames.min()), float(frames.max())
    return hd.pm.ParametricMap(
        source_images=images, pixel_array=frames, series_instance_uid=generate_uid(), series_number=9002,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer="visd", manufacturer_model_name="ViSD-Boost",
        software_versions=_version(), device_serial_number="none", contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping],
        # frame k is slice k of the source, in visd's slice order (the map's Z axis); stated, not left to sorting
        plane_positions=[
            hd.PlanePositionSequence(coordinate_system="PATIENT", image_position=[float(v) for v in ds.ImagePositionPatient])
            for ds in images
        ],
        voi_lut_transformations=[hd.VOILUTTransformation(window_center=(lo + hi) / 2, window_width=max(hi - lo, 1e-6))],
        series_description="visd anomaly map (research use)",
    )


def write_scan_outputs(outcome: Any, out_dir: str | os.PathLike) -> list[Path]:
    """:func:`write_dicom_outputs` for one diagnosed scan (a :class:`~visd.zero_shot.journal.ScanOutcome`).

    A scan not read from a DICOM folder gets no DICOM outputs (logged). A series whose headers cannot
    carry a derived object is logged as a warning and the batch goes on; the findings table has the results.
    """
    if outcome.source is None or not Path(outcome.source).is_dir():
        logger.info("no DICOM outputs for %s: its input is not a DICOM series folder", outcome.scan)
        return []
    amap = None
    if outcome.anomaly_maps is not None:
        import nibabel as nib

        amap = np.asarray(nib.load(outcome.anomaly_maps[0]).dataobj, dtype=np.float32)
    try:
        return write_dicom_outputs(outcome.source, outcome.scan, outcome.rows, out_dir, amap)
    except InputError as e:
        logger.warning("no DICOM outputs for %s: %s", outcome.scan, e)
        return []
