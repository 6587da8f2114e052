"""Organ label maps: the model's own organ ids, or TotalSegmentator output merged by class name.

The result is always an (X, Y, Z) uint8 map on the CT's grid in which organ ``config.organs[i]`` has
value ``i + 1`` and everything else 0. TotalSegmentator classes are merged **by name** with
``config.totalsegmentator_map`` (for the chest model: lung = the five lobes, heart = heart +
atrial_appendage_left, esophagus, aorta), never by numeric id, because ids differ between versions.

Accepted TotalSegmentator outputs:
- the multilabel file (``--ml``), whose NIfTI header extension holds the label table TotalSegmentator
  v2 writes (``<CaretExtension>`` XML, one ``<Label Key="id"><![CDATA[name]]></Label>`` per class); when
  the extension is absent the ids are read with the v2 ``total`` table
  (:data:`visd.data.totalseg_classes.TOTAL_V2_CLASSES`);
- the folder with one binary ``<class name>.nii.gz`` per class.
"""

from __future__ import annotations

import logging
import os
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Union

import nibabel as nib
import numpy as np

from visd.config import ViSDConfig
from visd.data.grid import align_to_grid
from visd.data.io import NIFTI_SUFFIXES, CTVolume, _image_data, load_nifti_image
from visd.data.totalseg_classes import TOTAL_V2_CLASSES
from visd.errors import InputError, did_you_mean

__all__ = ["MASK_FORMATS", "read_organ_mask", "read_label_table", "merge_totalsegmentator", "check_organ_labels"]

logger = logging.getLogger(__name__)

MASK_FORMATS = ("auto", "visd", "totalsegmentator")
MaskSource = Union[str, os.PathLike, nib.spatialimages.SpatialImage, np.ndarray]


def read_organ_mask(source: MaskSource, ct: CTVolume, config: ViSDConfig, mask_format: str = "auto") -> np.ndarray:
    """Read an organ label map and return it in the model's organ ids on the CT grid.

    Args:
        source: a NIfTI file, a TotalSegmentator per-class folder, a nibabel image, or an (X, Y, Z)
            integer array already on the CT grid.
        ct: the scan the mask belongs to (its grid is the target grid).
        config: supplies ``organs`` (label ``i + 1`` = ``organs[i]``) and ``totalsegmentator_map``.
        mask_format: ``"visd"`` (values 0..len(organs)), ``"totalsegmentator"`` or ``"auto"`` (a folder
            or a file with a TotalSegmentator label table is TotalSegmentator; otherwise values up
            to len(organs) are visd ids and larger ones TotalSegmentator v2 ids).

    Returns:
        (X, Y, Z) uint8 organ label map with the CT's shape and array order.

    Raises:
        InputError: unknown format, unreadable file, a grid that does not match the CT, labels that
            are not organ ids, or no organ voxels at all.
    """
    if mask_format not in MASK_FORMATS:
        raise InputError(
            f"unknown mask_format {mask_format!r}. Expected one of {MASK_FORMATS}."
            + did_you_mean(mask_format, MASK_FORMATS)
        )
    if isinstance(source, np.ndarray):
        labels, affine, name, table = _int_labels(source, "array"), ct.affine, "array", None
        if labels.shape != ct.shape:
            raise InputError(
                f"organ mask and CT differ in shape: mask {labels.shape}, CT {ct.shape}. "
                "Pass the label map that was computed on this CT."
            )
    elif isinstance(source, nib.spatialimages.SpatialImage):
        name = source.get_filename() or "image"
        labels, affine, table = _int_labels(_image_data(source, name), name), source.affine, read_label_table(source)
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            if mask_format == "visd":
                raise InputError(
                    f"mask_format 'visd' needs one label map file, got the folder {path}. "
                    "Pass the file, or mask_format='totalsegmentator' for a per-class folder."
                )
            merged = _merge_class_folder(path, ct, config)
            return check_organ_labels(merged, config, str(path))
        img = load_nifti_image(path, what="organ mask")
        name = str(path)
        labels, affine, table = _int_labels(_image_data(img, name), name), img.affine, read_label_table(img)
    else:
        raise InputError(
            f"cannot read an organ mask from {type(source).__name__}. Expected a NIfTI path, a TotalSegmentator "
            "folder, a nibabel image or an (X, Y, Z) integer array on the CT grid."
        )

    if mask_format == "auto":
        if table is not None or int(labels.max(initial=0)) > len(config.organs):
            mask_format = "totalsegmentator"
        else:
            mask_format = "visd"
        logger.info("organ mask %s: read as %s labels", name, mask_format)
    if mask_format == "totalsegmentator":
        if table is None:
            logger.info("organ mask %s has no label table; using the TotalSegmentator v2 'total' ids", name)
        labels = merge_totalsegmentator(labels, table, config, name)
    labels = align_to_grid(labels, affine, ct.shape, ct.affine, what="organ mask", name=name)
    return check_organ_labels(labels, config, name)


def read_label_table(img: nib.spatialimages.SpatialImage) -> dict[int, str] | None:
    """The id -> name table TotalSegmentator stores in a NIfTI header extension, or ``None``."""
    for ext in getattr(img.header, "extensions", ()):
        content = ext.get_content()
        if isinstance(content, (bytes, bytearray)) and b"<CaretExtension" in content:
            try:
                root = ET.fromstring(bytes(content).decode("utf-8").strip())
            except (ET.ParseError, UnicodeDecodeError) as e:
                raise InputError(
                    f"the label table in the header of {img.get_filename() or 'the mask'} is not valid XML: {e}. "
                    "Re-export the TotalSegmentator output."
                ) from e
            table = {int(lab.attrib["Key"]): (lab.text or "").strip() for lab in root.iter("Label")}
            return table or None
    return None


