"""Reading and aligning prediction and label tables."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest

from visd.errors import InputError
from visd.evaluation import read_labels, read_predictions
from visd.evaluation.tables import align, normalize_scan_id


@pytest.mark.parametrize(
    "raw",
    ["valid_1_a_1", "valid_1_a_1.nii.gz", "valid_1_a_1.NII.GZ", "valid_1_a_1.nii", " valid_1_a_1.npz ",
     "valid/valid_1/valid_1_a/valid_1_a_1.nii.gz", r"C:\data\valid_1_a_1.nii.gz"],
)
def test_normalize_scan_id(raw):
    assert normalize_scan_id(raw) == "valid_1_a_1"


def test_long_and_wide_give_the_same_aligned_data(tables):
    long, wide, labels = tables
    a = align(long, labels)
    b = align(wide, labels)
    assert a.scans == b.scans and a.findings == b.findings
    np.testing.assert_array_equal(a.scores, b.scores)  # NaN positions included
    np.testing.assert_array_equal(a.labels, labels[list(a.findings)].to_numpy())
    assert a.organs == ("lung", "lung", "heart", "esophagus")  # from the table / the default CT-RATE map
    assert np.isnan(a.scores).sum() == long["probability"].isna().sum()


def test_status_not_scored_means_missing():
    long = pd.DataFrame(dict(scan=["a", "b", "c"], organ="lung", finding="Emphysema",
                             probability=[0.2, 0.9, 0.5], status=["scored", "scored", "cropped"]))
    pred = read_predictions(long)
    assert pred.scores.loc["c", "Emphysema"] != pred.scores.loc["c", "Emphysema"]  # NaN
    assert pred.scores.loc["b", "Emphysema"] == 0.9
    assert pred.organ_of == {"Emphysema": "lung"}


def test_scored_row_without_probability_is_an_error():
    long = pd.DataFrame(dict(scan=["a"], organ="lung", finding="Emphysema", probability=[np.nan], status=["scored"]))
    with pytest.raises(InputError, match="status 'scored' but no probability"):
        read_predictions(long)


def test_finding_names_match_ignoring_case_and_underscores(tables):
    _, wide, labels = tables
    data = align(wide.rename(columns={"Lung nodule": "lung_nodule"}), labels)
    assert "Lung nodule" in data.findings


def test_unknown_finding_suggests_a_label_column(tables):
    _, wide, labels = tables
    with pytest.raises(InputError, match="Did you mean 'Emphysema'"):
        align(wide.rename(columns={"Emphysema": "Emphysma"}), labels)


def test_no_common_scan_is_an_error(tables):
    _, wide, labels = tables
    wide = wide.assign(scan="test_" + wide["scan"])
    with pytest.raises(InputError, match="no scan id"):
        align(wide, labels)


def test_partial_coverage_warns_with_counts(tables, caplog):
    _, wide, labels = tables
    caplog.set_level(logging.WARNING, logger="visd.evaluation.tables")
    data = align(wide.iloc[:100], labels.iloc[10:])
    assert len(data.scans) == 90
    text = caplog.text
    assert "10 of 100 predicted scans have no labels" in text
    assert "20 of 110 labelled scans have no predictions" in text


def test_duplicate_scan_after_normalisation(tables):
    _, wide, labels = tables
    dup = pd.concat([wide.iloc[:3], wide.iloc[:1].assign(scan=wide["scan"].iloc[0] + ".nii.gz")])
    with pytest.raises(InputError, match="more than once"):
        read_predictions(dup)


def test_probabilities_outside_unit_interval(tables):
    _, wide, _ = tables
    wide.loc[0, "Emphysema"] = 2.5
    with pytest.raises(InputError, match="outside \\[0, 1\\].*2.5"):
        read_predictions(wide)


def test_labels_must_be_binary(tables):
    _, _, labels = tables
    labels.loc[5, "Emphysema"] = -1
    with pytest.raises(InputError, match="Expected 0 or 1"):
        read_labels(labels)


def test_missing_scan_column_suggests(tables):
    _, wide, labels = tables
    with pytest.raises(InputError, match="Is 'VolumeNames' the scan column"):
        read_labels(labels.rename(columns={"VolumeName": "VolumeNames"}))


def test_organ_of_overrides_table_and_defaults(tables):
    long, wide, labels = tables
    data = align(long, labels, organ_of={"Emphysema": "chest"})
    assert data.organs[data.findings.index("Emphysema")] == "chest"
    custom = wide.rename(columns={"Hiatal hernia": "Lymphadenopathy"})
    data = align(custom, labels)
    assert data.organs[data.findings.index("Lymphadenopathy")] == "other"


def test_reads_csv_files(tables, tmp_path):
    long, _, labels = tables
    long.to_csv(tmp_path / "p.csv", index=False)
    labels.to_csv(tmp_path / "l.csv", index=False)
    a = align(tmp_path / "p.csv", tmp_path / "l.csv")
    b = align(long, labels)
    np.testing.assert_allclose(a.scores, b.scores)
    with pytest.raises(InputError, match="not found"):
        read_labels(tmp_path / "nope.csv")
