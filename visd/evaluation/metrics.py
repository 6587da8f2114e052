"""Per-finding metrics exactly as the official ViSD-Boost / CT-RATE evaluation computes them.

For one finding with scores ``s`` (probabilities) and labels ``y`` (0/1):

* ``auc``: ROC AUC, ties counted one half (identical to ``sklearn.metrics.roc_auc_score``).
* ``auprc``: average precision (identical to ``sklearn.metrics.average_precision_score``).
* ``threshold``: the official operating point. Candidates are ``numpy.linspace(0, 1, 100)``; a scan is
  predicted positive when ``score >= threshold`` (the convention of ``sklearn.metrics.roc_curve``); the
  candidate minimising ``sqrt((1 - TPR)**2 + FPR**2)`` wins, and among equal distances the **higher**
  threshold wins.
* At that threshold: ``accuracy``, ``sensitivity`` (TPR), ``specificity`` (TNR), ``precision`` of the
  positive class (0 when nothing is predicted positive, as sklearn's default ``zero_division``),
  ``f1_weighted`` (per-class F1 weighted by class support, ``f1_score(average="weighted")``) and
  ``f1_macro`` (plain mean of the two class F1s).

Missing scores (NaN): ``missing="skip"`` drops the scan for that finding (official), ``"zero"`` scores it
0 (the fVLM evaluation). A finding whose labels hold one class only gets NaN metrics and a reason.

Everything is computed from *weighted* counts, so one code path serves the point estimate (weights 1)
and a whole batch of bootstrap resamples (weights = how often each scan was drawn).
"""

from __future__ import annotations

import numpy as np

from visd.errors import InputError, did_you_mean

__all__ = [
    "METRICS",
    "MISSING_RULES",
    "THRESHOLDS",
    "finding_metrics",
    "official_threshold",
]

THRESHOLDS = np.linspace(0.0, 1.0, 100)
"""The official candidate thresholds."""

METRICS = (
    "auc",
    "auprc",
    "threshold",
    "accuracy",
    "sensitivity",
    "specificity",
    "precision",
    "f1_weighted",
    "f1_macro",
)
"""Metric names, in report order."""

MISSING_RULES = ("skip", "zero")


def check_missing(missing: str) -> str:
    if missing not in MISSING_RULES:
        raise InputError(
            f"unknown missing-score rule: {missing!r}. Expected one of {list(MISSING_RULES)}."
            f"{did_you_mean(missing, MISSING_RULES)} Use 'skip' (official) or 'zero' (fVLM)."
        )
    return missing


