"""The optional TotalSegmentator run: missing dependency and the call it makes (with a stand-in module)."""

from __future__ import annotations

import sys
import types

import pytest

from visd.data import segment
from visd.errors import MissingDependencyError

from ._helpers import data_file


def test_missing_totalsegmentator(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "totalsegmentator", None)  # import fails as if not installed
    with pytest.raises(MissingDependencyError, match=r'pip install "visd\[segment\]".*--mask') as err:
        segment(data_file("abdomen_3mm.nii.gz"), tmp_path)
    assert isinstance(err.value, ImportError)


def _fake_totalsegmentator(monkeypatch, calls: list):
    package = types.ModuleType("totalsegmentator")
    config = types.ModuleType("totalsegmentator.config")
    api = types.ModuleType("totalsegmentator.python_api")
    config.setup_totalseg = lambda: calls.append(("setup",))
    config.set_config_key = lambda key, value: calls.append(("set", key, value))
    api.totalsegmentator = lambda **kwargs: calls.append(("run", kwargs))
    package.config, package.python_api = config, api
    for name, module in (("totalsegmentator", package), ("totalsegmentator.config", config),
                         ("totalsegmentator.python_api", api)):
        monkeypatch.setitem(sys.modules, name, module)


def test_usage_statistics_off_by_default(monkeypatch, tmp_path):
    calls: list = []
    _fake_totalsegmentator(monkeypatch, calls)
    out = segment(data_file("abdomen_3mm.nii.gz"), tmp_path / "seg", fast=True)
    assert out == tmp_path / "seg" / "totalsegmentator.nii.gz"
    assert calls[:2] == [("setup",), ("set", "send_usage_stats", False)]
    run = calls[2][1]
    assert run["ml"] is True and run["fast"] is True and run["task"] == "total" and run["output"] == out


def test_usage_statistics_left_alone_when_allowed(monkeypatch, tmp_path):
    calls: list = []
    _fake_totalsegmentator(monkeypatch, calls)
    segment(data_file("abdomen_3mm.nii.gz"), tmp_path, statistics=True)
    assert [c[0] for c in calls] == ["run"]
