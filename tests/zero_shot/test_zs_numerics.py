"""``visd diagnose --numerics``: bf16 only where the device computes it natively, and recorded in the results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from visd.cli import main
from visd.errors import ConfigError
from visd.models import numerics
from visd.zero_shot import cli

from .conftest import CT, SEG


def _cpu_flags() -> set[str]:
    """The CPU feature flags the kernel reports (Linux), an independent reading of what the CPU has."""
    info = Path("/proc/cpuinfo")
    if not info.is_file():
        pytest.skip("needs /proc/cpuinfo")
    for line in info.read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    pytest.skip("no flags line in /proc/cpuinfo")


def test_native_bf16_follows_the_cpu_flags():
    flags = _cpu_flags()
    assert numerics.native_bf16("cpu") == bool({"amx_tile", "avx512_bf16"} & flags)


def test_auto_picks_bf16_exactly_where_it_is_native(monkeypatch):
    for native in (True, False):
        monkeypatch.setattr(numerics, "native_bf16", lambda device, native=native: native)
        chosen, why = numerics.numerics_for("auto", "cpu")
        assert chosen.describe() == ("fused-bf16" if native else "fused") and why.startswith("auto: ")
    assert numerics.numerics_for("official", "cpu")[0] == numerics.Numerics("official")
    with pytest.raises(ConfigError, match="numerics must be one of"):
        numerics.numerics_for("bf16", "cpu")
    assert cli.NUMERICS_CHOICES == numerics.NUMERICS_CHOICES  # the parser's copy of the list


def test_diagnose_records_the_numerics_it_ran(model_dir, tmp_path, capsys):
    runs = {}
    for choice in ("fused", "fused-bf16"):
        out = tmp_path / choice
        code = main(["diagnose", str(CT), "--mask", str(SEG), "--model", str(model_dir), "--out", str(out / "r.csv"),
                     "--json", str(out / "r.json"), "--no-progress", "--numerics", choice])
        assert code == 0
        summary = capsys.readouterr().out.strip().splitlines()[-1]
        assert f"numerics {choice} (asked for)" in summary
        runs[choice] = json.loads((out / "r.json").read_text())
        assert runs[choice]["numerics"] == choice
    probs = {c: torch.tensor([r["probability"] or float("nan") for r in d["rows"]]) for c, d in runs.items()}
    assert not torch.equal(probs["fused"].nan_to_num(), probs["fused-bf16"].nan_to_num())  # bf16 did run
    torch.testing.assert_close(probs["fused-bf16"], probs["fused"], rtol=0, atol=2e-2, equal_nan=True)
