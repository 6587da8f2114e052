"""First use of a named model against loopback servers: download, verify, convert once; later uses offline.

The Hub emulator serves the text encoder (``HF_ENDPOINT``), the release emulator the two official-format
checkpoints with GitHub's redirect to its media host and HTTP ranges (see ``conftest.py`` here).
"""

from __future__ import annotations

import hashlib
import json
import socket

import pytest
import torch

import visd.pretrained as pretrained
from tests.conftest import OFFICIAL, make_tiny_model
from tests.hub_server import force_hf_offline
from tests.pretrained.conftest import RELEASE_PATH, TINY_NAME, tiny_release_config
from visd import CheckpointMismatchError, ViSDModel, WeightsNotFoundError
from visd.config import ViSDConfig
from visd.models.official import text_config_from_bert


def _reference(tiny, order=("checkpoint_vqvae.pth", "checkpoint.pth")) -> ViSDModel:
    config = ViSDConfig.from_dict({**tiny_release_config(), "text": text_config_from_bert(OFFICIAL / "tiny_text").model_dump()})
    return ViSDModel.from_official([tiny.folder / name for name in order], OFFICIAL / "tiny_text", config=config)


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def _downloads(site):
    return site.home / "downloads" / TINY_NAME


def test_first_use_downloads_verifies_converts_then_makes_no_request(release_site, monkeypatch):
    model = ViSDModel.from_pretrained(TINY_NAME)
    reference = _reference(release_site.tiny)
    _assert_same_weights(model, reference)
    stale = _reference(release_site.tiny, order=("checkpoint.pth", "checkpoint_vqvae.pth"))
    assert not torch.equal(stale.pooling.query_tokens, reference.pooling.query_tokens)  # the order is checked
    assert model.encode_text(["Emphysema."]).allclose(reference.encode_text(["Emphysema."]), atol=0)

    media = [r for r in release_site.release.requests if r[0] == "media"]
    github = [r for r in release_site.release.requests if r[0] == "github"]
    assert [r[2].rsplit("/", 1)[1] for r in github] == ["checkpoint_vqvae.pth", "checkpoint.pth"]
    assert len(media) == 2  # each file followed its redirect once
    assert any(path.endswith("/vocab.txt") for _, path in release_site.hub.requests)

    folder = pretrained.cached_folder(TINY_NAME)
    assert folder == release_site.home / "pretrained" / TINY_NAME
    assert json.loads((folder / pretrained.MARKER_NAME).read_text()) == pretrained.get_pretrained(TINY_NAME).fingerprint()
    card = (folder / "README.md").read_text()
    assert "test licence" in card and "test citation" in card and pretrained.get_pretrained(TINY_NAME).files[1].sha256 in card
    assert not _downloads(release_site).exists()  # the pickles go once converted
    assert [p.name for p in folder.parent.iterdir() if p.name.startswith(f".{TINY_NAME}.tmp-")] == []

    release_site.clear_requests()
    _assert_same_weights(ViSDModel.from_pretrained(TINY_NAME), reference)
    _assert_same_weights(ViSDModel.from_pretrained(TINY_NAME, local_files_only=True), reference)
    force_hf_offline(monkeypatch)
    _assert_same_weights(ViSDModel.from_pretrained(TINY_NAME), reference)
    assert pretrained.fetch_pretrained(ViSDModel, TINY_NAME) == folder
    assert release_site.requests() == []


