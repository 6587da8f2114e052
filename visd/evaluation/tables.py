"""Reading prediction and label tables and lining them up scan by scan, finding by finding.

Predictions come in one of two shapes:

* **long** (what ``visd`` writes): columns ``scan, organ, finding, probability, status``; one row per
  (scan, finding); ``status`` is ``"scored"`` or the reason the cell was not scored, and unscored rows
  have a NaN probability. ``organ`` and ``status`` are optional.
* **wide**: one row per scan, a ``VolumeName`` (or ``scan``) column and one probability column per
  finding, NaN where a score is missing.

Labels are in CT-RATE format: ``VolumeName`` (or ``scan``) plus one 0/1 column per finding; label
columns that no prediction refers to (CT-RATE has 18, the chest model scores 16) are ignored.

Scan ids are matched after :func:`normalize_scan_id` (folder and ``.nii.gz``/``.nii``/... stripped).
Finding names are matched exactly, then ignoring case, ``_``/``-`` and repeated spaces.
"""

from __future__ import annotations

import difflib
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from visd.errors import InputError, did_you_mean

__all__ = [
    "AlignedData",
    "Labels",
    "Predictions",
    "align",
    "default_organ_of",
    "normalize_scan_id",
    "read_labels",
    "read_predictions",
]

logger = logging.getLogger(__name__)

_SCAN_COLUMNS = ("VolumeName", "scan")
_LONG_COLUMNS = ("scan", "finding", "probability")
_EXTENSIONS = (".nii.gz", ".nii", ".npz", ".npy", ".nrrd", ".mha", ".mhd")
OTHER_ORGAN = "other"

TableSource = str | Path | pd.DataFrame


def normalize_scan_id(scan: object) -> str:
    """The matching key of a scan id: folder and image extension stripped.

    ``"valid/valid_1/valid_1_a/valid_1_a_1.nii.gz"``, ``"valid_1_a_1.nii"`` and ``"valid_1_a_1"`` all
    give ``"valid_1_a_1"``. Case is kept (ids are case-sensitive elsewhere too).
    """
    text = str(scan).strip()
    text = re.split(r"[\\/]", text)[-1]
    lower = text.lower()
    for ext in _EXTENSIONS:
        if lower.endswith(ext) and len(text) > len(ext):
            return text[: -len(ext)]
    return text


def _finding_key(name: str) -> str:
    return " ".join(re.sub(r"[_\-]", " ", str(name)).casefold().split())


@dataclass(frozen=True)
class Predictions:
    """Scores read from a prediction table.

    ``scores``: one row per scan (index: normalised scan id), one float column per finding, NaN where
    missing. ``organ_of``: finding -> organ, only where the table said so (long format with ``organ``).
    """

    scores: pd.DataFrame
    organ_of: dict[str, str]


@dataclass(frozen=True)
class Labels:
    """Labels read from a CT-RATE style table: index normalised scan id, one int8 0/1 column per finding."""

    table: pd.DataFrame


@dataclass(frozen=True)
class AlignedData:
    """Predictions and labels on the same scans and findings.

    ``scores`` (n_scans, n_findings) float64, NaN where missing; ``labels`` (n_scans, n_findings) int8 0/1.
    ``findings`` use the label table's spelling; ``organs[j]`` is the organ of ``findings[j]``.
    """

    scans: tuple[str, ...]
    findings: tuple[str, ...]
    organs: tuple[str, ...]
    scores: np.ndarray
    labels: np.ndarray


def _read_table(source: TableSource, what: str) -> pd.DataFrame:
    if isinstance(source, pd.DataFrame):
        return source.copy()
    path = Path(source)
    if not path.is_file():
        raise InputError(f"{what} file not found: {str(path)!r}. Expected a CSV file; check the path.")
    try:
        return pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read {what} file {str(path)!r}: {e}. Expected a CSV file with a header row.") from e


def _scan_column(df: pd.DataFrame, what: str) -> str:
    for name in _SCAN_COLUMNS:
        if name in df.columns:
            return name
    cols = list(map(str, df.columns))
    close = difflib.get_close_matches("VolumeName", cols, n=1, cutoff=0.6) or difflib.get_close_matches(
        "scan", [c.lower() for c in cols], n=1, cutoff=0.6
    )
    hint = f" Is {close[0]!r} the scan column?" if close else ""
    raise InputError(
        f"{what} table has no scan id column: columns {cols[:8]}{'...' if len(cols) > 8 else ''}. "
        f"Expected a 'VolumeName' or 'scan' column.{hint} Rename the column holding the scan ids."
    )


