"""The loopback Hub emulator against the real huggingface_hub client: downloads, cache, offline, errors."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from safetensors.torch import load_file, save_file

from tests.hub_server import LoopbackHub, force_hf_offline, hf_subprocess_env, loopback_hub  # noqa: F401  (fixture)

REPO = "visd-test/tiny"
HELLO_GIT_BLOB_ID = "ce013625030ba8dba906f756967f9e9ca394464a"  # `printf 'hello\n' | git hash-object --stdin`


def make_repo_folder(folder: Path, scale: float = 1.0) -> dict[str, bytes]:
    """A small model folder; returns its files' bytes by repo path."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"embed_dim": 32, "scale": scale}))
    (folder / "vocab.txt").write_text("hello\n")
    (folder / "tokenizer").mkdir()
    (folder / "tokenizer" / "tokenizer_config.json").write_text('{"do_lower_case": true}')
    weight = scale * torch.arange(12, dtype=torch.float32).reshape(3, 4)
    save_file({"weight": weight}, str(folder / "model.safetensors"))
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def snapshot_bytes(snapshot: str | Path) -> dict[str, bytes]:
    root = Path(snapshot)
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_snapshot_download_fetches_every_file_byte_identical(loopback_hub: LoopbackHub, tmp_path: Path) -> None:
    files = make_repo_folder(tmp_path / "repo")
    sha = loopback_hub.add_repo(REPO, tmp_path / "repo")

    snapshot = Path(snapshot_download(REPO, cache_dir=tmp_path / "cache"))

    assert snapshot == tmp_path / "cache" / "models--visd-test--tiny" / "snapshots" / sha
    assert snapshot_bytes(snapshot) == files
    assert sorted(loopback_hub.downloads()) == sorted((REPO, path) for path in files)
    # Cache blobs are named by ETag: the git blob id for text files, the sha256 for LFS weights.
    blobs = snapshot.parent.parent / "blobs"
    assert (blobs / HELLO_GIT_BLOB_ID).read_bytes() == b"hello\n"
    assert (blobs / hashlib.sha256(files["model.safetensors"]).hexdigest()).is_file()
    # The weights went through the CDN redirect, the text files straight from /resolve.
    assert any(path.startswith("/cdn-lfs/") for _, path in loopback_hub.requests)
    assert ("GET", f"/{REPO}/resolve/{sha}/config.json") in loopback_hub.requests


def test_hf_hub_download_fetches_one_file(loopback_hub: LoopbackHub, tmp_path: Path) -> None:
    files = make_repo_folder(tmp_path / "repo")
    sha = loopback_hub.add_repo(REPO, tmp_path / "repo")

    path = Path(hf_hub_download(REPO, "model.safetensors", cache_dir=tmp_path / "cache"))

    assert path.read_bytes() == files["model.safetensors"]
    assert path.parent.name == sha
    assert torch.equal(load_file(str(path))["weight"], torch.arange(12, dtype=torch.float32).reshape(3, 4))
    assert loopback_hub.downloads() == [(REPO, "model.safetensors")]
    nested = hf_hub_download(REPO, "tokenizer/tokenizer_config.json", cache_dir=tmp_path / "cache")
    assert Path(nested).read_bytes() == files["tokenizer/tokenizer_config.json"]


def test_cached_snapshot_is_not_downloaded_again(loopback_hub: LoopbackHub, tmp_path: Path) -> None:
    make_repo_folder(tmp_path / "repo")
    loopback_hub.add_repo(REPO, tmp_path / "repo")
    first = snapshot_download(REPO, cache_dir=tmp_path / "cache")
    loopback_hub.clear_requests()

    assert snapshot_download(REPO, cache_dir=tmp_path / "cache", local_files_only=True) == first
    assert loopback_hub.requests == []

    assert snapshot_download(REPO, cache_dir=tmp_path / "cache") == first  # online: only the revision is checked
    assert loopback_hub.downloads() == []
    assert loopback_hub.requests == [("GET", f"/api/models/{REPO}/revision/main")]