def test_a_download_cut_halfway_resumes_with_a_range_request(release_site):
    data = release_site.tiny.files["checkpoint.pth"]
    media_path = "/media/visd-test/tiny-release/0123abc/checkpoint.pth"
    release_site.release.cut_once(f"{RELEASE_PATH}/checkpoint.pth", len(data) // 2)
    model = ViSDModel.from_pretrained(TINY_NAME, cache_dir=release_site.home)
    _assert_same_weights(model, _reference(release_site.tiny))
    gets = [(host, path, rng) for host, _, path, rng in release_site.release.requests if path.endswith("/checkpoint.pth")]
    assert gets[-2:] == [("github", f"{RELEASE_PATH}/checkpoint.pth", f"bytes={len(data) // 2}-"),
                         ("media", media_path, f"bytes={len(data) // 2}-")]
    assert len(gets) == 4


def test_a_partial_file_left_by_a_killed_run_is_resumed_and_checked(release_site):
    data = release_site.tiny.files["checkpoint.pth"]
    _downloads(release_site).mkdir(parents=True)
    part = _downloads(release_site) / "checkpoint.pth.part"
    part.write_bytes(data[:1000])
    pretrained.fetch_pretrained(ViSDModel, TINY_NAME, progress=False)
    ranges = [rng for host, _, path, rng in release_site.release.requests if host == "media" and path.endswith("/checkpoint.pth")]
    assert ranges == ["bytes=1000-"]

    # a bad partial file (not a prefix of the real one) is resumed, fails the check, and is fetched again whole
    release_site.register("visd-tiny-again")
    release_site.clear_requests()
    (release_site.home / "downloads" / "visd-tiny-again").mkdir(parents=True)
    (release_site.home / "downloads" / "visd-tiny-again" / "checkpoint.pth.part").write_bytes(b"\0" * 1000)
    _assert_same_weights(ViSDModel.from_pretrained("visd-tiny-again"), _reference(release_site.tiny))
    ranges = [rng for host, _, path, rng in release_site.release.requests if host == "media" and path.endswith("/checkpoint.pth")]
    assert ranges == ["bytes=1000-", None]


def test_a_corrupted_byte_fails_the_checksum_and_leaves_no_file(release_site):
    data = bytearray(release_site.tiny.files["checkpoint.pth"])
    data[len(data) // 3] ^= 0xFF
    release_site.release.add_file(f"{RELEASE_PATH}/checkpoint.pth", bytes(data))
    with pytest.raises(CheckpointMismatchError, match="does not match its registered checksum.*deleted"):
        ViSDModel.from_pretrained(TINY_NAME)
    assert sorted(p.name for p in _downloads(release_site).iterdir()) == ["checkpoint_vqvae.pth"]  # verified one kept
    assert pretrained.cached_folder(TINY_NAME) is None and not pretrained.cache_folder(TINY_NAME).exists()


def test_a_file_of_the_wrong_size_is_refused_before_its_body(release_site):
    release_site.release.add_file(f"{RELEASE_PATH}/checkpoint.pth", b"tiny")
    with pytest.raises(CheckpointMismatchError, match="is 4 bytes, expected"):
        pretrained.fetch_pretrained(ViSDModel, TINY_NAME, progress=False)
    assert not (_downloads(release_site) / "checkpoint.pth").exists()
    assert not (_downloads(release_site) / "checkpoint.pth.part").exists()


def test_no_server_gives_one_clear_error(release_site):
    files = release_site.tiny.registered(_closed_port_url())
    release_site.register(files=files, overwrite=True)
    with pytest.raises(WeightsNotFoundError) as info:
        ViSDModel.from_pretrained(TINY_NAME)
    message = str(info.value)
    sizes = [f"{len(d):,} bytes" for d in release_site.tiny.files.values()]
    for expected in ["could not be reached", "checkpoint_vqvae.pth: " + sizes[0], "checkpoint.pth: " + sizes[1],
                     "visd convert --checkpoint checkpoint_vqvae.pth --checkpoint checkpoint.pth --text-encoder",
                     "ViSDModel.from_pretrained('<folder>')", "VISD_RELEASE_MIRROR", "vocab.txt"]:
        assert expected in message
    assert "HF_HUB_OFFLINE" not in message
    assert pretrained.cached_folder(TINY_NAME) is None and not pretrained.cache_folder(TINY_NAME).exists()


def test_hf_hub_offline_is_named_only_when_set(release_site, monkeypatch):
    force_hf_offline(monkeypatch)
    with pytest.raises(WeightsNotFoundError, match="HF_HUB_OFFLINE is set") as info:
        ViSDModel.from_pretrained(TINY_NAME)
    assert "visd convert" in str(info.value)
    assert release_site.requests() == []


def test_the_release_mirror_is_honoured(release_site, monkeypatch):
    release_site.register(files=release_site.tiny.registered(_closed_port_url()), overwrite=True)
    for name, data in release_site.tiny.files.items():
        release_site.release.add_file(f"/mirror{RELEASE_PATH}/{name}", data)
    monkeypatch.setenv("VISD_RELEASE_MIRROR", release_site.release.endpoint + "/mirror/")
    _assert_same_weights(ViSDModel.from_pretrained(TINY_NAME), _reference(release_site.tiny))
    paths = [path for _, _, path, _ in release_site.release.requests]
    assert paths == [f"/mirror{RELEASE_PATH}/checkpoint_vqvae.pth", f"/mirror{RELEASE_PATH}/checkpoint.pth"]


def test_a_local_folder_named_like_a_registered_model_wins(release_site, tmp_path, monkeypatch):
    own = make_tiny_model(seed=3)
    own.save_pretrained(tmp_path / TINY_NAME)
    monkeypatch.chdir(tmp_path)
    _assert_same_weights(ViSDModel.from_pretrained(TINY_NAME), own)
    assert release_site.requests() == []


def test_an_interrupted_conversion_leaves_nothing_complete(release_site):
    # a checkpoint that passes its registered hash but lacks the text projection: the strict load fails
    state = torch.load(release_site.tiny.folder / "checkpoint.pth", weights_only=True)["model"]
    del state["text_proj.weight"]
    import io

    buffer = io.BytesIO()
    torch.save({"model": state, "epoch": 3}, buffer)
    bad = buffer.getvalue()
    release_site.release.add_file(f"{RELEASE_PATH}/bad/checkpoint.pth", bad)
    files = release_site.tiny.registered(release_site.release.endpoint)
    files[1] |= {"url": files[1]["url"].replace("/checkpoint.pth", "/bad/checkpoint.pth"),
                 "sha256": hashlib.sha256(bad).hexdigest(), "size": len(bad)}
    release_site.register(files=files, overwrite=True)
    with pytest.raises(CheckpointMismatchError, match="1 missing: text.proj.weight"):
        ViSDModel.from_pretrained(TINY_NAME)
    parent = pretrained.cache_folder(TINY_NAME).parent
    assert pretrained.cached_folder(TINY_NAME) is None and not pretrained.cache_folder(TINY_NAME).exists()
    assert [p.name for p in parent.iterdir() if not p.name.endswith(".lock")] == []  # no temporary folder left

    release_site.register(overwrite=True)  # the right files: the next call converts them
    _assert_same_weights(ViSDModel.from_pretrained(TINY_NAME), _reference(release_site.tiny))
    vqvae_gets = [r for r in release_site.release.requests if r[0] == "media" and r[2].endswith("checkpoint_vqvae.pth")]
    assert len(vqvae_gets) == 1  # the verified first file was kept for the retry, not fetched again


def test_a_folder_from_other_files_is_replaced(release_site):
    first = pretrained.fetch_pretrained(ViSDModel, TINY_NAME, progress=False)
    (first / "stale.txt").write_text("from the old conversion")
    release_site.register(overwrite=True, citation="new citation")  # another fingerprint? no: same files
    assert pretrained.cached_folder(TINY_NAME) == first  # card text is not part of what the folder is made from
    release_site.register(overwrite=True, config={**tiny_release_config(), "temperature": 0.05})
    assert pretrained.cached_folder(TINY_NAME) is None
    again = pretrained.fetch_pretrained(ViSDModel, TINY_NAME, progress=False)
    assert again == first and not (again / "stale.txt").exists()
    assert ViSDModel.from_pretrained(TINY_NAME).config.temperature == 0.05



def test_leftovers_of_a_killed_conversion_are_not_used_and_are_removed(release_site):
    parent = pretrained.cache_folder(TINY_NAME).parent
    leftover = parent / f".{TINY_NAME}.tmp-killed"
    make_tiny_model(seed=4).save_pretrained(leftover)  # complete-looking, with a marker, but never renamed
    (leftover / pretrained.MARKER_NAME).write_text(json.dumps(pretrained.get_pretrained(TINY_NAME).fingerprint()))
    assert pretrained.cached_folder(TINY_NAME) is None
    _assert_same_weights(ViSDModel.from_pretrained(TINY_NAME), _reference(release_site.tiny))
    assert not leftover.exists()


def test_a_missing_file_names_the_http_answer(release_site):
    files = release_site.tiny.registered(release_site.release.endpoint)
    files[0]["url"] = files[0]["url"].replace("/raw/0123abc/", "/raw/fffffff/")
    release_site.register(files=files, overwrite=True)
    with pytest.raises(WeightsNotFoundError, match=r"(?s)raw/fffffff/checkpoint_vqvae.pth answered HTTP 404.*visd convert"):
        pretrained.fetch_pretrained(ViSDModel, TINY_NAME, progress=False)
