"""Named pretrained models: a registry of releases, fetched, verified and converted once on first use.

An entry is data (:class:`PretrainedEntry`): the release files in conversion order, each with its URL,
sha256 and size, the Hub text-encoder repo pinned to a revision, and a description, licence and citation
for the model card. ``ViSDModel.from_pretrained("visd-boost-ctrate")`` turns a name into a converted
visd folder in the cache (:func:`fetch_pretrained`); later calls load that folder with no request.

Where things live, ``<root>`` being ``$VISD_HOME`` or else ``<huggingface_hub assets cache>/visd``
(``~/.cache/huggingface/assets/visd`` by default; ``HF_HOME`` / ``HF_ASSETS_CACHE`` move it):

- ``<root>/pretrained/<name>/``: the converted folder (``config.json``, ``model.safetensors``, tokenizer
  files, ``README.md``) and, written last, the completion marker ``.visd-complete.json``. The folder is
  built beside it in ``.<name>.tmp-*`` and renamed into place, so it either is complete or is absent.
- ``<root>/downloads/<name>/``: the release files while they download (``<file>.part`` until size and
  sha256 match); deleted once the conversion succeeded.
- the text-encoder files: in the huggingface_hub cache, as ``hf_hub_download`` puts them.

``VISD_RELEASE_MIRROR`` (a base URL) replaces the scheme and host of every release URL and keeps its path:
``https://github.com/alibaba-damo-academy/ViSD-Boost/raw/42d18a9/checkpoint.pth`` is fetched from
``$VISD_RELEASE_MIRROR/alibaba-damo-academy/ViSD-Boost/raw/42d18a9/checkpoint.pth``. ``HF_ENDPOINT``
does the same for the Hub files. This module imports only the standard library (and visd's own
:mod:`visd._release`, where the entry types live) at import time.

Converting needs the model class, which is handed in (``fetch_pretrained(ViSDModel, name)``, as
:func:`visd.hub.from_pretrained` does): neither this module nor :mod:`visd._fetch` imports it, so the
model loads through them without an import cycle.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path

from visd._release import (
    MARKER_NAME,
    MIRROR_ENV,
    PretrainedEntry,
    ReleaseFile,
    TextEncoderSource,
    release_url,
)
from visd.errors import ConfigError, WeightsNotFoundError, did_you_mean

__all__ = [
    "DEFAULT_MODEL",
    "MARKER_NAME",
    "MIRROR_ENV",
    "PretrainedEntry",
    "ReleaseFile",
    "TextEncoderSource",
    "cache_folder",
    "cache_root",
    "cached_folder",
    "fetch_pretrained",
    "get_pretrained",
    "list_pretrained",
    "register_pretrained",
    "release_url",
    "resolve_pretrained",
]

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "visd-boost-ctrate"
HOME_ENV = "VISD_HOME"


# -- the registry -----------------------------------------------------------------------------------
_REGISTRY: dict[str, PretrainedEntry] = {}


def register_pretrained(
    name: str,
    *,
    files: Iterable[ReleaseFile | Mapping],
    text_encoder: TextEncoderSource | Mapping,
    description: str = "",
    license: str = "",
    citation: str = "",
    config: Mapping | None = None,
    overwrite: bool = False,
) -> PretrainedEntry:
    """Add a named model to the registry; returns its entry.

    Args:
        name: the name for :meth:`ViSDModel.from_pretrained` (letters, digits, ``.``, ``_``, ``-``).
        files: the official-format checkpoints in conversion order, each a :class:`ReleaseFile` or a
            mapping with ``filename``, ``url``, ``sha256``, ``size``.
        text_encoder: a :class:`TextEncoderSource` or a mapping with ``repo_id``, ``revision`` (and
            optionally ``files``, ``optional_files``).
        description, license, citation: written into the converted folder's model card.
        config: :class:`~visd.config.ViSDConfig` fields of the model (organs, sizes, findings, ...) except
            ``text``, which comes from the text-encoder folder; None for the CT-RATE chest config.
        overwrite: replace an entry of the same name (a folder converted from other files is then
            not used: the cache marker records what it was made from).
    """
    entry = PretrainedEntry(name, tuple(files), text_encoder, description, license, citation, config)  # type: ignore[arg-type]
    if name in _REGISTRY and not overwrite:
        raise ConfigError(f"a pretrained model named {name!r} is registered already; pass overwrite=True to replace it")
    _REGISTRY[name] = entry
    return entry


def list_pretrained() -> list[str]:
    """The names of the registered pretrained models, sorted."""
    return sorted(_REGISTRY)


def get_pretrained(name: str) -> PretrainedEntry:
    """The registry entry of ``name``; an unknown name raises with the closest match."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise WeightsNotFoundError(
            f"no pretrained model named {name!r}.{did_you_mean(name, _REGISTRY)} Registered: "
            f"{', '.join(list_pretrained()) or 'none'} (visd.list_pretrained()); add one with visd.register_pretrained."
        ) from None