def _normalized_index(values: pd.Series, what: str) -> pd.Index:
    ids = [normalize_scan_id(v) for v in values]
    index = pd.Index(ids, name="scan")
    dup = index[index.duplicated()].unique()
    if len(dup):
        raise InputError(
            f"{what} table lists {len(dup)} scan(s) more than once after normalising ids: {list(dup[:5])}. "
            "Expected one row per scan (ids are compared without folder and .nii.gz/.nii extension). "
            "Remove the duplicate rows."
        )
    return index


def _as_float(df: pd.DataFrame, what: str) -> pd.DataFrame:
    bad = [c for c in df.columns if not pd.api.types.is_numeric_dtype(df[c]) and not df[c].isna().all()]
    if bad:
        raise InputError(
            f"{what} table has non-numeric column(s) {bad[:5]}. Expected one numeric probability column "
            "per finding besides the scan id column. Drop the other columns."
        )
    return df.astype(np.float64)


def _check_probabilities(scores: pd.DataFrame) -> None:
    values = scores.to_numpy()
    bad = np.isfinite(values) & ((values < 0.0) | (values > 1.0))
    if bad.any():
        col = scores.columns[np.flatnonzero(bad.any(axis=0))[0]]
        value = values[bad][0]
        raise InputError(
            f"prediction for {col!r} is outside [0, 1]: {value!r}. Expected probabilities, because the "
            "official threshold is chosen from linspace(0, 1, 100). Apply a sigmoid/softmax to logits first."
        )
    if np.isinf(values).any():
        raise InputError("prediction table holds infinite values. Expected probabilities in [0, 1] or NaN.")


def read_predictions(source: TableSource) -> Predictions:
    """Read a long (visd results) or wide prediction table; see the module docstring for the formats."""
    df = _read_table(source, "predictions")
    if all(c in df.columns for c in _LONG_COLUMNS):
        out = _read_long(df)
    else:
        scan_col = _scan_column(df, "predictions")
        scores = _as_float(df.drop(columns=[scan_col]), "predictions (wide)")
        scores.index = _normalized_index(df[scan_col], "predictions")
        scores.columns = [str(c) for c in scores.columns]
        if scores.shape[1] == 0:
            raise InputError(
                "predictions table has a scan column but no finding columns. Expected one probability column "
                "per finding (wide) or the columns scan, finding, probability, status (long)."
            )
        out = Predictions(scores=scores, organ_of={})
    _check_probabilities(out.scores)
    return out


def _read_long(df: pd.DataFrame) -> Predictions:
    df = df.copy()
    df["scan"] = [normalize_scan_id(v) for v in df["scan"]]
    df["finding"] = df["finding"].astype(str)
    if not pd.api.types.is_numeric_dtype(df["probability"]):
        try:
            df["probability"] = pd.to_numeric(df["probability"])
        except (ValueError, TypeError) as e:
            raise InputError(
                f"predictions column 'probability' is not numeric: {e}. Expected probabilities in [0, 1] or empty."
            ) from e
    prob = df["probability"].astype(np.float64)
    if "status" in df.columns:
        unscored = df["status"].astype(str) != "scored"
        dropped = int((unscored & prob.notna()).sum())
        if dropped:
            logger.warning("%d prediction rows have a probability but status != 'scored'; treated as missing", dropped)
        prob = prob.where(~unscored)
        n_scored_nan = int((~unscored & prob.isna()).sum())
        if n_scored_nan:
            raise InputError(
                f"{n_scored_nan} prediction rows have status 'scored' but no probability "
                f"(first: scan {df.loc[~unscored & prob.isna(), 'scan'].iloc[0]!r}). Expected a number for every "
                "scored row. Re-export the results or set their status to the reason they were not scored."
            )
    df["probability"] = prob
    dup = df.duplicated(subset=["scan", "finding"], keep=False)
    if dup.any():
        first = df.loc[dup, ["scan", "finding"]].iloc[0].tolist()
        raise InputError(
            f"predictions list {int(dup.sum())} rows for repeated (scan, finding) pairs, first {first}. "
            "Expected one row per scan and finding (ids compared without extension). Remove the duplicates."
        )
    organ_of: dict[str, str] = {}
    if "organ" in df.columns:
        organs = df[["finding", "organ"]].drop_duplicates()
        clash = organs[organs["finding"].duplicated(keep=False)]
        if len(clash):
            name = clash["finding"].iloc[0]
            raise InputError(
                f"finding {name!r} is listed under several organs: {sorted(map(str, clash.loc[clash['finding'] == name, 'organ']))}. "
                "Expected one organ per finding. Fix the 'organ' column."
            )
        organ_of = {str(f): str(o) for f, o in zip(organs["finding"], organs["organ"])}
    findings = list(dict.fromkeys(df["finding"]))
    wide = df.pivot(index="scan", columns="finding", values="probability")
    scans = list(dict.fromkeys(df["scan"]))
    wide = wide.reindex(index=pd.Index(scans, name="scan"), columns=findings).astype(np.float64)
    wide.columns.name = None
    return Predictions(scores=wide, organ_of=organ_of)


