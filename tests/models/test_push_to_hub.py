"""push_to_hub against the loopback Hub: the real huggingface_hub client creates the repo and uploads."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, constants, snapshot_download
from huggingface_hub.errors import RepositoryNotFoundError

from visd.errors import HubAuthError
from safetensors.torch import load

from tests.conftest import make_tiny_model, phantom_volume
from tests.hub_server import LoopbackHub, loopback_hub  # noqa: F401  (fixture)
from visd import ViSDModel

REPO = "visd-org/pushed"
TOKEN = "test-token"


def folder_bytes(folder: str | Path) -> dict[str, bytes]:
    root = Path(folder)
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def pushed_files(repo_id: str, revision: str, cache: Path) -> dict[str, bytes]:
    """Every file of the repo at ``revision``, downloaded, without the Hub's ``.gitattributes``."""
    files = folder_bytes(snapshot_download(repo_id, revision=revision, cache_dir=cache))
    assert files.pop(".gitattributes").startswith(b"*.safetensors filter=lfs")  # the initial commit's file
    return files


def commit_shas(repo_id: str) -> list[str]:
    return [c.commit_id for c in HfApi().list_repo_commits(repo_id)]


def test_push_then_from_pretrained_gives_the_same_model(
    loopback_hub: LoopbackHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = make_tiny_model(seed=3)
    uploaded: list[dict[str, bytes]] = []  # what push_to_hub hands to the client, read before it uploads
    real_upload_folder = HfApi.upload_folder

    def recording_upload_folder(self: HfApi, **kwargs):
        uploaded.append(folder_bytes(kwargs["folder_path"]))
        return real_upload_folder(self, **kwargs)

    monkeypatch.setattr(HfApi, "upload_folder", recording_upload_folder)

    url = model.push_to_hub(REPO, token=TOKEN)

    sha = HfApi().model_info(REPO).sha
    assert url == f"{loopback_hub.endpoint}/{REPO}/commit/{sha}"
    assert commit_shas(REPO)[0] == sha
    [expected] = uploaded
    assert {"README.md", "config.json", "model.safetensors", "vocab.txt"} <= expected.keys()
    assert pushed_files(REPO, sha, tmp_path / "snap") == expected
    # The weights went through the LFS batch API and a PUT of their sha256; the text files inline.
    weights_oid = hashlib.sha256(expected["model.safetensors"]).hexdigest()
    assert [path for method, path in loopback_hub.requests if method == "PUT"] == [f"/lfs-upload/{REPO}/{weights_oid}"]
    assert ("POST", f"/{REPO}.git/info/lfs/objects/verify") in loopback_hub.requests

    loaded = ViSDModel.from_pretrained(REPO, cache_dir=tmp_path / "cache")

    own, theirs = model.state_dict(), loaded.state_dict()
    assert list(theirs) == list(own)
    assert all(torch.equal(theirs[k], own[k]) for k in own)
    image, mask = phantom_volume()
    torch.testing.assert_close(
        loaded.encode_image(image, mask).embeddings, model.encode_image(image, mask).embeddings,
        rtol=0, atol=0, equal_nan=True,
    )


def test_a_second_push_commits_only_when_content_changed(loopback_hub: LoopbackHub, tmp_path: Path) -> None:
    first, second = make_tiny_model(seed=3), make_tiny_model(seed=4)
    url_a = first.push_to_hub(REPO, token=TOKEN)
    history_a = commit_shas(REPO)
    sha_a = history_a[0]
    files_a = pushed_files(REPO, sha_a, tmp_path / "c")

    # Re-uploading the exact bytes: the preupload oids let the client skip every file; no commit.
    loopback_hub.clear_requests()
    snapshot = snapshot_download(REPO, cache_dir=tmp_path / "c")
    same = HfApi(token=TOKEN).upload_folder(repo_id=REPO, folder_path=snapshot, commit_message="again")
    assert same.oid == sha_a and commit_shas(REPO) == history_a and len(history_a) == 2
    assert not any(path.endswith("/commit/main") or method == "PUT" for method, path in loopback_hub.requests)

    # push_to_hub of the same model again: save_pretrained writes the same bytes, so no new commit
    again = first.push_to_hub(REPO, token=TOKEN)
    files_again = pushed_files(REPO, "main", tmp_path / "c")
    unchanged = files_again == files_a
    assert unchanged and again == url_a
    assert len(commit_shas(REPO)) == 2
    assert {k: v for k, v in files_again.items() if k != "model.safetensors"} == {
        k: v for k, v in files_a.items() if k != "model.safetensors"}
    weights_a, weights_again = load(files_a["model.safetensors"]), load(files_again["model.safetensors"])
    assert weights_again.keys() == weights_a.keys()
    assert all(torch.equal(weights_again[k], weights_a[k]) for k in weights_a)

    # Other weights: a new commit on top, only the weights uploaded, the first commit still downloadable.
    before = commit_shas(REPO)
    loopback_hub.clear_requests()
    url_b = second.push_to_hub(REPO, token=TOKEN, commit_message="retrain")
    history = HfApi().list_repo_commits(REPO)
    assert [c.commit_id for c in history[1:]] == before and history[0].title == "retrain"
    assert history[-1].title == "initial commit" and history[-2].title == "Upload visd model"
    assert url_b == f"{loopback_hub.endpoint}/{REPO}/commit/{history[0].commit_id}"
    assert [method for method, _ in loopback_hub.requests].count("PUT") == 1
    files_b = pushed_files(REPO, "main", tmp_path / "c")
    assert {k for k in files_b if files_b[k] != files_a[k]} == {"model.safetensors"}
    assert all(torch.equal(v, second.state_dict()[k]) for k, v in load(files_b["model.safetensors"]).items())
    assert pushed_files(REPO, sha_a, tmp_path / "c") == files_a


def test_push_without_token_is_refused(loopback_hub: LoopbackHub, tmp_path: Path) -> None:
    # use_loopback_hub unset HF_TOKEN and turned implicit tokens off: token=None sends no credentials.
    assert constants.HF_HUB_DISABLE_IMPLICIT_TOKEN and "HF_TOKEN" not in __import__("os").environ
    model = make_tiny_model(seed=3)

    with pytest.raises(HubAuthError, match=r"refused to write to 'visd-org/no-token' \(HTTP 401\): no token") as new_repo:
        model.push_to_hub("visd-org/no-token")
    assert new_repo.value.__cause__.response.status_code == 401
    assert loopback_hub.requests[0] == ("POST", "/api/repos/create")
    with pytest.raises(RepositoryNotFoundError):
        HfApi().model_info("visd-org/no-token")

    sha = loopback_hub.add_repo(REPO, make_tiny_model(seed=4).save_pretrained(tmp_path / "published"))
    with pytest.raises(HubAuthError, match="HTTP 401") as existing:
        model.push_to_hub(REPO)  # create_repo(exist_ok=True) passes (public repo); the upload is refused
    assert existing.value.__cause__.response.status_code == 401
    assert existing.value.__cause__.response.url.path == f"/api/models/{REPO}/preupload/main"
    assert HfApi().model_info(REPO).sha == sha
    assert not any(path.endswith("/commit/main") for _, path in loopback_hub.requests)
