"""``visd segment CT --out MASK``: TotalSegmentator's label map moved into place when finished, or one line."""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys

from tests.conftest import DATA
from visd.cli import main

CT, SEG = DATA / "abdomen_3mm.nii.gz", DATA / "abdomen_3mm_totalseg.nii.gz"


def test_without_totalsegmentator_one_line_exit_2_and_no_file(tmp_path):
    code = "import sys; sys.modules['totalsegmentator'] = None; from visd.cli import main; sys.exit(main())"
    out = tmp_path / "masks" / "scan_totalseg.nii.gz"
    proc = subprocess.run([sys.executable, "-c", code, "segment", str(CT), "--out", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("visd segment: error: organ segmentation needs TotalSegmentator")
    assert list(out.parent.iterdir()) == []  # no partial output, no work folder


def test_the_label_map_lands_at_out(tmp_path, monkeypatch, capsys):
    calls = []

    def run_totalsegmentator(ct_path, out_dir, fast=False, statistics=False, *, roi_subset=None, device=None):
        calls.append((str(ct_path), fast, statistics, roi_subset, device))  # TotalSegmentator's output file
        return shutil.copy(SEG, out_dir / "totalsegmentator.nii.gz")

    module = importlib.import_module("visd.data.segment")  # the module (visd.data.segment is also the function)
    monkeypatch.setattr(module, "segment", run_totalsegmentator)
    out = tmp_path / "scan_totalseg.nii.gz"
    assert main(["segment", str(CT), "--out", str(out), "--fast", "--device", "cuda:1"]) == 0
    assert calls == [(str(CT), True, False, None, "cuda:1")]  # statistics off unless asked; every class
    assert out.read_bytes() == SEG.read_bytes() and sorted(p.name for p in tmp_path.iterdir()) == [out.name]
    assert f"wrote {out}" in capsys.readouterr().out


def test_bad_arguments(tmp_path, capsys):
    assert main(["segment", str(CT), "--out", str(tmp_path / "mask.png")]) == 2
    assert "--out must be a NIfTI file name" in capsys.readouterr().err
    assert main(["segment", str(tmp_path / "missing.nii.gz"), "--out", str(tmp_path / "m.nii.gz")]) == 2
    assert "CT not found" in capsys.readouterr().err