def merge_totalsegmentator(
    labels: np.ndarray, table: dict[int, str] | None, config: ViSDConfig, name: str = "mask"
) -> np.ndarray:
    """Merge TotalSegmentator classes into organ ids by class name (official step 2).

    Args:
        labels: integer TotalSegmentator label map, any shape.
        table: its id -> class name table; ``None`` means TotalSegmentator v2 ``total`` ids.
        config: ``organs`` and ``totalsegmentator_map`` of the model.

    Returns:
        uint8 array of the same shape: organ ``i`` of ``config.organs`` -> ``i + 1``, all else 0.
    """
    fallback = table is None
    table = TOTAL_V2_CLASSES if table is None else table
    present = np.unique(labels)
    if present.size and present[0] < 0:
        raise InputError(f"{name} has negative labels {present[present < 0][:10].tolist()}. Expected ids >= 0.")
    unknown = [int(v) for v in present if v != 0 and int(v) not in table]
    if unknown and fallback:
        raise InputError(
            f"{name} has labels {unknown[:10]} that are not TotalSegmentator v2 'total' ids (1..{max(table)}). "
            "Expected a TotalSegmentator multilabel map; pass mask_format='visd' for organ ids, or a file "
            "with its label table."
        )
    if unknown:
        logger.warning("%s: labels %s are not in its label table and are ignored", name, unknown[:10])
    ids = {class_name: i for i, class_name in table.items()}
    lut = np.zeros(int(max(int(present.max(initial=0)), max(table, default=0))) + 1, dtype=np.uint8)
    found = 0
    for organ_index, organ in enumerate(config.organs):
        for class_name in config.totalsegmentator_map.get(organ, ()):
            if class_name in ids:
                lut[ids[class_name]] = organ_index + 1
                found += 1
            else:
                logger.warning("%s: the label table has no class %r (part of organ %r)", name, class_name, organ)
    if not found:
        wanted = sorted(n for names in config.totalsegmentator_map.values() for n in names)
        raise InputError(
            f"{name}: its label table names none of the classes this model needs ({', '.join(wanted)}). "
            "Expected a TotalSegmentator v2 'total' label map; run TotalSegmentator with task 'total'."
        )
    return lut[labels]


def check_organ_labels(labels: np.ndarray, config: ViSDConfig, name: str = "mask") -> np.ndarray:
    """Validate a label map in organ ids (0..len(organs)) and return it as uint8."""
    n = len(config.organs)
    lo, hi = (int(labels.min()), int(labels.max())) if labels.size else (0, 0)
    if lo < 0 or hi > n:
        bad = [int(v) for v in np.unique(labels[(labels < 0) | (labels > n)])]
        ids = ", ".join(f"{i + 1}={o}" for i, o in enumerate(config.organs))
        raise InputError(
            f"organ mask {name} has unknown labels {bad[:20]}. Expected 0 (background) or organ ids {ids}. "
            "Pass mask_format='totalsegmentator' for a TotalSegmentator map, or relabel the mask."
        )
    if hi <= 0:
        raise InputError(
            f"organ mask {name} is empty: it has no voxel of any organ ({', '.join(config.organs)}). "
            "Expected a label map of this CT that covers these organs; check the mask and the scan's body region."
        )
    return labels.astype(np.uint8, copy=False)


def _int_labels(array: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim == 4 and array.shape[3] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise InputError(f"organ mask {name} has shape {array.shape}. Expected a 3D label map (X, Y, Z).")
    if np.issubdtype(array.dtype, np.integer):
        return array
    floating = np.issubdtype(array.dtype, np.floating)
    if not (floating and np.all(np.isfinite(array)) and np.all(array == np.round(array))):
        raise InputError(
            f"organ mask {name} holds non-integer values ({array.dtype}). Expected integer labels; "
            "pass a label map, not a probability map."
        )
    return array.astype(np.int64)


def _merge_class_folder(folder: Path, ct: CTVolume, config: ViSDConfig) -> np.ndarray:
    """Merge a TotalSegmentator folder with one binary ``<name>.nii.gz`` per class."""
    merged = np.zeros(ct.shape, dtype=np.uint8)
    found = []
    for organ_index, organ in enumerate(config.organs):
        for class_name in config.totalsegmentator_map.get(organ, ()):
            candidates = [folder / f"{class_name}{suffix}" for suffix in NIFTI_SUFFIXES]
            path = next((p for p in candidates if p.is_file()), None)
            if path is None:
                logger.warning("%s: no file for class %r (part of organ %r)", folder, class_name, organ)
                continue
            img = load_nifti_image(path, what="organ mask")
            binary = _int_labels(_image_data(img, str(path)), str(path)) > 0
            binary = align_to_grid(binary, img.affine, ct.shape, ct.affine, what="organ mask", name=str(path))
            merged[binary] = organ_index + 1
            found.append(path.name)
    if not found:
        wanted = sorted(f"{n}.nii.gz" for names in config.totalsegmentator_map.values() for n in names)
        raise InputError(
            f"TotalSegmentator folder {folder} has none of the class files this model needs "
            f"(expected e.g. {', '.join(wanted[:5])}...). Pass the 'segmentations' folder TotalSegmentator wrote."
        )
    logger.info("merged %d TotalSegmentator class files from %s", len(found), folder)
    return merged
