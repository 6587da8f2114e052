"""from_pretrained against a real HTTP server on 127.0.0.1 that serves the Hub's endpoints."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import make_tiny_model, phantom_volume
from tests.hub_server import force_hf_offline, loopback_hub  # noqa: F401
from visd import ViSDModel, WeightsNotFoundError


@pytest.fixture
def published(loopback_hub, tmp_path):
    model = make_tiny_model(seed=5)
    folder = model.save_pretrained(tmp_path / "publish")
    loopback_hub.add_repo("visd-org/tiny-chest", folder)
    return model


def _same_outputs(a, b):
    image, mask = phantom_volume()
    ea, eb = a.encode_image(image, mask), b.encode_image(image, mask)
    torch.testing.assert_close(ea.embeddings, eb.embeddings, rtol=0, atol=0, equal_nan=True)


def test_download_then_offline_cache(published, loopback_hub, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    model = ViSDModel.from_pretrained("visd-org/tiny-chest", cache_dir=cache)
    _same_outputs(model, published)
    downloaded = {path for repo, path in loopback_hub.downloads() if repo == "visd-org/tiny-chest"}
    assert {"config.json", "model.safetensors", "vocab.txt"} <= downloaded

    loopback_hub.clear_requests()
    again = ViSDModel.from_pretrained("visd-org/tiny-chest", cache_dir=cache, local_files_only=True)
    _same_outputs(again, published)
    force_hf_offline(monkeypatch)
    offline = ViSDModel.from_pretrained("visd-org/tiny-chest", cache_dir=cache)
    _same_outputs(offline, published)
    assert loopback_hub.requests == []


def test_offline_without_cache_says_so(published, tmp_path, monkeypatch):
    force_hf_offline(monkeypatch)
    with pytest.raises(WeightsNotFoundError, match="not in the Hugging Face cache"):
        ViSDModel.from_pretrained("visd-org/tiny-chest", cache_dir=tmp_path / "empty")


def test_unknown_repo(published, tmp_path):
    with pytest.raises(WeightsNotFoundError, match="no Hugging Face Hub repo 'visd-org/nope'"):
        ViSDModel.from_pretrained("visd-org/nope", cache_dir=tmp_path / "c")


def test_revision_pinning(published, loopback_hub, tmp_path):
    other = make_tiny_model(seed=9)
    loopback_hub.add_repo("visd-org/tiny-chest", other.save_pretrained(tmp_path / "v2"), revision="v2")
    pinned = ViSDModel.from_pretrained("visd-org/tiny-chest", revision="v2", cache_dir=tmp_path / "c")
    main = ViSDModel.from_pretrained("visd-org/tiny-chest", cache_dir=tmp_path / "c")
    assert torch.equal(pinned.pooling.query_tokens, other.pooling.query_tokens)
    assert torch.equal(main.pooling.query_tokens, published.pooling.query_tokens)
