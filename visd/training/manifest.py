"""Training manifests: one row per scan with its organ mask, per-organ report text and labels.

CSV (one column per organ; organ names are the model's ``config.organs``)::

    id,image,mask,text_lung,label_lung,text_heart,label_heart,...
    case1,ct/case1.nii.gz,masks/case1.nii.gz,"Emphysema.Both lungs show ...",1,,,...

JSONL (one object per line)::

    {"id": "case1", "image": "ct/case1.nii.gz", "mask": "masks/case1.nii.gz",
     "texts": {"lung": "Emphysema.Both lungs ..."}, "labels": {"lung": 1}}

Rules: ``image`` and ``mask`` are required (paths relative to the manifest's folder, or absolute);
``id`` defaults to the row number. An organ without text is normal and gets fVLM's normal sentence
(:func:`visd.training.reports.normal_sentence`). A missing or empty label is derived from the
text (:func:`visd.training.reports.is_abnormal_text`); a given label (0/1) wins. Unknown columns,
keys and organ names are errors.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from visd.errors import InputError, did_you_mean
from visd.training.reports import is_abnormal_text, normal_sentence

__all__ = ["ManifestRecord", "read_manifest", "write_manifest", "make_record"]

logger = logging.getLogger(__name__)

_JSON_KEYS = ("id", "image", "mask", "texts", "labels")


@dataclass(frozen=True)
class ManifestRecord:
    """One training scan.

    Attributes:
        id: the scan's name (for logs).
        image: path of the CT (anything :func:`visd.data.load_case` reads).
        mask: path of its organ mask.
        texts: one report text per organ, in the model's organ order.
        abnormal: per organ, True when the report calls it abnormal.
    """

    id: str
    image: str
    mask: str
    texts: tuple[str, ...]
    abnormal: tuple[bool, ...]


def _label(value: Any, where: str) -> bool | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip() in ("0", "1"):
        return value.strip() == "1"
    raise InputError(
        f"{where}: label {value!r} is not 0 or 1. Use 1 for abnormal, 0 for normal, empty to derive it from the text."
    )


def make_record(
    id: str,
    image: str,
    mask: str,
    texts: dict[str, str | None],
    labels: dict[str, Any],
    organs: Sequence[str],
    where: str = "record",
) -> ManifestRecord:
    """Build a record applying the manifest rules (normal sentence for missing texts, derived labels)."""
    for name in (*texts, *labels):
        if name not in organs:
            raise InputError(
                f"{where}: unknown organ {name!r}; the model's organs are {list(organs)}.{did_you_mean(name, organs)}"
            )
    out_texts, out_labels = [], []
    for organ in organs:
        text = texts.get(organ)
        label = _label(labels.get(organ), f"{where}, organ {organ!r}")
        if text is None or not str(text).strip():
            if label:
                raise InputError(
                    f"{where}: organ {organ!r} is labelled abnormal but has no text. Give its report sentence."
                )
            text = normal_sentence(organ)
        text = str(text)
        out_texts.append(text)
        out_labels.append(is_abnormal_text(organ, text) if label is None else label)
    return ManifestRecord(str(id), str(image), str(mask), tuple(out_texts), tuple(out_labels))


def _path(value: Any, base: Path, where: str, name: str) -> str:
    if value is None or not str(value).strip():
        raise InputError(f"{where}: {name!r} is missing. Every row needs an image and its organ mask.")
    p = Path(str(value))
    return str(p if p.is_absolute() else base / p)


def read_manifest(path: str | os.PathLike, organs: Sequence[str]) -> list[ManifestRecord]:
    """Read a CSV or JSONL manifest (by suffix: ``.csv``, ``.jsonl``/``.json``).

    Raises:
        InputError: unknown columns/keys/organs, a missing image or mask, a label not 0/1.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"manifest {path} does not exist. Write one (docs/training.md) or use visd.training.ctrate.")
    base = path.resolve().parent
    suffix = path.suffix.lower()
    if suffix == ".csv":
        records = _read_csv(path, base, organs)
    elif suffix in (".jsonl", ".json"):
        records = _read_jsonl(path, base, organs)
    else:
        raise InputError(f"manifest {path} has suffix {path.suffix!r}; expected .csv or .jsonl")
    if not records:
        raise InputError(f"manifest {path} has no rows")
    ids = [r.id for r in records]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise InputError(f"manifest {path} repeats ids {dup}; ids must be unique")
    return records


