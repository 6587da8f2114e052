"""Retrieval metrics: hand-computed answers, sklearn's average precision, the DataFrame path, bad input."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from visd.errors import InputError
from visd.evaluation import retrieval_metrics

# 5 scans x 3 findings. A: ranks s0(rel) s2 s4 s3(rel) s1; B: s2 s4 s3 s1(rel) s0(rel, NaN -> last);
# C: no relevant scan.
SCORES = np.array(
    [[0.9, np.nan, 0.5], [0.1, 0.2, 0.4], [0.8, 0.7, 0.3], [0.3, 0.4, 0.2], [0.5, 0.6, 0.1]]
)
LABELS = np.array([[1, 1, 0], [0, 1, 0], [0, 0, 0], [1, 0, 0], [0, 0, 0]])


def test_known_answers():
    result = retrieval_metrics(SCORES, LABELS, ["A", "B", "C"], ks=(1, 2, 4, 10))
    t = result.per_finding
    assert t.loc["A", "recall@1"] == 0.5 and t.loc["A", "recall@2"] == 0.5 and t.loc["A", "recall@4"] == 1.0
    assert t.loc["A", "precision@1"] == 1.0 and t.loc["A", "precision@4"] == 0.5
    assert t.loc["A", "precision@10"] == pytest.approx(2 / 10)  # missing ranks count as not relevant
    assert t.loc["A", "ap"] == pytest.approx((1 / 1 + 2 / 4) / 2)
    assert t.loc["B", "recall@4"] == 0.5 and t.loc["B", "recall@10"] == 1.0
    assert t.loc["B", "ap"] == pytest.approx((1 / 4 + 2 / 5) / 2)
    assert np.isnan(t.loc["C", "ap"]) and t.loc["C", "n_relevant"] == 0
    assert t["n_relevant"].tolist() == [2, 2, 0]
    assert result.summary["map"] == pytest.approx((0.75 + 0.325) / 2)
    assert result.summary["recall@1"] == pytest.approx(0.25)


def test_ties_keep_table_order():
    scores = np.array([[0.5], [0.5], [0.5]])
    t = retrieval_metrics(scores, np.array([[0], [0], [1]]), ["A"], ks=(1,)).per_finding
    assert t.loc["A", "ap"] == pytest.approx(1 / 3)  # the relevant scan is third of three equal scores


def test_average_precision_equals_sklearn_without_ties():
    import sklearn.metrics as sklearn
    rng = np.random.default_rng(0)
    scores = rng.random((200, 6))
    labels = (rng.random((200, 6)) < 0.2).astype(int)
    labels[0] = 1
    t = retrieval_metrics(scores, labels, ks=(10,)).per_finding
    expected = [sklearn.average_precision_score(labels[:, j], scores[:, j]) for j in range(6)]
    np.testing.assert_allclose(t["ap"].to_numpy(), expected, rtol=1e-12)
    top10 = np.argsort(-scores, axis=0)[:10]
    hits = np.take_along_axis(labels, top10, axis=0).sum(axis=0)
    np.testing.assert_allclose(t["recall@10"].to_numpy(), hits / labels.sum(axis=0))


def test_dataframes_are_aligned_by_scan_and_finding():
    scans = [f"s{i}" for i in range(5)]
    scores = pd.DataFrame(SCORES[:, :2], index=scans, columns=["A", "B"])
    labels = pd.DataFrame(LABELS[:, :2], index=scans, columns=["A", "B"]).iloc[::-1][["B", "A"]]
    labels["extra"] = 1
    t = retrieval_metrics(scores, labels, ks=(1,)).per_finding
    assert t.loc["A", "ap"] == pytest.approx(0.75) and t.loc["B", "ap"] == pytest.approx(0.325)


@pytest.mark.parametrize(
    "scores, labels, ks, words",
    [
        (SCORES, LABELS[:4], (1,), "equal shape"),
        (SCORES, LABELS * 2, (1,), "0 or 1"),
        (SCORES, LABELS, (0,), "integers >= 1"),
    ],
)
def test_bad_input(scores, labels, ks, words):
    with pytest.raises(InputError, match=words):
        retrieval_metrics(scores, labels, ks=ks)


def test_a_diagnose_table_against_a_ct_rate_label_table(tmp_path):
    from visd.evaluation import read_labels, read_predictions

    from .conftest import make_tables

    import sklearn.metrics as sklearn
    long, _, labels = make_tables(np.random.default_rng(7), n=80, missing_frac=0.0)
    long.to_csv(tmp_path / "results.csv", index=False)
    labels.to_csv(tmp_path / "labels.csv", index=False)
    scores, table = read_predictions(tmp_path / "results.csv").scores, read_labels(tmp_path / "labels.csv").table
    result = retrieval_metrics(scores, table)
    assert list(result.per_finding.index) == list(scores.columns)  # the label-only column is not a query
    for finding in scores.columns:
        y = table.loc[scores.index, finding].to_numpy()
        expected = sklearn.average_precision_score(y, scores[finding].to_numpy())
        assert result.per_finding.loc[finding, "ap"] == pytest.approx(expected, rel=1e-12)
