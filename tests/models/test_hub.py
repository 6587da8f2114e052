"""Saving and loading model folders; strict loading errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import make_tiny_model, phantom_volume
from visd import CheckpointMismatchError, ConfigError, ViSDModel, WeightsNotFoundError


@pytest.fixture
def saved(tmp_path):
    model = make_tiny_model(seed=3)
    folder = model.save_pretrained(tmp_path / "model")
    return model, folder


def test_save_then_load_gives_identical_outputs(saved):
    model, folder = saved
    assert {p.name for p in folder.iterdir()} >= {"config.json", "model.safetensors", "vocab.txt", "README.md"}
    loaded = ViSDModel.from_pretrained(folder)
    assert not loaded.training and loaded.config == model.config
    image, mask = phantom_volume()
    a, b = model.zero_shot_classify(image, mask), loaded.zero_shot_classify(image, mask)
    torch.testing.assert_close(a.embeddings.embeddings, b.embeddings.embeddings, rtol=0, atol=0, equal_nan=True)
    assert [s.probability for s in a.scores][:15] == [s.probability for s in b.scores][:15]
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    card = (folder / "README.md").read_text()
    assert "Emphysema" in card and "lung, heart, esophagus, aorta" in card


def _rewrite(folder, edit):
    state = load_file(folder / "model.safetensors")
    edit(state)
    save_file(state, folder / "model.safetensors")


def test_missing_key_fails_with_key_list(saved):
    _, folder = saved
    _rewrite(folder, lambda s: s.pop("pooling.query_tokens"))
    with pytest.raises(CheckpointMismatchError, match=r"1 missing: pooling\.query_tokens"):
        ViSDModel.from_pretrained(folder)


def test_wrong_shape_fails_with_both_shapes(saved):
    _, folder = saved
    _rewrite(folder, lambda s: s.__setitem__("pooling.query_tokens", torch.zeros(3, 32)))
    with pytest.raises(CheckpointMismatchError, match=r"pooling\.query_tokens: checkpoint \(3, 32\), model \(4, 32\)"):
        ViSDModel.from_pretrained(folder)


def test_extra_key_fails_and_module_prefix_is_hinted(saved):
    _, folder = saved
    _rewrite(folder, lambda s: s.__setitem__("extra.bias", torch.zeros(2)))
    with pytest.raises(CheckpointMismatchError, match=r"1 unexpected: extra\.bias"):
        ViSDModel.from_pretrained(folder)
    _rewrite(folder, lambda s: [s.__setitem__("module." + k, s.pop(k)) for k in list(s)])
    with pytest.raises(CheckpointMismatchError, match="'module.' prefix"):
        ViSDModel.from_pretrained(folder)


def test_config_with_unknown_key_is_an_error(saved):
    _, folder = saved
    data = json.loads((folder / "config.json").read_text())
    data["embed_dimm"] = 32
    (folder / "config.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="embed_dimm"):
        ViSDModel.from_pretrained(folder)


def test_damaged_weights_file(saved):
    _, folder = saved
    raw = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(raw[: len(raw) // 3])
    with pytest.raises(CheckpointMismatchError, match="damaged"):
        ViSDModel.from_pretrained(folder)


@pytest.mark.parametrize("source", ["./no/such/folder", "/abs/missing", "a/b/c", "~/nothing-here"])
def test_path_like_sources_that_do_not_exist_are_not_hub_lookups(source):
    with pytest.raises(WeightsNotFoundError, match="model folder not found"):
        ViSDModel.from_pretrained(source)


def test_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(make_tiny_model().config.to_json())
    with pytest.raises(WeightsNotFoundError, match="model.safetensors"):
        ViSDModel.from_pretrained(tmp_path)


def test_dtype_and_device_arguments(saved):
    _, folder = saved
    model = ViSDModel.from_pretrained(folder, device="cpu", dtype=torch.float64)
    assert model.temperature.dtype == torch.float64
