"""The report folder: tables, ROC plots that are real images, atomic writes, no global matplotlib state."""

from __future__ import annotations

import os
import re
import sys

import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imread

from visd.evaluation import compare, evaluate, write_report
from visd._io import atomic_write_text
from visd.evaluation.report import format_value

CI = re.compile(r"^\d\.\d{3} \(\d\.\d{3}–\d\.\d{3}\)$")


def test_format_value():
    assert format_value(0.8123, 0.77149, 0.85) == "0.812 (0.771–0.850)"
    assert format_value(0.8123) == "0.812"
    assert format_value(float("nan")) == "–"


@pytest.fixture
def report(tables, tmp_path):
    long, wide, labels = tables
    ev = evaluate(long, labels, n_bootstrap=100, seed=0)
    cmp = compare(long, wide.assign(Emphysema=0.5), labels, n_bootstrap=100, seed=0)
    return ev, write_report(ev, tmp_path / "report", comparison=cmp), tmp_path / "report"


def test_report_files_and_tables(report):
    ev, written, folder = report
    names = sorted(os.listdir(folder))
    assert names == sorted(
        ["metrics.md", "metrics.csv", "metrics_raw.csv", "comparison.md", "comparison.csv",
         "roc_lung.png", "roc_heart.png", "roc_esophagus.png"]
    )  # and no temporary files left behind
    assert set(written.values()) == {folder / n for n in names}
    table = pd.read_csv(folder / "metrics.csv", index_col=0)
    assert list(table.index) == ["Emphysema", "Lung nodule", "Cardiomegaly", "Hiatal hernia",
                                 "lung mean", "heart mean", "esophagus mean", "overall mean"]
    assert all(CI.match(v) for v in table["AUC"]), table["AUC"].tolist()
    auc = ev.table.loc["overall mean", ["auc", "auc_low", "auc_high"]]
    assert table.loc["overall mean", "AUC"] == format_value(*auc)
    raw = pd.read_csv(folder / "metrics_raw.csv", index_col=0)
    np.testing.assert_allclose(raw["auc"], ev.table["auc"].astype(float))
    md = (folder / "metrics.md").read_text()
    assert md.count("\n| ") == 1 + len(table)  # header + one line per row
    assert "| overall mean | " in md and format_value(*auc) in md
    cmp = (folder / "comparison.md").read_text()
    assert "| Emphysema |" in cmp and "0.500" in cmp  # the constant model B has AUC 0.5


def test_roc_png_is_a_real_image(report):
    ev, _, folder = report
    img = imread(folder / "roc_lung.png")
    h, w = img.shape[:2]
    assert h > 100 and w > 200  # two findings side by side
    rgb = img[..., :3]
    assert rgb.std() > 0.05
    non_white = (rgb < 0.9).any(axis=-1).mean()
    assert 0.01 < non_white < 0.6
    # The ROC curve is drawn in tab:blue (31, 119, 180) and the threshold marker in tab:red.
    blue = (np.abs(rgb - np.array([31, 119, 180]) / 255).sum(-1) < 0.1).sum()
    red = (np.abs(rgb - np.array([214, 39, 40]) / 255).sum(-1) < 0.1).sum()
    assert blue > 200 and red > 20


def test_atomic_write_keeps_old_content_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "metrics.md"
    atomic_write_text(target, "old")

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(target, "new")
    monkeypatch.undo()
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["metrics.md"]


def test_no_global_matplotlib_state(tables, tmp_path, monkeypatch):
    import matplotlib

    long, _, labels = tables
    before = matplotlib.rcParams._get("backend")
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)  # any pyplot import now fails
    written = write_report(evaluate(long, labels, n_bootstrap=20), tmp_path)
    assert matplotlib.rcParams._get("backend") == before
    assert written["roc_lung"].stat().st_size > 1000


def test_report_with_a_finding_that_cannot_be_scored(tables, tmp_path):
    long, _, labels = tables
    labels["Hiatal hernia"] = 0
    written = write_report(evaluate(long, labels, n_bootstrap=20), tmp_path)
    img = imread(written["roc_esophagus"])
    assert img[..., :3].std() > 0.02  # a panel that says why, not an empty file
    table = pd.read_csv(written["metrics_csv"], index_col=0)
    assert table.loc["Hiatal hernia", "AUC"] == "–"
    assert "only one class" in table.loc["Hiatal hernia", "Note"]
    assert table.loc["overall mean", "Pos/Neg"] == "3 findings"


def test_roc_plots_show_the_counts_of_positives_and_negatives(tables):
    from visd.evaluation.report import plot_roc_grid

    long, _, labels = tables
    ev = evaluate(long, labels, n_bootstrap=0)
    fig = plot_roc_grid(ev, "lung")
    shown = [t.get_text() for ax in fig.axes for t in ax.texts if "positive" in t.get_text()]
    expected = []
    for finding in ("Emphysema", "Lung nodule"):  # counted from the inputs: scored scans with each label
        scored = long[(long.finding == finding) & long.probability.notna()].scan + ".nii.gz"
        y = labels.set_index("VolumeName").loc[scored, finding]
        expected.append(f"{int((y == 1).sum())} positive / {int((y == 0).sum())} negative")
    assert shown == expected
