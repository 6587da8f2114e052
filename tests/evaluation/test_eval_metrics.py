"""Per-finding metrics: hand-computed answers, the official threshold rule, sklearn as reference."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from visd.errors import InputError
from visd.evaluation import THRESHOLDS, finding_metrics, official_threshold
from visd.evaluation.metrics import weighted_metrics


def _official_loop(scores, labels):
    """A literal transcription of the official rule: ascending loop, `<=` so ties go to the higher one."""
    best, best_d = None, np.inf
    for t in np.linspace(0, 1, 100):
        pred = scores >= t
        tpr = pred[labels == 1].mean()
        fpr = pred[labels == 0].mean()
        d = np.sqrt((1 - tpr) ** 2 + fpr**2)
        if d <= best_d:
            best, best_d = t, d
    return best


def test_hand_computed_example():
    # Positives 0.35, 0.8; negatives 0.1, 0.4. Distance 0.5 on (0.1, 0.35] (TPR 1, FPR .5) and on
    # (0.4, 0.8] (TPR .5, FPR 0): the tie goes to the higher grid point, 79/99 <= 0.8.
    m = finding_metrics([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
    assert m["auc"] == 0.75
    assert m["auprc"] == pytest.approx(5 / 6)  # (1/2)·1 + (1/2)·(2/3)
    assert m["threshold"] == THRESHOLDS[79] == pytest.approx(79 / 99)
    # At 79/99: TP 1, FP 0, FN 1, TN 2.
    assert m["accuracy"] == 0.75
    assert m["sensitivity"] == 0.5
    assert m["specificity"] == 1.0
    assert m["precision"] == 1.0
    assert m["f1_weighted"] == pytest.approx((2 * (2 / 3) + 2 * 0.8) / 4)
    assert m["f1_macro"] == pytest.approx((2 / 3 + 0.8) / 2)
    assert (m["n_positive"], m["n_negative"], m["n_missing"], m["reason"]) == (2, 2, 0, "")


def test_score_equal_to_threshold_counts_as_positive():
    # Positives sit exactly on grid point 50. With `score >= t`, t = THRESHOLDS[50] is perfect and is the
    # highest perfect candidate; a `score > t` rule would pick THRESHOLDS[49].
    scores = np.array([THRESHOLDS[50], THRESHOLDS[50], THRESHOLDS[20]])
    m = finding_metrics(scores, [1, 1, 0])
    assert m["threshold"] == THRESHOLDS[50]
    assert m["accuracy"] == 1.0 and m["f1_weighted"] == 1.0


def test_unbalanced_weighted_f1_hand_computed():
    # 1 positive (0.9), 3 negatives (0.95, 0.2, 0.1). Best: t in (0.2, 0.9] -> TPR 1, FPR 1/3, highest 89/99.
    m = finding_metrics([0.9, 0.95, 0.2, 0.1], [1, 0, 0, 0])
    assert m["threshold"] == THRESHOLDS[89]
    # TP 1, FP 1, FN 0, TN 2: F1+ = 2/3, F1- = 4/5; weighted (1·2/3 + 3·4/5)/4; macro (2/3 + 4/5)/2.
    assert m["f1_weighted"] == pytest.approx((2 / 3 + 3 * 0.8) / 4)
    assert m["f1_macro"] == pytest.approx((2 / 3 + 0.8) / 2)
    assert m["precision"] == 0.5 and m["accuracy"] == 0.75
    assert m["auc"] == pytest.approx(2 / 3)


def test_missing_skip_versus_zero():
    scores = [0.9, np.nan, 0.2, 0.6]
    labels = [1, 1, 0, 0]
    skip = finding_metrics(scores, labels, missing="skip")
    zero = finding_metrics(scores, labels, missing="zero")
    # skip: positives {0.9}, negatives {0.2, 0.6} -> perfect.
    assert skip["auc"] == 1.0 and skip["accuracy"] == 1.0
    assert (skip["n_positive"], skip["n_negative"], skip["n_missing"]) == (1, 2, 1)
    # zero: positives {0.9, 0.0}: pairs 0.9>0.2, 0.9>0.6, 0<0.2, 0<0.6 -> 0.5; best t in (0.6, 0.9].
    assert zero["auc"] == 0.5
    assert zero["threshold"] == THRESHOLDS[89]
    assert zero["accuracy"] == 0.75 and zero["sensitivity"] == 0.5
    assert (zero["n_positive"], zero["n_negative"], zero["n_missing"]) == (2, 2, 1)


def test_one_class_gives_nan_with_reason():
    m = finding_metrics([0.2, 0.7, 0.4], [0, 0, 0])
    assert all(np.isnan(m[k]) for k in ("auc", "threshold", "accuracy", "f1_weighted"))
    assert "one class" in m["reason"]
    # Skipping the only scored positive leaves one class; scoring it 0 does not.
    assert np.isnan(finding_metrics([0.5, np.nan], [0, 1])["auc"])
    assert finding_metrics([0.5, np.nan], [0, 1], missing="zero")["auc"] == 0.0


def test_unknown_missing_rule_suggests():
    with pytest.raises(InputError, match="Did you mean 'skip'"):
        finding_metrics([0.1, 0.9], [0, 1], missing="skp")


def test_bad_labels_rejected():
    with pytest.raises(InputError, match="0 or 1"):
        finding_metrics([0.1, 0.9], [0, 2])


@pytest.mark.parametrize("trial", range(4))
def test_matches_sklearn_and_official_loop(trial):
    rng = np.random.default_rng(trial)
    for _ in range(30):
        n = int(rng.integers(3, 80))
        y = rng.integers(0, 2, n)
        y[:2] = [0, 1]
        scores = rng.random(n)
        if trial % 2:  # coarse scores: many ties between scans and with grid points
            scores = np.round(scores * rng.choice([3, 10, 99])) / rng.choice([3, 10, 99])
            scores = np.clip(scores, 0, 1)
        m = finding_metrics(scores, y)
        assert m["auc"] == pytest.approx(roc_auc_score(y, scores), abs=1e-12)
        assert m["auprc"] == pytest.approx(average_precision_score(y, scores), abs=1e-12)
        t = _official_loop(scores, y)
        assert m["threshold"] == t
        pred = (scores >= t).astype(int)
        assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
        assert m["sensitivity"] == pytest.approx(recall_score(y, pred))
        assert m["specificity"] == pytest.approx(recall_score(y, pred, pos_label=0))
        assert m["precision"] == pytest.approx(precision_score(y, pred, zero_division=0))
        assert m["f1_weighted"] == pytest.approx(f1_score(y, pred, average="weighted"))
        assert m["f1_macro"] == pytest.approx(f1_score(y, pred, average="macro"))
        assert official_threshold(scores, y) == t


def test_weights_equal_duplicated_scans():
    # A bootstrap resample as weights must equal recomputing on the duplicated scans.
    rng = np.random.default_rng(7)
    scores = np.round(rng.random(30), 2)
    labels = rng.random(30) < 0.4
    labels[:2] = [False, True]
    w = rng.integers(0, 4, size=(5, 30))
    w[:, :2] = 1
    batch = weighted_metrics(scores, labels, w)
    for b in range(5):
        idx = np.repeat(np.arange(30), w[b])
        single = finding_metrics(scores[idx], labels[idx].astype(int))
        for k, v in batch.items():
            assert v[b] == pytest.approx(single[k], abs=1e-12), k
