"""Bootstrap intervals: coverage of a known AUC, real resampling, stratification, paired comparison."""

from __future__ import annotations

import math

import numpy as np
import pytest

from visd.errors import InputError
from visd.evaluation import bootstrap_finding, compare, evaluate, finding_metrics
from visd.evaluation.bootstrap import percentile_interval, stratified_weights, two_sided_p


def _binormal(rng, n_pos, n_neg, d):
    """Sigmoid of N(d, 1) positives and N(0, 1) negatives: AUC = Phi(d / sqrt(2))."""
    x = np.r_[rng.normal(d, 1, n_pos), rng.normal(0, 1, n_neg)]
    return 1 / (1 + np.exp(-x)), np.r_[np.ones(n_pos, int), np.zeros(n_neg, int)]


def test_coverage_and_width_on_binormal_scores():
    d = 1.0
    true_auc = 0.5 * (1 + math.erf(d / math.sqrt(2) / math.sqrt(2)))  # Phi(d / sqrt 2) = 0.7602
    rng = np.random.default_rng(0)
    covered, widths, points = 0, [], []
    reps = 100
    for r in range(reps):
        s, y = _binormal(rng, 50, 70, d)
        low, high = bootstrap_finding(s, y, n_boot=400, seed=r)["auc"]
        covered += low <= true_auc <= high
        widths.append(high - low)
        points.append(finding_metrics(s, y)["auc"])
    coverage = covered / reps
    assert 0.86 <= coverage <= 1.0, coverage
    # The interval width must match the real sampling spread of the AUC over the replications.
    implied_sd = np.mean(widths) / (2 * 1.96)
    ratio = implied_sd / np.std(points, ddof=1)
    assert 0.75 < ratio < 1.3, ratio


def test_resampling_resamples_and_is_seeded():
    rng = np.random.default_rng(3)
    s, y = _binormal(rng, 40, 60, 1.0)
    a = bootstrap_finding(s, y, n_boot=200, seed=1)
    b = bootstrap_finding(s, y, n_boot=200, seed=1)
    c = bootstrap_finding(s, y, n_boot=200, seed=2)
    assert a == b
    assert a["auc"] != c["auc"]
    for k in ("auc", "auprc", "accuracy", "f1_weighted"):
        assert a[k][1] - a[k][0] > 0.01, k
    point = finding_metrics(s, y)["auc"]
    assert a["auc"][0] < point < a["auc"][1]
    g = bootstrap_finding(s, y, n_boot=200, seed=np.random.default_rng(1))
    assert g == a  # an int seed and the Generator it makes draw the same resamples


def test_stratified_weights_keep_class_counts_and_skip_missing():
    labels = np.array([1, 1, 1, 0, 0, 0, 0, 1, 0], bool)
    valid = np.array([1, 1, 1, 1, 1, 1, 1, 0, 0], bool)
    w = stratified_weights(labels, valid, 500, np.random.default_rng(0))
    np.testing.assert_array_equal(w[:, labels & valid].sum(axis=1), 3)
    np.testing.assert_array_equal(w[:, ~labels & valid].sum(axis=1), 4)
    assert (w[:, ~valid] == 0).all()
    # Each valid scan is drawn about as often as its class size implies (3 draws of 3 -> mean 1).
    np.testing.assert_allclose(w[:, valid].mean(axis=0), 1.0, atol=0.15)
    assert (w[:, valid] >= 2).any()  # with replacement


def test_percentile_interval_and_p_value_known_answers():
    assert percentile_interval(np.arange(101.0), 0.9) == pytest.approx((5.0, 95.0))
    assert all(math.isnan(v) for v in percentile_interval(np.array([np.nan])))
    assert two_sided_p(np.array([1.0, 2.0, 3.0])) == 0.5  # 2 * (1 + 0) / 4
    assert two_sided_p(np.ones(999)) == pytest.approx(2 / 1000)
    assert two_sided_p(np.r_[-np.ones(500), np.ones(500)]) == 1.0


def test_evaluate_table_consistent_with_finding_metrics(tables):
    long, _, labels = tables
    ev = evaluate(long, labels, n_bootstrap=100, seed=0)
    t = ev.table
    for j, f in enumerate(ev.data.findings):
        ref = finding_metrics(ev.data.scores[:, j], ev.data.labels[:, j])
        for k in ("auc", "threshold", "f1_weighted", "precision"):
            assert t.loc[f, k] == pytest.approx(ref[k])
        assert t.loc[f, "auc_low"] < t.loc[f, "auc"] < t.loc[f, "auc_high"]
    findings = t[t["kind"] == "finding"]
    assert t.loc["overall mean", "auc"] == pytest.approx(findings["auc"].mean())
    assert t.loc["lung mean", "f1_weighted"] == pytest.approx(findings.loc[["Emphysema", "Lung nodule"], "f1_weighted"].mean())
    assert t.loc["overall mean", "n_findings"] == 4
    assert math.isnan(t.loc["overall mean", "threshold"])
    # A single-finding organ's mean is that finding, interval included.
    assert tuple(t.loc["heart mean", ["auc", "auc_low", "auc_high"]]) == tuple(t.loc["Cardiomegaly", ["auc", "auc_low", "auc_high"]])


