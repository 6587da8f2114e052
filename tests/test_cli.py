"""The visd command line: convert, errors as one line with a non-zero exit code."""

from __future__ import annotations

import subprocess
import sys

import torch

from tests.conftest import OFFICIAL
from visd import ViSDModel


def _visd(*args):
    return subprocess.run([sys.executable, "-m", "visd.cli", *map(str, args)], capture_output=True, text=True)


def test_convert_writes_a_loadable_folder(official_tiny_checkpoint, official_tiny_model, tmp_path):
    out = tmp_path / "converted"
    proc = _visd("convert", "--checkpoint", official_tiny_checkpoint, "--text-encoder", OFFICIAL / "tiny_text", "--out", out)
    assert proc.returncode == 0, proc.stderr
    model = ViSDModel.from_pretrained(out)
    ref = official_tiny_model.state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(v, ref[k]), k
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(["Emphysema."]), official_tiny_model.encode_text(["Emphysema."]))


def test_errors_are_one_line_with_exit_code(tmp_path):
    proc = _visd("convert", "--checkpoint", tmp_path / "missing.pth", "--text-encoder", OFFICIAL / "tiny_text", "--out", tmp_path / "o")
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "official checkpoint not found" in proc.stderr and "Traceback" not in proc.stderr


def test_help_lists_commands():
    proc = _visd("--help")
    assert proc.returncode == 0 and "convert" in proc.stdout
