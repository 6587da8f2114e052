"""Text->scan retrieval metrics against the label table, as CT-CLIP reports retrieval.

Each finding is one query. Its scores rank the scans (highest first; equal scores keep table order,
as :func:`visd.retrieval.search` returns them); a scan is *relevant* to the finding when its label is 1.
With ``R`` relevant scans and ``rel_i`` = 1 when the scan at rank ``i`` (1-based) is relevant:

* ``recall@k`` = (relevant scans among the first ``k``) / ``R``;
* ``precision@k`` = (relevant scans among the first ``k``) / ``k`` (``k`` larger than the number of
  ranked scans counts the missing ranks as not relevant);
* ``ap`` (average precision) = mean over the relevant scans of the precision at their rank,
  ``sum_i rel_i * precision@i / R``; ``map`` is its mean over the findings.

Missing scores (NaN) rank last, so a scan that was not scored is never retrieved ahead of a scored one.
A finding with no relevant scan gets NaN (it cannot be retrieved) and is left out of the means.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from visd.errors import InputError

__all__ = ["DEFAULT_KS", "RetrievalResult", "retrieval_metrics"]

DEFAULT_KS = (5, 10, 50, 100)
"""The cut-offs reported by default: those of CT-CLIP's report-to-volume retrieval."""


@dataclass(frozen=True)
class RetrievalResult:
    """Per-finding retrieval metrics and their means.

    ``per_finding``: one row per finding (index: finding names) with columns ``recall@k`` and
    ``precision@k`` for each k, ``ap`` and ``n_relevant``; ``summary``: the mean of each column over the
    findings that have a relevant scan, with ``ap`` named ``map``.
    """

    per_finding: pd.DataFrame
    summary: dict[str, float]


def _check(scores: np.ndarray, labels: np.ndarray, findings: Sequence[str], ks: Sequence[int]) -> None:
    if scores.ndim != 2 or scores.shape != labels.shape:
        raise InputError(
            f"scores and labels must be 2-D (N_scans, N_findings) of equal shape: scores {scores.shape}, "
            f"labels {labels.shape}. Pass one column per finding, scans in the same order."
        )
    if len(findings) != scores.shape[1]:
        raise InputError(
            f"got {len(findings)} finding names for {scores.shape[1]} score columns. Expected one name per column."
        )
    if not np.isin(labels, (0, 1)).all():
        raise InputError(f"labels must be 0 or 1: found {np.unique(labels)[:5].tolist()}. Binarise the labels first.")
    bad = [k for k in ks if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1]
    if bad or not ks:
        raise InputError(f"cut-offs k must be integers >= 1: got {list(ks)}. Use e.g. ks=(5, 10, 50, 100).")


def _ranks(scores: np.ndarray) -> np.ndarray:
    """Scan order per column: highest score first, ties in table order, NaN last."""
    key = np.where(np.isnan(scores), np.inf, -scores)
    return np.argsort(key, axis=0, kind="stable")


def retrieval_metrics(
    scores, labels, findings: Sequence[str] | None = None, *, ks: Sequence[int] = DEFAULT_KS
) -> RetrievalResult:
    """Recall@k, precision@k and average precision of text->scan retrieval, one query per finding.

    Args:
        scores: (N_scans, N_findings) similarity or probability of each scan for each finding's query
            (e.g. the ``probability`` column of ``visd diagnose`` pivoted to one column per finding), or a
            DataFrame with scans as index and findings as columns; NaN where a scan was not scored.
        labels: same shape, 1 when the scan has the finding, else 0 (a DataFrame is aligned to
            ``scores`` by scan and finding).
        findings: the names of the columns (default: the DataFrame columns, else ``finding_<j>``).
        ks: the cut-offs ``k`` of recall@k and precision@k.

    Returns:
        A :class:`RetrievalResult`; see the module docstring for the definitions.
    """
    if isinstance(scores, pd.DataFrame):
        if isinstance(labels, pd.DataFrame):
            missing = [c for c in scores.columns if c not in labels.columns]
            absent = [s for s in scores.index if s not in labels.index]
            if missing or absent:
                raise InputError(
                    f"the label table lacks findings {missing[:5]} / scans {absent[:5]} of the scores. "
                    "Expected a label for every scored scan and finding."
                )
            labels = labels.loc[scores.index, scores.columns]
        findings = list(map(str, scores.columns)) if findings is None else list(findings)
        scores = scores.to_numpy(dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    if findings is None:
        findings = [f"finding_{j}" for j in range(scores.shape[1] if scores.ndim == 2 else 0)]
    ks = tuple(ks)
    _check(scores, labels, list(findings), ks)
    order = _ranks(scores)
    rel = np.take_along_axis(labels.astype(bool), order, axis=0)  # (N, F): relevance at each rank
    n_rel = rel.sum(axis=0)
    hits = np.cumsum(rel, axis=0)  # relevant among the first i + 1
    n = scores.shape[0]
    columns: dict[str, np.ndarray] = {}
    safe = np.where(n_rel > 0, n_rel, 1)
    for k in ks:
        at = hits[min(k, n) - 1] if n else np.zeros(scores.shape[1])
        columns[f"recall@{k}"] = np.where(n_rel > 0, at / safe, np.nan)
        columns[f"precision@{k}"] = np.where(n_rel > 0, at / k, np.nan)
    precision_at = hits / np.arange(1, n + 1)[:, None]
    columns["ap"] = np.where(n_rel > 0, (precision_at * rel).sum(axis=0) / safe, np.nan)
    table = pd.DataFrame(columns, index=pd.Index(list(findings), name="finding"))
    table["n_relevant"] = n_rel.astype(int)
    summary = {name: float(np.nanmean(table[name])) if (n_rel > 0).any() else float("nan") for name in columns}
    summary["map"] = summary.pop("ap")
    return RetrievalResult(per_finding=table, summary=summary)