def test_offline_mode_loads_the_cache_and_sends_nothing(
    loopback_hub: LoopbackHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = make_repo_folder(tmp_path / "repo")
    loopback_hub.add_repo(REPO, tmp_path / "repo")
    first = snapshot_download(REPO, cache_dir=tmp_path / "cache")
    loopback_hub.clear_requests()
    force_hf_offline(monkeypatch)

    assert snapshot_download(REPO, cache_dir=tmp_path / "cache") == first
    assert snapshot_bytes(first) == files
    assert Path(hf_hub_download(REPO, "vocab.txt", cache_dir=tmp_path / "cache")).read_bytes() == b"hello\n"
    # An empty cache proves the mode is really offline: the repo is served, yet nothing is fetched.
    with pytest.raises(LocalEntryNotFoundError):
        snapshot_download(REPO, cache_dir=tmp_path / "empty-cache")
    assert loopback_hub.requests == []


def test_default_cache_is_redirected_by_the_fixture(loopback_hub: LoopbackHub, tmp_path: Path) -> None:
    make_repo_folder(tmp_path / "repo")
    sha = loopback_hub.add_repo(REPO, tmp_path / "repo")

    snapshot = Path(snapshot_download(REPO))  # no cache_dir: the fixture's tmp cache, never ~/.cache

    assert snapshot == tmp_path / "hf-cache" / "models--visd-test--tiny" / "snapshots" / sha


def test_missing_repo_revision_and_file_raise_the_client_errors(loopback_hub: LoopbackHub, tmp_path: Path) -> None:
    make_repo_folder(tmp_path / "repo")
    loopback_hub.add_repo(REPO, tmp_path / "repo")
    cache = tmp_path / "cache"

    with pytest.raises(RepositoryNotFoundError):
        snapshot_download("visd-test/missing", cache_dir=cache)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("visd-test/missing", "config.json", cache_dir=cache)
    with pytest.raises(RepositoryNotFoundError):
        HfApi().model_info("visd-test/missing")
    with pytest.raises(RevisionNotFoundError):
        snapshot_download(REPO, revision="no-such-branch", cache_dir=cache)
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(REPO, "pytorch_model.bin", cache_dir=cache)
    assert loopback_hub.downloads() == []


def test_revisions_serve_their_own_bytes(loopback_hub: LoopbackHub, tmp_path: Path) -> None:
    v1 = make_repo_folder(tmp_path / "v1", scale=1.0)
    v2 = make_repo_folder(tmp_path / "v2", scale=2.0)
    sha1 = loopback_hub.add_repo(REPO, tmp_path / "v1")
    sha2 = loopback_hub.add_repo(REPO, tmp_path / "v2", revision="v2")
    cache = tmp_path / "cache"

    assert sha1 != sha2
    assert snapshot_bytes(snapshot_download(REPO, revision="v2", cache_dir=cache)) == v2
    assert snapshot_bytes(snapshot_download(REPO, cache_dir=cache)) == v1
    assert snapshot_bytes(snapshot_download(REPO, revision=sha2, cache_dir=cache)) == v2
    weights = hf_hub_download(REPO, "model.safetensors", revision="v2", cache_dir=cache)
    assert torch.equal(load_file(weights)["weight"], 2.0 * torch.arange(12, dtype=torch.float32).reshape(3, 4))
    assert (cache / "models--visd-test--tiny" / "refs" / "v2").read_text() == sha2


def test_model_info_lists_sha_and_siblings(loopback_hub: LoopbackHub, tmp_path: Path) -> None:
    files = make_repo_folder(tmp_path / "repo")
    sha = loopback_hub.add_repo(REPO, tmp_path / "repo")

    info = HfApi().model_info(REPO, files_metadata=True)

    assert info.sha == sha
    assert sorted(s.rfilename for s in info.siblings) == sorted(files)
    weights = next(s for s in info.siblings if s.rfilename == "model.safetensors")
    assert weights.size == len(files["model.safetensors"])
    assert weights.lfs.sha256 == hashlib.sha256(files["model.safetensors"]).hexdigest()
    vocab = next(s for s in info.siblings if s.rfilename == "vocab.txt")
    assert (vocab.blob_id, vocab.lfs) == (HELLO_GIT_BLOB_ID, None)
    assert sorted(HfApi().list_repo_files(REPO)) == sorted(files)
    top = {entry.path: type(entry).__name__ for entry in HfApi().list_repo_tree(REPO)}
    assert top == {"config.json": "RepoFile", "model.safetensors": "RepoFile", "vocab.txt": "RepoFile",
                   "tokenizer": "RepoFolder"}
    nested = [entry.path for entry in HfApi().list_repo_tree(REPO, path_in_repo="tokenizer")]
    assert nested == ["tokenizer/tokenizer_config.json"]


_CHILD = """
import sys
from huggingface_hub import snapshot_download
print(snapshot_download(sys.argv[1]))
"""


def run_child(env: dict[str, str]) -> Path:
    """snapshot_download(REPO) in a fresh interpreter with ``env``; returns the snapshot folder."""
    child = subprocess.run([sys.executable, "-c", _CHILD, REPO], env=env, capture_output=True, text=True, timeout=60)
    assert child.returncode == 0, child.stderr
    return Path(child.stdout.strip())


def test_environment_variables_work_in_a_child_process(tmp_path: Path) -> None:
    """HF_ENDPOINT and HF_HUB_OFFLINE set before import, the documented way, with no patching."""
    files = make_repo_folder(tmp_path / "repo")
    cache = tmp_path / "cache"
    with LoopbackHub() as hub:
        sha = hub.add_repo(REPO, tmp_path / "repo")
        snapshot = run_child(hf_subprocess_env(endpoint=hub.endpoint, cache_dir=cache))
        assert snapshot.name == sha
        assert snapshot_bytes(snapshot) == files
        hub.clear_requests()

        assert run_child(hf_subprocess_env(endpoint=hub.endpoint, cache_dir=cache, offline=True)) == snapshot
        assert hub.requests == []