def prepare(scores: np.ndarray, labels: np.ndarray, missing: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate one finding's arrays; return (scores with NaN filled, labels as bool, valid mask)."""
    check_missing(missing)
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    if scores.ndim != 1 or scores.shape != labels.shape:
        raise InputError(
            f"scores and labels must be 1-D of equal length: scores {scores.shape}, labels {labels.shape}. "
            "Pass one finding at a time."
        )
    if not np.isin(labels, (0, 1)).all():
        raise InputError(
            f"labels must be 0 or 1: found {np.unique(labels)[:5].tolist()}. Binarise the labels first."
        )
    missing_mask = np.isnan(scores)
    if missing == "zero":
        scores = np.where(missing_mask, 0.0, scores)
        valid = np.ones(scores.shape, dtype=bool)
    else:
        scores = np.where(missing_mask, 0.0, scores)  # any finite value; these scans get weight 0
        valid = ~missing_mask
    return scores, labels.astype(bool), valid


def weighted_metrics(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> dict[str, np.ndarray]:
    """All :data:`METRICS` for a batch of weightings of the same scans.

    Args:
        scores: (n,) float64, finite.
        labels: (n,) bool.
        weights: (B, n) non-negative; row b counts scan i ``weights[b, i]`` times (0 = left out).

    Returns:
        metric name -> (B,) float64; NaN for a row whose weighted labels hold one class only.
    """
    weights = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    order = np.argsort(scores, kind="stable")
    s = scores[order]
    y = labels[order]
    w = weights[:, order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]]) if s.size else np.zeros(0, dtype=int)
    values = s[starts]
    # (B, U): weight of positives / negatives sharing each distinct score, ascending.
    posw = np.add.reduceat(w * y, starts, axis=1) if s.size else np.zeros((w.shape[0], 0))
    negw = np.add.reduceat(w * ~y, starts, axis=1) if s.size else np.zeros((w.shape[0], 0))
    n_pos = posw.sum(axis=1)
    n_neg = negw.sum(axis=1)
    ok = (n_pos > 0) & (n_neg > 0)
    safe_pos = np.where(ok, n_pos, 1.0)
    safe_neg = np.where(ok, n_neg, 1.0)

    cneg = np.cumsum(negw, axis=1)
    cpos = np.cumsum(posw, axis=1)
    auc = (posw * (cneg - negw + 0.5 * negw)).sum(axis=1) / (safe_pos * safe_neg)

    # Average precision: walk the distinct scores from the top; counts at score >= v.
    tp_ge = n_pos[:, None] - cpos + posw
    fp_ge = n_neg[:, None] - cneg + negw
    denom = tp_ge + fp_ge
    prec_at = np.divide(tp_ge, denom, out=np.zeros_like(tp_ge), where=denom > 0)
    auprc = (posw * prec_at).sum(axis=1) / safe_pos

    # Official threshold: #thresholds <= each distinct score; positive at THRESHOLDS[j] iff j < k.
    k = np.searchsorted(THRESHOLDS, values, side="right")
    below = np.searchsorted(k, np.arange(THRESHOLDS.size), side="right")  # #distinct scores < THRESHOLDS[j]
    cpos0 = np.concatenate([np.zeros((w.shape[0], 1)), cpos], axis=1)
    cneg0 = np.concatenate([np.zeros((w.shape[0], 1)), cneg], axis=1)
    tp = n_pos[:, None] - cpos0[:, below]  # (B, 100)
    fp = n_neg[:, None] - cneg0[:, below]
    tpr = tp / safe_pos[:, None]
    fpr = fp / safe_neg[:, None]
    dist = np.sqrt((1 - tpr) ** 2 + fpr**2)
    j = THRESHOLDS.size - 1 - np.argmin(dist[:, ::-1], axis=1)  # ties -> the higher threshold
    rows = np.arange(w.shape[0])
    tp, fp = tp[rows, j], fp[rows, j]
    fn, tn = n_pos - tp, n_neg - fp
    total = n_pos + n_neg
    safe_total = np.where(total > 0, total, 1.0)
    f1_pos = _ratio(2 * tp, 2 * tp + fp + fn)
    f1_neg = _ratio(2 * tn, 2 * tn + fn + fp)
    out = {
        "auc": auc,
        "auprc": auprc,
        "threshold": THRESHOLDS[j],
        "accuracy": (tp + tn) / safe_total,
        "sensitivity": tp / safe_pos,
        "specificity": tn / safe_neg,
        "precision": _ratio(tp, tp + fp),
        "f1_weighted": (n_pos * f1_pos + n_neg * f1_neg) / safe_total,
        "f1_macro": 0.5 * (f1_pos + f1_neg),
    }
    return {name: np.where(ok, out[name], np.nan) for name in METRICS}


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.divide(num, den, out=np.zeros_like(num, dtype=np.float64), where=den > 0)


def single_class_reason(labels: np.ndarray, valid: np.ndarray) -> str:
    """``""`` when both classes are present among valid scans, else why the metrics are NaN."""
    n_pos = int((labels & valid).sum())
    n_neg = int((~labels & valid).sum())
    if n_pos and n_neg:
        return ""
    if not n_pos and not n_neg:
        return "no scored scans"
    return f"only one class in labels ({n_pos} positive, {n_neg} negative)"


def finding_metrics(scores: np.ndarray, labels: np.ndarray, *, missing: str = "skip") -> dict[str, float | str]:
    """The official metrics of one finding.

    Args:
        scores: (n,) probabilities in [0, 1], NaN where missing.
        labels: (n,) 0/1.
        missing: ``"skip"`` (official) or ``"zero"`` (fVLM); see the module docstring.

    Returns:
        each name of :data:`METRICS` -> float, plus ``n_positive``, ``n_negative``, ``n_missing`` and
        ``reason`` (``""``, or why the metrics are NaN).
    """
    raw = np.asarray(scores, dtype=np.float64)
    s, y, valid = prepare(scores, labels, missing)
    result: dict[str, float | str] = {
        name: float(v[0]) for name, v in weighted_metrics(s, y, valid[None, :].astype(np.float64)).items()
    }
    result.update(
        n_positive=int((y & valid).sum()),
        n_negative=int((~y & valid).sum()),
        n_missing=int(np.isnan(raw).sum()),
        reason=single_class_reason(y, valid),
    )
    return result


def official_threshold(scores: np.ndarray, labels: np.ndarray, *, missing: str = "skip") -> float:
    """The official threshold of one finding (see the module docstring); NaN if one class only."""
    return float(finding_metrics(scores, labels, missing=missing)["threshold"])


def operating_point(scores: np.ndarray, labels: np.ndarray, threshold: float) -> tuple[float, float]:
    """(FPR, TPR) with ``score >= threshold`` predicted positive."""
    pred = scores >= threshold
    return float(pred[~labels].mean()), float(pred[labels].mean())
