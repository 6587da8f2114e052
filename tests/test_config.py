"""Strict configs: unknown keys, cross-field checks, re-validated overrides, file round trips."""

from __future__ import annotations

import json

import pytest

from visd import ConfigError, ViSDConfig
from visd.config import PreprocessConfig, TextConfig


def test_unknown_key_is_an_error():
    with pytest.raises(ValueError, match="embed_dimm"):
        ViSDConfig(embed_dimm=3)
    with pytest.raises(ConfigError, match="spacingg"):
        ViSDConfig.from_dict({"preprocess": {"spacingg": [1, 1, 1]}})


def test_cross_field_messages_name_both_fields():
    with pytest.raises(ValueError, match=r"embed_dim \(250\) must be divisible by attention_heads \(4\)"):
        ViSDConfig(embed_dim=250, vision={"token_dim": 250})
    with pytest.raises(ValueError, match="names organ 'liver'"):
        ViSDConfig(findings=[{"organ": "liver", "name": "x", "negative": ["a"], "positive": ["b"]}])
    with pytest.raises(ValueError, match="multiple of the token stride"):
        PreprocessConfig(roi=(100, 256, 352))
    with pytest.raises(ValueError, match="max_length"):
        TextConfig(max_length=600)


def test_override_revalidates():
    config = ViSDConfig()
    assert config.replace(min_organ_fraction=0.5).min_organ_fraction == 0.5
    with pytest.raises(ConfigError, match="attention_heads"):
        config.replace(attention_heads=3)


def test_frozen():
    with pytest.raises(ValueError):
        ViSDConfig().embed_dim = 3


def test_json_round_trip_and_defaults(tmp_path):
    config = ViSDConfig(organs=("liver", "spleen"), findings=[], totalsegmentator_map={"liver": ("liver",)})
    path = tmp_path / "config.json"
    path.write_text(config.to_json())
    assert ViSDConfig.from_file(path) == config
    chest = ViSDConfig()
    assert [f.name for f in chest.findings][:2] == ["Emphysema", "Atelectasis"]
    assert chest.findings[1].negative == ("Not Atelectatic.",)
    assert chest.preprocess.hu_window == (-1150.0, 350.0) and len(chest.findings) == 16


def test_newer_schema_is_refused_with_upgrade_hint(tmp_path):
    path = tmp_path / "config.json"
    data = json.loads(ViSDConfig().to_json())
    data["schema_version"] = 99
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="upgrade visd"):
        ViSDConfig.from_file(path)


def test_unreadable_config_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read model config"):
        ViSDConfig.from_file(path)
