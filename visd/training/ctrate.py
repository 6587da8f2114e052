"""CT-RATE adapters: turn the dataset's files into a training manifest.

Inputs (CT-RATE's names):

* the reports CSV (``train_reports.csv``): ``VolumeName``, ``Findings_EN``, ``Impressions_EN``
  (other columns are ignored). It lists the volumes to train on.
* fVLM's organ-split reports ``desc_info.json`` (findings) and ``conc_info.json`` (impressions):
  ``{study_id: {organ: sentence}}`` where the study id is the volume name without its
  reconstruction number (``train_1_a_1.nii.gz`` -> ``train_1_a``).
* optionally the labels CSV (``train_predicted_labels.csv``): ``VolumeName`` and one 0/1 column
  per finding. An organ is abnormal when any of its findings is 1 (finding -> organ from the model
  config's ``findings``); these labels then replace the text-derived ones.

Organ texts follow fVLM's rule (:func:`visd.training.reports.organ_text`). Volumes are found under
``image_root`` (and masks, same file name, under ``mask_root``) in CT-RATE's nested layout
``train_1/train_1_a/train_1_a_1.nii.gz`` or a flat one.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from visd.errors import InputError, did_you_mean
from visd.training.manifest import ManifestRecord, make_record
from visd.training.reports import organ_text

__all__ = [
    "Report",
    "study_id",
    "volume_path",
    "read_reports",
    "read_organ_reports",
    "read_labels",
    "ctrate_records",
]

logger = logging.getLogger(__name__)

_SUFFIXES = (".nii.gz", ".nii", ".npz", ".npy")


@dataclass(frozen=True)
class Report:
    """A CT-RATE report: the English findings and impressions of one volume."""

    findings: str
    impressions: str


def _stem(volume_name: str) -> str:
    for s in _SUFFIXES:
        if volume_name.endswith(s):
            return volume_name[: -len(s)]
    return volume_name


def study_id(volume_name: str) -> str:
    """The study (report) id of a volume: ``"train_1_a_1.nii.gz"`` -> ``"train_1_a"``."""
    stem = _stem(volume_name)
    parts = stem.split("_")
    if len(parts) < 2 or not re.fullmatch(r"\d+", parts[-1]):
        raise InputError(
            f"volume name {volume_name!r} does not end in a reconstruction number (like train_1_a_1.nii.gz); "
            "expected CT-RATE's <split>_<patient>_<study>_<reconstruction> naming"
        )
    return "_".join(parts[:-1])


def volume_path(root: str | Path, volume_name: str, layout: Literal["nested", "flat"] = "nested") -> Path:
    """Where a volume lives: ``root/train_1/train_1_a/train_1_a_1.nii.gz`` (nested) or ``root/<name>`` (flat)."""
    root = Path(root)
    if layout == "flat":
        return root / volume_name
    if layout != "nested":
        raise InputError(
            f"unknown CT-RATE layout {layout!r}; expected 'nested' or 'flat'.{did_you_mean(layout, ('nested', 'flat'))}"
        )
    parts = _stem(volume_name).split("_")
    if len(parts) < 4:
        raise InputError(f"volume name {volume_name!r} does not follow CT-RATE's naming (train_1_a_1.nii.gz); use layout='flat'")
    return root / "_".join(parts[:2]) / "_".join(parts[:3]) / volume_name


def _read_csv(path: str | Path, required: Sequence[str]) -> list[dict[str, str]]:
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            columns = reader.fieldnames or []
            for c in required:
                if c not in columns:
                    raise InputError(
                        f"{path} has no column {c!r}; its columns are {columns[:12]}.{did_you_mean(c, columns)}"
                    )
            return list(reader)
    except OSError as e:
        raise InputError(f"cannot read {path}: {e}") from e


def read_reports(path: str | Path) -> dict[str, Report]:
    """CT-RATE reports CSV -> ``{VolumeName: Report}`` (file order kept)."""
    rows = _read_csv(path, ("VolumeName", "Findings_EN", "Impressions_EN"))
    return {r["VolumeName"]: Report(r["Findings_EN"] or "", r["Impressions_EN"] or "") for r in rows}


def read_organ_reports(path: str | Path) -> dict[str, dict[str, str]]:
    """fVLM's ``desc_info.json`` / ``conc_info.json``: ``{study_id: {organ: sentence}}``."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"cannot read organ-split reports {path}: {e}") from e
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise InputError(f"{path} must hold {{study_id: {{organ: sentence}}}} (fVLM's desc_info/conc_info format)")
    return data