# -- the built-in release ---------------------------------------------------------------------------
_VISD_BOOST = "https://github.com/alibaba-damo-academy/ViSD-Boost/raw/42d18a9"
register_pretrained(
    DEFAULT_MODEL,
    files=[
        ReleaseFile("checkpoint_vqvae.pth", f"{_VISD_BOOST}/checkpoint_vqvae.pth",
                    "8372bc41cce2a38e56ef7d0dde6e7ee95294133ed7b56d8d5a6d63af933d65a1", 411_456_526),
        ReleaseFile("checkpoint.pth", f"{_VISD_BOOST}/checkpoint.pth",
                    "3edccbd1b9a6349cc4a56f2ea74ac4f2728850e389eaaff802971c698c2dba02", 1_726_637_998),
    ],
    # The revision is the commit of the Hub repo that appears as the huggingface_hub snapshot folder
    # (models--microsoft--BiomedVLP-CXR-BERT-specialized/snapshots/<commit>) in the public CT-CLIP-based
    # code whose text encoder this release uses; it was not re-checked against the Hub from here.
    text_encoder=TextEncoderSource("microsoft/BiomedVLP-CXR-BERT-specialized", "f1cc2c6b7fac60f3724037746a129a5baf194dbc"),
    description=(
        "ViSD-Boost trained on CT-RATE (chest CT; organs lung, heart, esophagus, aorta): the authors' official "
        "release (GitHub alibaba-damo-academy/ViSD-Boost, commit 42d18a9), converted to visd on first use."
    ),
    license=(
        "No licence is stated in the ViSD-Boost repository (commit 42d18a9): ask the authors before redistributing "
        "the weights. Text encoder microsoft/BiomedVLP-CXR-BERT-specialized: MIT."
    ),
    citation=(
        "Cao W, Zhang J, Shui Z, Wang S, Chen Z, Li X, Lu L, Ye X, Zhang Q, Liang T, et al. Boosting vision semantic "
        "density with anatomy normality modeling for medical vision-language pre-training. ICCV 2025, 23041-23050."
    ),
)


# -- the cache --------------------------------------------------------------------------------------
def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir``, else ``$VISD_HOME``, else ``visd`` in huggingface_hub's assets cache."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get(HOME_ENV):
        return Path(os.environ[HOME_ENV]).expanduser()
    from huggingface_hub import constants

    return Path(constants.HF_ASSETS_CACHE).expanduser() / "visd"


def cache_folder(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the converted folder of the named model lives, complete or not (nothing is created)."""
    return cache_root(cache_dir) / "pretrained" / get_pretrained(name).name


def cached_folder(name: str, cache_dir: str | os.PathLike | None = None) -> Path | None:
    """The converted folder of ``name`` if it is complete and made from the registered files, else None.

    Reads the disk only: no network request.
    """
    entry = get_pretrained(name)
    folder = cache_folder(name, cache_dir)
    try:
        marker = json.loads((folder / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None
    if marker != entry.fingerprint():
        logger.info("%s was converted from other files than the registered %r; it is not used", folder, name)
        return None
    if not ((folder / "config.json").is_file() and (folder / "model.safetensors").is_file()):
        return None
    return folder


# -- fetching ---------------------------------------------------------------------------------------
def fetch_pretrained(
    model_cls: type, name: str, *, cache_dir: str | os.PathLike | None = None, progress: bool = True
) -> Path:
    """The converted folder of the named model, downloaded, verified and converted on first use.

    Args:
        model_cls: the model class that converts the release (:class:`visd.ViSDModel`: its
            ``from_official`` loads strictly, its ``save_pretrained`` writes the folder).
        name: a registered name (:func:`list_pretrained`).
        cache_dir: the cache root instead of ``$VISD_HOME`` / the huggingface_hub assets cache.
        progress: show download progress bars.

    A complete folder in the cache is returned with no network request. Otherwise the text-encoder
    files come from the Hub (``hf_hub_download``: ``HF_ENDPOINT``, ``HF_HUB_OFFLINE`` and the HF cache
    apply), the release files from their URLs (or ``$VISD_RELEASE_MIRROR``), each checked against its
    size and sha256, and the conversion is written to a temporary folder that is renamed into place
    only when complete. Raises :class:`~visd.errors.WeightsNotFoundError` naming the files, their sizes
    and the manual route when they cannot be fetched.
    """
    from filelock import FileLock

    from visd._fetch import convert_release, fetch_release, fetch_text_encoder

    entry = get_pretrained(name)
    done = cached_folder(name, cache_dir)
    if done is not None:
        return done
    final = cache_folder(name, cache_dir)
    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final.parent / f".{entry.name}.lock")):
        done = cached_folder(name, cache_dir)  # another process may have finished meanwhile
        if done is not None:
            return done
        for pattern in (f".{entry.name}.tmp-*", f".{entry.name}.old-*"):  # left by a killed conversion
            for stale in final.parent.glob(pattern):
                shutil.rmtree(stale, ignore_errors=True)
        downloads = cache_root(cache_dir) / "downloads" / entry.name
        logger.info("fetching %s (%s bytes) into %s", entry.name, f"{entry.size:,}", final)
        text_encoder = fetch_text_encoder(entry)
        checkpoints = fetch_release(entry, downloads, progress)
        convert_release(model_cls, entry, checkpoints, text_encoder, final)
        shutil.rmtree(downloads, ignore_errors=True)
    return final


def resolve_pretrained(
    model_cls: type, name: str, *, cache_dir: str | os.PathLike | None = None, local_files_only: bool = False
) -> Path:
    """The folder of a registered name for loading: the cached one, or else fetched and converted with
    ``model_cls`` (:func:`fetch_pretrained`) unless ``local_files_only``."""
    done = cached_folder(name, cache_dir)
    if done is not None:
        return done
    if local_files_only:
        raise WeightsNotFoundError(
            f"the pretrained model {name!r} is not in the visd cache ({cache_folder(name, cache_dir)}) and "
            "local_files_only=True. Load it once without local_files_only (it downloads "
            f"{get_pretrained(name).size:,} bytes and converts them), or pass a converted folder."
        )
    return fetch_pretrained(model_cls, name, cache_dir=cache_dir)