def _read_csv(path: Path, base: Path, organs: Sequence[str]) -> list[ManifestRecord]:
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        allowed = {"id", "image", "mask"} | {f"{k}_{o}" for o in organs for k in ("text", "label")}
        for c in columns:
            if c not in allowed:
                raise InputError(
                    f"manifest {path}: unknown column {c!r}; expected id, image, mask, text_<organ>, label_<organ> "
                    f"with organs {list(organs)}.{did_you_mean(c, sorted(allowed))}"
                )
        for needed in ("image", "mask"):
            if needed not in columns:
                raise InputError(f"manifest {path} has no {needed!r} column; columns are {columns}")
        records = []
        for i, row in enumerate(reader):
            where = f"manifest {path.name} row {i + 1}"
            texts = {o: row.get(f"text_{o}") for o in organs if row.get(f"text_{o}") is not None}
            labels = {o: row.get(f"label_{o}") for o in organs if row.get(f"label_{o}") is not None}
            image = _path(row.get("image"), base, where, "image")
            mask = _path(row.get("mask"), base, where, "mask")
            records.append(make_record(row.get("id") or str(i), image, mask, texts, labels, organs, where))
    return records


def _read_jsonl(path: Path, base: Path, organs: Sequence[str]) -> list[ManifestRecord]:
    records = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        where = f"manifest {path.name} line {i + 1}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{where} is not valid JSON: {e}") from e
        if not isinstance(obj, dict):
            raise InputError(f"{where} holds {type(obj).__name__}, expected an object")
        for key in obj:
            if key not in _JSON_KEYS:
                raise InputError(f"{where}: unknown key {key!r}; expected {list(_JSON_KEYS)}.{did_you_mean(key, _JSON_KEYS)}")
        texts, labels = obj.get("texts") or {}, obj.get("labels") or {}
        if not isinstance(texts, dict) or not isinstance(labels, dict):
            raise InputError(f"{where}: 'texts' and 'labels' must be objects keyed by organ")
        image = _path(obj.get("image"), base, where, "image")
        mask = _path(obj.get("mask"), base, where, "mask")
        records.append(make_record(obj.get("id") or str(i), image, mask, texts, labels, organs, where))
    return records


def write_manifest(records: Sequence[ManifestRecord], path: str | os.PathLike, organs: Sequence[str]) -> Path:
    """Write records as CSV or JSONL (by suffix), with every text and label explicit."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if path.suffix.lower() == ".csv":
        with tmp.open("w", newline="", encoding="utf-8") as f:
            header = ["id", "image", "mask"] + [f"{k}_{o}" for o in organs for k in ("text", "label")]
            writer = csv.writer(f)
            writer.writerow(header)
            for r in records:
                cells: list[Any] = [r.id, r.image, r.mask]
                for t, a in zip(r.texts, r.abnormal):
                    cells += [t, int(a)]
                writer.writerow(cells)
    elif path.suffix.lower() in (".jsonl", ".json"):
        with tmp.open("w", encoding="utf-8") as f:
            for r in records:
                obj = {
                    "id": r.id, "image": r.image, "mask": r.mask,
                    "texts": dict(zip(organs, r.texts)), "labels": {o: int(a) for o, a in zip(organs, r.abnormal)},
                }
                f.write(json.dumps(obj) + "\n")
    else:
        raise InputError(f"manifest {path} has suffix {path.suffix!r}; expected .csv or .jsonl")
    os.replace(tmp, path)
    return path
