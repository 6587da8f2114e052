"""What a registered release is: its files, its text encoder, where they are fetched from.

The data of :mod:`visd.pretrained` (which re-exports these names), kept in a leaf module so that the
fetching code (:mod:`visd._fetch`) and the registry can both use it without importing each other.
Standard library only at import time.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from visd.errors import ConfigError

__all__ = ["MARKER_NAME", "MIRROR_ENV", "PretrainedEntry", "ReleaseFile", "TextEncoderSource", "release_url"]

MIRROR_ENV = "VISD_RELEASE_MIRROR"
MARKER_NAME = ".visd-complete.json"  # written last into a converted folder: what it was made from
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # no "/": a name never looks like a Hub repo id
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


# -- entries ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ReleaseFile:
    """One file of a release, downloaded from ``url`` and accepted only with this size and sha256."""

    filename: str
    url: str
    sha256: str
    size: int

    def __post_init__(self) -> None:
        if not self.filename or "/" in self.filename or self.filename.startswith("."):
            raise ConfigError(f"release file name {self.filename!r} is not a plain file name; pass e.g. 'checkpoint.pth'")
        if urlsplit(self.url).scheme not in ("http", "https"):
            raise ConfigError(f"URL of {self.filename} is {self.url!r}; expected an http(s) URL")
        if not _SHA256.match(self.sha256):
            raise ConfigError(f"sha256 of {self.filename} is {self.sha256!r}; expected 64 lower-case hex digits")
        if not isinstance(self.size, int) or self.size <= 0:
            raise ConfigError(f"size of {self.filename} is {self.size!r}; expected its size in bytes (> 0)")


@dataclass(frozen=True)
class TextEncoderSource:
    """The text-encoder folder of a release: files of a Hub repo at a pinned revision.

    Only the tokenizer and config are needed (the text weights are in the release checkpoint);
    ``optional_files`` are taken when the repo has them.
    """

    repo_id: str
    revision: str
    files: tuple[str, ...] = ("config.json", "vocab.txt")
    optional_files: tuple[str, ...] = ("tokenizer_config.json", "special_tokens_map.json")

    def __post_init__(self) -> None:
        if self.repo_id.count("/") != 1 or not all(self.repo_id.split("/")):
            raise ConfigError(f"text-encoder repo id {self.repo_id!r} is not 'org/name'")
        if not self.revision:
            raise ConfigError(f"text encoder {self.repo_id}: pin a revision (a commit hash, a tag or a branch)")
        object.__setattr__(self, "files", tuple(self.files))
        object.__setattr__(self, "optional_files", tuple(self.optional_files))


@dataclass(frozen=True)
class PretrainedEntry:
    """A named pretrained model: an official-format release (converted on first use) and its card text."""

    name: str
    files: tuple[ReleaseFile, ...]  # in conversion order: later files override keys of earlier ones
    text_encoder: TextEncoderSource
    description: str = ""
    license: str = ""
    citation: str = ""
    # ViSDConfig fields of the converted model except ``text`` (read from the text-encoder folder);
    # None: the CT-RATE chest config, as ``ViSDModel.from_official`` uses by default
    config: Mapping | None = None
    size: int = field(init=False)  # bytes of the release files together

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ConfigError(
                f"pretrained model name {self.name!r} is not allowed: use letters, digits, '.', '_' and '-', "
                "starting with a letter or digit (no '/', which would read as a Hub repo id)"
            )
        files = tuple(f if isinstance(f, ReleaseFile) else ReleaseFile(**f) for f in self.files)
        if not files:
            raise ConfigError(f"pretrained model {self.name!r} lists no release files")
        names = [f.filename for f in files]
        if len(set(names)) != len(names):
            raise ConfigError(f"pretrained model {self.name!r} lists a file twice: {names}")
        text = self.text_encoder
        object.__setattr__(self, "files", files)
        object.__setattr__(self, "text_encoder", text if isinstance(text, TextEncoderSource) else TextEncoderSource(**text))
        object.__setattr__(self, "size", sum(f.size for f in files))
        if self.config is not None:
            if "text" in self.config:
                raise ConfigError(f"the config of {self.name!r} sets 'text'; drop it: the text config is read from "
                                  "the text-encoder folder")
            from visd.config import ViSDConfig

            ViSDConfig.from_dict(dict(self.config))  # a typo fails at registration, not after the download
            object.__setattr__(self, "config", json.loads(json.dumps(dict(self.config))))

    def model_config(self, text_encoder: Path):
        """The :class:`~visd.config.ViSDConfig` to convert with (None: the converter's default)."""
        if self.config is None:
            return None
        from visd.config import ViSDConfig
        from visd.models.official import text_config_from_bert

        return ViSDConfig.from_dict({**self.config, "text": text_config_from_bert(text_encoder).model_dump()})

    def fingerprint(self) -> dict:
        """What the converted folder was made from: the content of its completion marker."""
        return {
            "name": self.name,
            "files": [[f.filename, f.sha256, f.size] for f in self.files],
            "text_encoder": [self.text_encoder.repo_id, self.text_encoder.revision],
            "config": self.config,
        }


def release_url(file: ReleaseFile) -> str:
    """The URL a release file is fetched from: its own, or under ``$VISD_RELEASE_MIRROR``."""
    mirror = os.environ.get(MIRROR_ENV, "").strip()
    if not mirror:
        return file.url
    parts = urlsplit(file.url)
    return mirror.rstrip("/") + parts.path + (f"?{parts.query}" if parts.query else "")
