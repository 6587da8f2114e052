"""docs/getting_a_model.md runs as written, against the loopback Hub and release servers.

The tiny official-format release is registered under the built-in name, so the doc's
``from_pretrained("visd-boost-ctrate")`` downloads, verifies and converts it for real.
"""

from __future__ import annotations

import torch

import visd.pretrained as pretrained
from tests.test_docs import python_blocks, run_blocks


def test_getting_a_model(release_site, monkeypatch, tmp_path):
    from huggingface_hub import constants

    release_site.register(pretrained.DEFAULT_MODEL, overwrite=True)
    monkeypatch.setenv("HF_TOKEN", "hf_loopback")  # as after `hf auth login`: push_to_hub finds it
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_IMPLICIT_TOKEN", False)
    work = tmp_path / "work"
    work.mkdir()
    ns = run_blocks("getting_a_model.md", work)

    assert pretrained.cached_folder("visd-boost-ctrate") == release_site.home / "pretrained" / "visd-boost-ctrate"
    assert "lab-chest-v2" in pretrained.list_pretrained()
    assert any(p.endswith("/checkpoint.pth") for host, _, p, _ in release_site.release.requests if host == "media")
    state, again = ns["model"].state_dict(), ns["again"].state_dict()
    assert state.keys() == again.keys() and all(torch.equal(state[k], again[k]) for k in state)
    pushed = [path for method, path in release_site.hub.requests if method == "POST" and "/commit/" in path]
    assert pushed == ["/api/models/my-lab/visd-boost-ctrate/commit/main"]


def test_the_doc_shows_the_real_entry():
    text = "\n".join(python_blocks("getting_a_model.md"))
    entry = pretrained.get_pretrained("visd-boost-ctrate")
    assert entry.text_encoder.revision in text
    doc = (pretrained.Path(__file__).resolve().parents[2] / "docs" / "getting_a_model.md").read_text()
    for f in entry.files:
        assert f"`{f.filename}` | {f.size:,}" in doc
