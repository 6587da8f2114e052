"""``visd index`` / ``visd search``: the CLI gives the Python API's tables and reports skipped scans."""

from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pytest

from tests.conftest import make_tiny_model, save_in_cache
from visd.cli import main
from visd.retrieval import ScanIndex, search

from .conftest import CT, SEG


def test_index_then_search_from_the_command_line(tmp_path, model_dir, capsys):
    manifest = tmp_path / "cases.csv"
    manifest.write_text(f"image,mask,scan\n{CT},{SEG},abdomen\nmissing.nii.gz,{SEG},gone\n")
    out = tmp_path / "archive"
    assert main(["index", "--manifest", str(manifest), "--model", str(model_dir), "--out", str(out),
                 "--no-progress"]) == 1  # one scan skipped
    printed = capsys.readouterr().out
    assert "skipped gone: CT file not found" in printed and "2 rows of 1 scans" in printed
    assert main(["index", "--out", str(out), "--approximate"]) == 0
    assert "approximate index kept" in capsys.readouterr().out

    results = tmp_path / "hits.csv"
    assert main(["search", "--index", str(out), "--text", "aortic aneurysm", "--organ", "aorta", "--top", "3",
                 "--out", str(results)]) == 0
    printed = capsys.readouterr().out
    assert "abdomen" in printed and "aorta" in printed
    expected = search(out, text="aortic aneurysm", organ="aorta", top=3)
    pd.testing.assert_frame_equal(pd.read_csv(results, keep_default_na=False), expected, check_dtype=False)


def test_bad_search_is_one_line_and_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "visd.cli", "search", "--index", str(tmp_path), "--text", "x",
                           "--organ", "lung"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"visd search: error: no visd index in {str(tmp_path)!r}: index.json is missing. Build one with "
        "`visd index --out FOLDER` (or visd.retrieval.index_embeddings)."
    ]


def test_nothing_to_index_is_one_error(capsys):
    assert main(["index", "--out", "x"]) == 2
    assert "nothing to index" in capsys.readouterr().err


def test_without_model_the_named_default_embeds_and_is_recorded(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VISD_HOME", str(tmp_path / "cache"))  # the named model, as a finished first use left it
    save_in_cache(make_tiny_model(seed=3), "visd-boost-ctrate")
    out = tmp_path / "archive"
    assert main(["index", str(CT), "--mask", str(SEG), "--out", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    assert ScanIndex.open(out).model == "visd-boost-ctrate"
    hits = search(out, scan=str(CT), mask=str(SEG), organ="lung", top=1)  # the index's own model embeds the query
    assert hits.loc[0, "scan"] == "abdomen_3mm" and abs(hits.loc[0, "score"] - 1) < 1e-5


def test_indexing_known_scans_again_is_refused_before_any_work(tmp_path, model_dir, capsys):
    out = tmp_path / "archive"
    argv = ["index", str(CT), "--mask", str(SEG), "--model", str(model_dir), "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    before = sorted(p.name for p in out.iterdir())
    assert main(argv) == 2
    assert "['abdomen_3mm'] are already indexed" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == before