def read_labels(path: str | Path, finding_organs: Mapping[str, str], organs: Sequence[str]) -> dict[str, dict[str, bool]]:
    """CT-RATE labels CSV -> ``{VolumeName: {organ: abnormal}}``.

    Args:
        finding_organs: finding column -> organ (e.g. ``{f.name: f.organ for f in config.findings}``);
            columns not in it are ignored.
        organs: the model's organs; every one gets a label (False when none of its findings is 1).
    """
    rows = _read_csv(path, ("VolumeName",))
    columns = [c for c in (rows[0] if rows else {}) if c != "VolumeName"]
    used = [c for c in columns if c in finding_organs]
    ignored = [c for c in columns if c not in finding_organs]
    if ignored:
        logger.info("labels %s: columns without an organ are ignored: %s", path, ignored)
    out: dict[str, dict[str, bool]] = {}
    for r in rows:
        labels = {o: False for o in organs}
        for c in used:
            value = (r[c] or "").strip()
            if value not in ("0", "1", "0.0", "1.0"):
                raise InputError(f"{path}: volume {r['VolumeName']} has {c}={value!r}; expected 0 or 1")
            if float(value) == 1.0:
                labels[finding_organs[c]] = True
        out[r["VolumeName"]] = labels
    return out


def ctrate_records(
    reports_csv: str | Path,
    desc_info: str | Path,
    conc_info: str | Path,
    image_root: str | Path,
    mask_root: str | Path,
    organs: Sequence[str],
    *,
    labels_csv: str | Path | None = None,
    finding_organs: Mapping[str, str] | None = None,
    layout: Literal["nested", "flat"] = "nested",
    check_files: bool = True,
) -> list[ManifestRecord]:
    """Manifest records for CT-RATE volumes (write them with :func:`visd.training.manifest.write_manifest`).

    Raises:
        InputError: missing columns, malformed files, or (``check_files``) missing volumes/masks.
    """
    reports = read_reports(reports_csv)
    desc, conc = read_organ_reports(desc_info), read_organ_reports(conc_info)
    labels = None
    if labels_csv is not None:
        if finding_organs is None:
            raise InputError("labels_csv needs finding_organs (finding column -> organ), e.g. from config.findings")
        labels = read_labels(labels_csv, finding_organs, organs)
    records, missing, without_text, without_labels = [], [], [], []
    for volume in reports:
        sid = study_id(volume)
        if sid not in desc and sid not in conc:
            without_text.append(sid)
        texts = {o: organ_text(o, conc.get(sid, {}).get(o), desc.get(sid, {}).get(o)) for o in organs}
        organ_labels: dict[str, bool] = {}
        if labels is not None:
            if volume in labels:
                organ_labels = labels[volume]
            else:
                without_labels.append(volume)
        image, mask = volume_path(image_root, volume, layout), volume_path(mask_root, volume, layout)
        if check_files and not (image.exists() and mask.exists()):
            missing.append(str(image if not image.exists() else mask))
            continue
        records.append(make_record(_stem(volume), str(image), str(mask), texts, organ_labels, organs, f"volume {volume}"))
    if missing:
        raise InputError(
            f"{len(missing)} CT-RATE volumes or masks do not exist, e.g. {missing[:3]}. Check image_root, mask_root "
            f"and layout ({layout!r}), or pass check_files=False."
        )
    if without_text:
        logger.warning(
            "%d studies have no organ-split report in %s or %s; fVLM treats all their organs as normal (e.g. %s)",
            len(without_text), os.fspath(desc_info), os.fspath(conc_info), without_text[:3],
        )
    if without_labels:
        logger.warning(
            "%d volumes are not in %s; their labels come from the text (e.g. %s)",
            len(without_labels), labels_csv, without_labels[:3],
        )
    return records
