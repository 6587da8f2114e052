"""A tiny official-format release behind loopback servers, registered under its real sha256 and size.

The release is built from ``official_keys_tiny.tsv`` + ``gen_weights.py`` with the key shapes of the tiny
test config (a narrow ResNet, a 16-row codebook; the tiny_text BERT), so its files are a few MB. It is split
like the real one: ``checkpoint_vqvae.pth`` holds the normality VQ-VAE (and a stale copy of the organ
queries that the second file overrides, so the conversion order matters), ``checkpoint.pth`` the rest.
The text encoder is served by :class:`hub_server.LoopbackHub`, the checkpoints by
:class:`release_server.LoopbackRelease` with GitHub's redirect to its media host.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests.conftest import OFFICIAL, load_gen_weights, tiny_config
from tests.hub_server import LoopbackHub, use_loopback_hub
from tests.release_server import LoopbackRelease

TINY_NAME = "visd-tiny-release"
TEXT_REPO = "visd-test/tiny-cxr-bert"
RELEASE_PATH = "/visd-test/tiny-release/raw/0123abc"
_VQVAE_PREFIXES = ("id_projs.", "encoder.", "decoder.", "vq_layer.")


def tiny_release_config() -> dict:
    """ViSDConfig fields of the tiny release, ``text`` excluded (it comes from the text-encoder folder)."""
    config = tiny_config().model_dump(mode="json")
    del config["text"]
    return config


def _tiny_keys_tsv(path: Path) -> Path:
    """``official_keys_tiny.tsv`` with the shapes of the tiny config; rows the tiny model lacks are left out."""
    from visd.config import ViSDConfig
    from visd.models.model import ViSDModel
    from visd.models.official import _DROPPED, _rename, text_config_from_bert

    config = ViSDConfig.model_validate({**tiny_release_config(), "text": text_config_from_bert(OFFICIAL / "tiny_text")})
    shapes = {k: tuple(v.shape) for k, v in ViSDModel(config).state_dict().items()}
    lines = (OFFICIAL / "official_keys_tiny.tsv").read_text().splitlines()
    out = [lines[0]]
    for line in lines[1:]:
        key, shape, *rest = line.split("\t")
        if any(p.search(key) for p in _DROPPED):
            out.append(line)
        elif (new := shapes.get(_rename(key))) is not None:
            out.append("\t".join([key, "x".join(map(str, new)) if new else "scalar", *rest]))
    path.write_text("\n".join(out) + "\n")
    return path


def _pth_bytes(state: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save({"model": state}, buffer)
    return buffer.getvalue()


@dataclass(frozen=True)
class TinyRelease:
    files: dict[str, bytes]  # filename -> bytes, in conversion order
    folder: Path  # the same files on disk, for ViSDModel.from_official

    def registered(self, base_url: str) -> list[dict]:
        return [{"filename": name, "url": f"{base_url}{RELEASE_PATH}/{name}", "sha256": hashlib.sha256(data).hexdigest(),
                 "size": len(data)} for name, data in self.files.items()]


@pytest.fixture(scope="session")
def tiny_release(tmp_path_factory) -> TinyRelease:
    folder = tmp_path_factory.mktemp("tiny-release")
    state = load_gen_weights().build_state_dict(_tiny_keys_tsv(folder / "keys.tsv"), seed=0)
    vqvae = {k: v for k, v in state.items() if k.startswith(_VQVAE_PREFIXES)}
    vqvae["query_tokens"] = torch.zeros_like(state["query_tokens"])  # stale: checkpoint.pth overrides it
    main = {k: v for k, v in state.items() if not k.startswith(_VQVAE_PREFIXES)}
    files = {"checkpoint_vqvae.pth": _pth_bytes(vqvae), "checkpoint.pth": _pth_bytes(main)}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return TinyRelease(files, folder)


@dataclass
class ReleaseSite:
    hub: LoopbackHub
    release: LoopbackRelease
    tiny: TinyRelease
    home: Path  # VISD_HOME
    text_revision: str

    def register(self, name: str = TINY_NAME, *, files: list[dict] | None = None, **changes):
        import visd

        fields = {"description": "tiny official-format release for tests", "license": "test licence",
                  "citation": "test citation", "config": tiny_release_config()} | changes
        return visd.register_pretrained(
            name,
            files=files if files is not None else self.tiny.registered(self.release.endpoint),
            text_encoder={"repo_id": TEXT_REPO, "revision": self.text_revision},
            **fields,
        )

    def requests(self) -> list:
        return self.hub.requests + self.release.requests

    def clear_requests(self) -> None:
        self.hub.clear_requests()
        self.release.clear_requests()


@pytest.fixture
def release_site(tiny_release, monkeypatch, tmp_path):
    """Both servers started, huggingface_hub pointed at the Hub emulator, VISD_HOME in ``tmp_path``, and
    the tiny release registered as ``visd-tiny-release`` (the registry is restored after the test)."""
    import visd.pretrained

    monkeypatch.setattr(visd.pretrained, "_REGISTRY", dict(visd.pretrained._REGISTRY))
    monkeypatch.setenv("VISD_HOME", str(tmp_path / "visd-home"))
    monkeypatch.delenv("VISD_RELEASE_MIRROR", raising=False)
    with LoopbackHub() as hub, LoopbackRelease() as release:
        use_loopback_hub(monkeypatch, hub, cache_dir=tmp_path / "hf-cache")
        revision = hub.add_repo(TEXT_REPO, OFFICIAL / "tiny_text")
        for name, data in tiny_release.files.items():
            release.add_file(f"{RELEASE_PATH}/{name}", data)
        site = ReleaseSite(hub, release, tiny_release, tmp_path / "visd-home", revision)
        site.register()
        yield site
    from huggingface_hub import close_session

    close_session()