def read_labels(source: TableSource) -> Labels:
    """Read a CT-RATE style label table (``VolumeName`` or ``scan`` + one 0/1 column per finding)."""
    df = _read_table(source, "labels")
    scan_col = _scan_column(df, "labels")
    labels = df.drop(columns=[scan_col])
    labels.index = _normalized_index(df[scan_col], "labels")
    labels.columns = [str(c) for c in labels.columns]
    for col in labels.columns:
        values = pd.to_numeric(labels[col], errors="coerce")
        ok = values.isin([0, 1])
        if not ok.all():
            bad = labels[col][~ok].iloc[0]
            raise InputError(
                f"label column {col!r} holds {bad!r} for scan {labels.index[~ok.to_numpy()][0]!r}. "
                "Expected 0 or 1 for every scan. Fill or drop unlabelled scans before evaluating."
            )
        labels[col] = values.astype(np.int8)
    return Labels(table=labels)


def default_organ_of() -> dict[str, str]:
    """Finding -> organ of the released CT-RATE chest model (from :class:`visd.config.ViSDConfig`)."""
    from visd.config import ViSDConfig

    return {f.name: f.organ for f in ViSDConfig().findings}


def _match_findings(pred_findings: list[str], label_findings: list[str]) -> dict[str, str]:
    """Prediction finding name -> label column name."""
    by_key: dict[str, str] = {}
    for name in label_findings:
        by_key.setdefault(_finding_key(name), name)
    mapping, unknown = {}, []
    for name in pred_findings:
        if name in label_findings:
            mapping[name] = name
        elif _finding_key(name) in by_key:
            mapping[name] = by_key[_finding_key(name)]
        else:
            unknown.append(name)
    if unknown:
        hint = did_you_mean(unknown[0], label_findings)
        raise InputError(
            f"{len(unknown)} predicted finding(s) have no label column: {unknown[:5]}. Expected names among "
            f"the label columns {label_findings[:20]}.{hint} Rename the finding or add its labels."
        )
    return mapping


def align(
    predictions: Predictions | TableSource,
    labels: Labels | TableSource,
    *,
    organ_of: Mapping[str, str] | None = None,
) -> AlignedData:
    """Line up predictions and labels on the scans present in both, for every predicted finding.

    ``organ_of`` (finding -> organ) overrides the organ given by a long prediction table; findings
    without an organ from either source take the default CT-RATE map, else ``"other"``.
    Raises :class:`InputError` when no scan or a finding cannot be matched; partial scan coverage is
    logged as a warning with counts.
    """
    pred = predictions if isinstance(predictions, Predictions) else read_predictions(predictions)
    lab = (labels if isinstance(labels, Labels) else read_labels(labels)).table
    mapping = _match_findings(list(pred.scores.columns), list(lab.columns))
    targets = list(mapping.values())
    if len(set(targets)) != len(targets):
        raise InputError(
            f"several predicted findings match the same label column: {mapping}. Expected one prediction "
            "column per finding. Rename or drop the duplicates."
        )
    predicted = set(pred.scores.index)
    common = [s for s in lab.index if s in predicted]
    if not common:
        raise InputError(
            f"no scan id of the predictions matches the labels: predictions {list(pred.scores.index[:3])}, "
            f"labels {list(lab.index[:3])}. Expected the same scans (ids are compared without folder and "
            ".nii.gz/.nii). Check that both files belong to the same split."
        )
    n_pred_only = len(pred.scores.index) - len(common)
    n_lab_only = len(lab.index) - len(common)
    if n_pred_only:
        logger.warning(
            "%d of %d predicted scans have no labels and are ignored", n_pred_only, len(pred.scores.index)
        )
    if n_lab_only:
        logger.warning(
            "%d of %d labelled scans have no predictions and are not evaluated", n_lab_only, len(lab.index)
        )
    unused = [c for c in lab.columns if c not in set(targets)]
    if unused:
        logger.info("label columns without predictions (not evaluated): %s", unused)

    defaults = default_organ_of()
    organs = []
    for pname, lname in mapping.items():
        organ = None
        for source in (organ_of or {}, pred.organ_of, defaults):
            organ = source.get(pname) or source.get(lname)
            if organ:
                break
        organs.append(str(organ) if organ else OTHER_ORGAN)
    scores = pred.scores.loc[common, list(mapping)].to_numpy(dtype=np.float64)
    y = lab.loc[common, targets].to_numpy(dtype=np.int8)
    return AlignedData(
        scans=tuple(common), findings=tuple(targets), organs=tuple(organs), scores=scores, labels=y
    )
