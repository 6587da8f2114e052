"""The `evaluate` and `probe` subcommands, wired into a throwaway argparse parser."""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd
import pytest

from visd.errors import InputError
from visd.evaluation import save_embeddings
from visd.evaluation.cli import add_evaluate_parser, add_probe_parser, parse_organ_of


@pytest.fixture
def parser():
    p = argparse.ArgumentParser(prog="visd")
    sub = p.add_subparsers(dest="command", required=True)
    add_evaluate_parser(sub)
    add_probe_parser(sub)
    return p


def test_parse_organ_of():
    assert parse_organ_of(["Lung nodule=lung", " Hiatal hernia = esophagus "]) == {
        "Lung nodule": "lung", "Hiatal hernia": "esophagus"}
    assert parse_organ_of(None) == {}
    with pytest.raises(InputError, match="Expected FINDING=ORGAN"):
        parse_organ_of(["Lung nodule"])


def test_evaluate_command(parser, tables, tmp_path, capsys):
    long, wide, labels = tables
    long.to_csv(tmp_path / "results.csv", index=False)
    wide.assign(Emphysema=0.5).to_csv(tmp_path / "other.csv", index=False)
    labels.to_csv(tmp_path / "labels.csv", index=False)
    args = parser.parse_args([
        "evaluate", "--predictions", str(tmp_path / "results.csv"), "--labels", str(tmp_path / "labels.csv"),
        "--out", str(tmp_path / "report"), "--bootstrap", "50", "--seed", "1", "--missing", "zero",
        "--compare", str(tmp_path / "other.csv"), "--organ-of", "Hiatal hernia=stomach",
    ])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "overall mean" in out and "stomach mean" in out
    assert (tmp_path / "report" / "roc_stomach.png").is_file()
    md = (tmp_path / "report" / "metrics.md").read_text()
    assert "Missing scores: `zero`" in md and "50 bootstrap resamples (seed 1)" in md
    assert (tmp_path / "report" / "comparison.csv").is_file()


def test_evaluate_rejects_unknown_missing_rule(parser):
    with pytest.raises(SystemExit):
        parser.parse_args(["evaluate", "--predictions", "a.csv", "--labels", "b.csv", "--missing", "skp"])


def test_probe_command(parser, tmp_path, capsys, rng):
    n = 60
    y = np.r_[np.zeros(30, int), np.ones(30, int)]
    emb = rng.normal(size=(n, 1, 3)).astype(np.float32)
    emb[:, 0, 0] += 4 * y
    scans = [f"s{i}" for i in range(n)]
    save_embeddings(tmp_path / "e.safetensors", emb, scans, ["chest"])
    pd.DataFrame({"VolumeName": scans, "Nodule": y}).to_csv(tmp_path / "labels.csv", index=False)
    args = parser.parse_args([
        "probe", "--embeddings", str(tmp_path / "e.safetensors"), "--labels", str(tmp_path / "labels.csv"),
        "--organ-of", "Nodule=chest", "--folds", "3", "--out", str(tmp_path / "probe.csv"),
    ])
    assert args.func(args) == 0
    assert "Nodule" in capsys.readouterr().out
    table = pd.read_csv(tmp_path / "probe.csv", index_col=0)
    assert table.loc["Nodule", "auc_mean"] > 0.95 and table.loc["Nodule", "n_folds"] == 3


def test_evaluate_bad_input_raises_visd_error(parser, tmp_path):
    args = parser.parse_args(["evaluate", "--predictions", str(tmp_path / "missing.csv"), "--labels",
                              str(tmp_path / "missing.csv")])
    with pytest.raises(InputError, match="labels file not found"):
        args.func(args)