def test_mean_interval_keeps_correlation_between_findings(table_factory, rng):
    # Four identical copies of one finding: their mean is that finding, so its interval must not shrink
    # by 1/sqrt(4) as it would if each finding were resampled independently.
    _, wide, labels = table_factory(rng, n=150, missing_frac=0.0)
    for k in range(3):
        wide[f"Copy {k}"] = wide["Emphysema"]
        labels[f"Copy {k}"] = labels["Emphysema"]
    wide = wide[["scan", "Emphysema", "Copy 0", "Copy 1", "Copy 2"]]
    t = evaluate(wide, labels, n_bootstrap=400, seed=0, organ_of={f"Copy {k}": "lung" for k in range(3)}).table
    finding_width = t.loc["Emphysema", "auc_high"] - t.loc["Emphysema", "auc_low"]
    mean_width = t.loc["overall mean", "auc_high"] - t.loc["overall mean", "auc_low"]
    assert mean_width > 0.8 * finding_width


def test_single_class_finding_is_nan_not_crash(tables, caplog):
    long, _, labels = tables
    labels["Hiatal hernia"] = 0
    ev = evaluate(long, labels, n_bootstrap=50, seed=0)
    row = ev.table.loc["Hiatal hernia"]
    assert math.isnan(row["auc"]) and "one class" in row["reason"]
    assert ev.table.loc["overall mean", "n_findings"] == 3
    assert math.isnan(ev.table.loc["esophagus mean", "auc"])
    assert "Hiatal hernia" in caplog.text


def test_missing_zero_changes_numbers(tables):
    long, _, labels = tables
    skip = evaluate(long, labels, missing="skip", n_bootstrap=0).table
    zero = evaluate(long, labels, missing="zero", n_bootstrap=0).table
    assert (zero.loc["Emphysema", "n_scans"] > skip.loc["Emphysema", "n_scans"])
    assert skip.loc["Emphysema", "auc"] != zero.loc["Emphysema", "auc"]
    assert math.isnan(skip.loc["Emphysema", "auc_low"])  # no bootstrap, no interval
    with pytest.raises(InputError, match="Did you mean 'zero'"):
        evaluate(long, labels, missing="zeros")


def test_compare_identical_tables(tables):
    long, _, labels = tables
    t = compare(long, long, labels, n_bootstrap=100, seed=0).table
    assert (t["diff"] == 0).all() and (t["diff_low"] == 0).all() and (t["diff_high"] == 0).all()
    assert (t["p_value"] == 1.0).all()


def test_compare_is_paired_and_detects_a_better_model(table_factory, rng):
    long, wide, labels = table_factory(rng, n=200, missing_frac=0.0)
    noisy = wide.copy()
    cols = list(noisy.columns[1:])
    noisy[cols] = np.clip(noisy[cols] + rng.normal(0, 0.03, noisy[cols].shape), 0, 1)
    ev = evaluate(wide, labels, n_bootstrap=300, seed=0).table
    paired = compare(wide, noisy, labels, n_bootstrap=300, seed=0).table
    for f in cols:
        auc_width = ev.loc[f, "auc_high"] - ev.loc[f, "auc_low"]
        assert paired.loc[f, "diff_high"] - paired.loc[f, "diff_low"] < 0.5 * auc_width
    worse = wide.copy()
    worse[cols] = rng.random(worse[cols].shape)  # an uninformative model
    t = compare(wide, worse, labels, n_bootstrap=300, seed=0).table
    assert (t["diff"] > 0.15).all()
    assert (t["diff_low"] > 0).all()
    assert (t["p_value"] < 0.01).all()
    assert t.loc["overall mean", "diff"] == pytest.approx(t.loc["overall mean", "auc_a"] - t.loc["overall mean", "auc_b"])


def test_compare_skip_uses_scans_scored_by_both(tables):
    long, wide, labels = tables
    other = wide.copy()
    other.loc[:9, "Emphysema"] = np.nan
    t = compare(wide, other, labels, n_bootstrap=0).table
    both = wide["Emphysema"].notna() & other["Emphysema"].notna()
    assert t.loc["Emphysema", "n_scans"] == both.sum()
    assert t.loc["Emphysema", "auc_a"] == pytest.approx(
        finding_metrics(wide.loc[both, "Emphysema"], labels.loc[both, "Emphysema"])["auc"]
    )
