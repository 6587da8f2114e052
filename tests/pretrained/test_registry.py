"""The registry of named pretrained models: the built-in entry, registering, names, cache paths (no network)."""

from __future__ import annotations

from pathlib import Path

import pytest

import visd
import visd.pretrained as pretrained
from visd import ConfigError, ViSDModel, WeightsNotFoundError

_SHA = "ab" * 32
_FILE = {"filename": "checkpoint.pth", "url": "https://example.org/checkpoint.pth", "sha256": _SHA, "size": 10}
_TEXT = {"repo_id": "org/text", "revision": "main"}


@pytest.fixture(autouse=True)
def _own_registry(monkeypatch):
    monkeypatch.setattr(pretrained, "_REGISTRY", dict(pretrained._REGISTRY))


def test_builtin_entry_is_the_official_release():
    entry = pretrained.get_pretrained("visd-boost-ctrate")
    assert pretrained.DEFAULT_MODEL == "visd-boost-ctrate" and "visd-boost-ctrate" in visd.list_pretrained()
    base = "https://github.com/alibaba-damo-academy/ViSD-Boost/raw/42d18a9"
    assert [(f.filename, f.url, f.sha256, f.size) for f in entry.files] == [  # conversion order: vqvae, then main
        ("checkpoint_vqvae.pth", f"{base}/checkpoint_vqvae.pth",
         "8372bc41cce2a38e56ef7d0dde6e7ee95294133ed7b56d8d5a6d63af933d65a1", 411456526),
        ("checkpoint.pth", f"{base}/checkpoint.pth",
         "3edccbd1b9a6349cc4a56f2ea74ac4f2728850e389eaaff802971c698c2dba02", 1726637998),
    ]
    assert entry.size == 411456526 + 1726637998
    assert entry.text_encoder.repo_id == "microsoft/BiomedVLP-CXR-BERT-specialized"
    assert {"config.json", "vocab.txt"} <= set(entry.text_encoder.files)
    assert entry.config is None and "ICCV 2025" in entry.citation and entry.license


def test_register_list_and_duplicates():
    entry = visd.register_pretrained("lab-chest", files=[_FILE], text_encoder=_TEXT, license="CC-BY-4.0")
    assert "lab-chest" in visd.list_pretrained() and visd.list_pretrained() == sorted(visd.list_pretrained())
    assert pretrained.get_pretrained("lab-chest") is entry and entry.files[0].size == 10
    with pytest.raises(ConfigError, match="registered already; pass overwrite=True"):
        visd.register_pretrained("lab-chest", files=[_FILE], text_encoder=_TEXT)
    again = visd.register_pretrained("lab-chest", files=[{**_FILE, "size": 11}], text_encoder=_TEXT, overwrite=True)
    assert pretrained.get_pretrained("lab-chest") is again and again.size == 11


@pytest.mark.parametrize(
    ("name", "files", "config", "match"),
    [
        ("org/model", [_FILE], None, "no '/'"),
        ("lab", [{**_FILE, "sha256": "xyz"}], None, "64 lower-case hex"),
        ("lab", [{**_FILE, "size": 0}], None, "size of checkpoint.pth"),
        ("lab", [{**_FILE, "url": "ftp://x/y"}], None, "http"),
        ("lab", [_FILE, _FILE], None, "a file twice"),
        ("lab", [], None, "no release files"),
        ("lab", [_FILE], {"embed_dimm": 8}, "embed_dimm"),
        ("lab", [_FILE], {"text": {}}, "drop it"),
    ],
)
def test_bad_entries_are_refused(name, files, config, match):
    with pytest.raises(ConfigError, match=match):
        visd.register_pretrained(name, files=files, text_encoder=_TEXT, config=config)
    assert name not in visd.list_pretrained()


def test_unknown_name_suggests_the_closest():
    with pytest.raises(WeightsNotFoundError, match="Did you mean 'visd-boost-ctrate'"):
        pretrained.get_pretrained("visd-boost-ctrat")
    with pytest.raises(WeightsNotFoundError, match="Did you mean 'visd-boost-ctrate'.*registered name"):
        ViSDModel.from_pretrained("visd-boost-ctrat")


def test_cache_folder_under_visd_home_or_the_hf_assets_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("VISD_HOME", str(tmp_path / "home"))
    assert pretrained.cache_folder("visd-boost-ctrate") == tmp_path / "home" / "pretrained" / "visd-boost-ctrate"
    assert pretrained.cache_folder("visd-boost-ctrate", cache_dir=tmp_path / "x") == tmp_path / "x" / "pretrained" / "visd-boost-ctrate"
    monkeypatch.delenv("VISD_HOME")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_ASSETS_CACHE", str(tmp_path / "assets"))
    assert pretrained.cache_folder("visd-boost-ctrate") == tmp_path / "assets" / "visd" / "pretrained" / "visd-boost-ctrate"
    assert pretrained.cached_folder("visd-boost-ctrate") is None
    assert not (tmp_path / "assets").exists()  # asking creates nothing


def test_incomplete_or_stale_folder_is_not_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("VISD_HOME", str(tmp_path))
    entry = visd.register_pretrained("lab", files=[_FILE], text_encoder=_TEXT)
    folder = pretrained.cache_folder("lab")
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"")
    assert pretrained.cached_folder("lab") is None  # no completion marker
    import json

    (folder / pretrained.MARKER_NAME).write_text(json.dumps(entry.fingerprint()))
    assert pretrained.cached_folder("lab") == folder
    visd.register_pretrained("lab", files=[{**_FILE, "sha256": "cd" * 32}], text_encoder=_TEXT, overwrite=True)
    assert pretrained.cached_folder("lab") is None  # made from other files than the ones now registered


def test_mirror_replaces_the_origin_and_keeps_the_path(monkeypatch):
    entry = pretrained.get_pretrained("visd-boost-ctrate")
    assert pretrained.release_url(entry.files[1]) == entry.files[1].url
    monkeypatch.setenv("VISD_RELEASE_MIRROR", "http://mirror.local/visd/")
    assert pretrained.release_url(entry.files[1]) == (
        "http://mirror.local/visd/alibaba-damo-academy/ViSD-Boost/raw/42d18a9/checkpoint.pth"
    )


def test_revision_with_a_name_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("VISD_HOME", str(tmp_path))
    with pytest.raises(ConfigError, match="pinned by its registry entry"):
        ViSDModel.from_pretrained("visd-boost-ctrate", revision="v2")


def test_local_files_only_with_an_uncached_name_sends_nothing(monkeypatch, tmp_path):
    monkeypatch.setenv("VISD_HOME", str(tmp_path))
    monkeypatch.setenv("VISD_RELEASE_MIRROR", "http://127.0.0.1:9")  # would fail loudly if it were asked
    with pytest.raises(WeightsNotFoundError, match="not in the visd cache .* local_files_only=True"):
        ViSDModel.from_pretrained("visd-boost-ctrate", local_files_only=True)
    assert not Path(tmp_path / "pretrained").exists()
