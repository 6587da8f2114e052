"""Linear probe: logistic regression on frozen per-organ embeddings, stratified k-fold AUC.

Each finding is predicted from the embedding of its organ only (finding -> organ from ``organ_of``,
falling back to the CT-RATE map of :class:`visd.config.ViSDConfig`). Scans whose organ embedding is NaN
(the organ was not scored) are left out for that finding. The model is ``StandardScaler`` +
``LogisticRegression(C)`` fitted on k-1 folds and scored by ROC AUC on the held-out fold; the report is
the mean and the population standard deviation (``ddof=0``, as ``numpy.std``) over the k folds.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from visd.errors import InputError, did_you_mean

from .embeddings_io import Embeddings, load_embeddings
from .tables import (
    Labels,
    TableSource,
    default_organ_of,
    normalize_scan_id,
    read_labels,
)

__all__ = ["linear_probe"]

logger = logging.getLogger(__name__)


def _resolve_organs(
    emb: Embeddings, label_columns: list[str], organ_of: Mapping[str, str] | None, findings: Sequence[str] | None
) -> dict[str, str]:
    """Finding -> organ for every finding to probe."""
    explicit = dict(organ_of or {})
    for finding, organ in explicit.items():
        if organ not in emb.organs:
            raise InputError(
                f"finding {finding!r} is mapped to organ {organ!r}, which the embedding file lacks. "
                f"Expected one of {list(emb.organs)}.{did_you_mean(organ, emb.organs)}"
            )
    mapping = {f: o for f, o in default_organ_of().items() if o in emb.organs}
    mapping.update(explicit)
    wanted = list(findings) if findings is not None else [c for c in label_columns if c in mapping]
    unknown = [f for f in wanted if f not in label_columns]
    if unknown:
        raise InputError(
            f"finding(s) {unknown[:5]} have no label column. Expected names among {label_columns[:20]}."
            f"{did_you_mean(unknown[0], label_columns)}"
        )
    unmapped = [f for f in wanted if f not in mapping]
    if unmapped:
        raise InputError(
            f"finding(s) {unmapped[:5]} have no organ. Expected a mapping to one of {list(emb.organs)}. "
            "Pass organ_of={finding: organ} (CLI: --organ-of 'FINDING=ORGAN')."
        )
    if not wanted:
        raise InputError(
            f"no label column maps to an organ of the embedding file {list(emb.organs)}: labels "
            f"{label_columns[:10]}. Pass organ_of={{finding: organ}} (CLI: --organ-of 'FINDING=ORGAN')."
        )
    skipped = [c for c in label_columns if c not in wanted]
    if skipped:
        logger.info("label columns not probed (no organ or not requested): %s", skipped)
    return {f: mapping[f] for f in wanted}


def linear_probe(
    embeddings: Embeddings | str | Path,
    labels: Labels | TableSource,
    *,
    organ_of: Mapping[str, str] | None = None,
    findings: Sequence[str] | None = None,
    n_splits: int = 5,
    seed: int = 0,
    C: float = 1.0,
    max_iter: int = 1000,
) -> pd.DataFrame:
    """Per-finding cross-validated AUC of a logistic regression on the finding's organ embedding.

    Args:
        embeddings: an :class:`Embeddings` or the path of an embedding file.
        labels: CT-RATE style label table (path, DataFrame or :class:`Labels`).
        organ_of: finding -> organ; extends/overrides the default CT-RATE map.
        findings: findings to probe (default: every label column with an organ in the file).
        n_splits: folds of ``StratifiedKFold(shuffle=True, random_state=seed)``.
        C, max_iter: passed to ``LogisticRegression``.

    Returns:
        one row per finding (index ``finding``): ``organ, n_scans, n_positive, n_negative, auc_mean,
        auc_std, n_folds, reason`` (NaN AUC with a reason when a class has fewer than ``n_splits`` scans).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if not isinstance(n_splits, (int, np.integer)) or n_splits < 2:
        raise InputError(f"n_splits must be an int >= 2: got {n_splits!r}. Use e.g. 5.")
    emb = embeddings if isinstance(embeddings, Embeddings) else load_embeddings(embeddings)
    lab = (labels if isinstance(labels, Labels) else read_labels(labels)).table
    scan_index = {normalize_scan_id(s): i for i, s in enumerate(emb.scans)}
    if len(scan_index) != len(emb.scans):
        raise InputError(
            "embedding file scan ids repeat after normalisation (folder and .nii.gz/.nii stripped). "
            "Expected one row per scan."
        )
    common = [s for s in lab.index if s in scan_index]
    if not common:
        raise InputError(
            f"no scan of the embedding file matches the labels: embeddings {list(emb.scans[:3])}, labels "
            f"{list(lab.index[:3])}. Expected the same scans. Check that both belong to the same split."
        )
    if len(common) < len(scan_index):
        logger.warning("%d of %d embedded scans have no labels and are ignored", len(scan_index) - len(common), len(scan_index))
    if len(common) < len(lab.index):
        logger.warning("%d of %d labelled scans have no embeddings", len(lab.index) - len(common), len(lab.index))
    rows_idx = np.array([scan_index[s] for s in common])
    organs = _resolve_organs(emb, list(lab.columns), organ_of, findings)

    results = {}
    for finding, organ in organs.items():
        x = emb.organ(organ)[rows_idx].astype(np.float64)
        y = lab.loc[common, finding].to_numpy(dtype=int)
        keep = np.isfinite(x).all(axis=1)
        x, y = x[keep], y[keep]
        n_pos, n_neg = int(y.sum()), int((1 - y).sum())
        row = dict(organ=organ, n_scans=int(keep.sum()), n_positive=n_pos, n_negative=n_neg,
                   auc_mean=np.nan, auc_std=np.nan, n_folds=0, reason="")
        if min(n_pos, n_neg) < n_splits:
            row["reason"] = f"a class has fewer scans than folds ({n_pos} positive, {n_neg} negative, {n_splits} folds)"
            logger.warning("probe %r skipped: %s", finding, row["reason"])
            results[finding] = row
            continue
        aucs = []
        for train, test in StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed).split(x, y):
            model = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter))
            model.fit(x[train], y[train])
            aucs.append(roc_auc_score(y[test], model.predict_proba(x[test])[:, 1]))
        row.update(auc_mean=float(np.mean(aucs)), auc_std=float(np.std(aucs)), n_folds=len(aucs))
        results[finding] = row
    table = pd.DataFrame.from_dict(results, orient="index")
    table.index.name = "finding"
    logger.info("linear probe over %d findings: mean AUC %.4f", len(table), table["auc_mean"].mean())
    return table
