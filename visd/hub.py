"""Saving and loading visd models: local folders, the Hugging Face Hub and its offline cache.

A model folder holds ``config.json`` (the :class:`~visd.config.ViSDConfig`, preprocessing spec and
organ list included), ``model.safetensors``, the tokenizer files and a ``README.md`` model card.
Loading is strict: weights that do not fit the config raise :class:`CheckpointMismatchError`.

This module never imports the model class (timm's ``build_model_with_cfg(model_cls, ...)``): loading is
handed the class, ``from_pretrained(ViSDModel, source)``, and saving the instance, so the model can
delegate here without an import cycle. Saving needs of the instance only ``state_dict()``, ``config``
and ``tokenizer``.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TypeVar

import torch

from visd import pretrained
from visd._io import atomic_path
from visd.config import ViSDConfig
from visd.errors import (
    CheckpointMismatchError,
    ConfigError,
    HubAuthError,
    WeightsNotFoundError,
    did_you_mean,
)

__all__ = ["from_pretrained", "load_state_dict_strict", "push_to_hub", "resolve_source", "save_pretrained"]

logger = logging.getLogger(__name__)

M = TypeVar("M", bound=torch.nn.Module)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
_HUB_FILES = [CONFIG_NAME, WEIGHTS_NAME, CARD_NAME, "vocab.txt", "tokenizer_config.json", "special_tokens_map.json",
              "tokenizer.json"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# -- strict loading ---------------------------------------------------------------------------------
def load_state_dict_strict(model: torch.nn.Module, state: Mapping[str, torch.Tensor], *, source: str) -> None:
    """Load ``state`` into ``model``; any missing, unexpected or mis-shaped key raises, listing them."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)}, model {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        hints = []
        if unexpected and all(k.startswith("module.") for k in unexpected):
            hints.append("the checkpoint keys carry a 'module.' prefix (saved from DDP): strip it")
        if any(k.endswith("position_ids") for k in unexpected):
            hints.append("a legacy position_ids buffer is present: drop it")
        if shapes or (missing and unexpected):
            hints.append("the config may differ from the one the weights were trained with")
        parts = [f"weights from {source} do not fit the model"]
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
            if keys:
                more = f" (+{len(keys) - 5} more)" if len(keys) > 5 else ""
                parts.append(f"{len(keys)} {label}: {', '.join(keys[:5])}{more}")
        raise CheckpointMismatchError("; ".join(parts) + (". Hint: " + "; ".join(hints) if hints else ""))
    model.load_state_dict(dict(state), strict=True)


# -- writing ----------------------------------------------------------------------------------------
def _model_card(model: torch.nn.Module) -> str:
    from visd.model_card import model_card

    return model_card(model.config)


def _atomic_write(path: Path, write) -> None:
    with atomic_path(path) as tmp:
        write(str(tmp))


def save_pretrained(model: torch.nn.Module, folder: str | Path) -> Path:
    """Write the folder of ``model`` (a :class:`~visd.ViSDModel`); each file is written atomically."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    # one metadata key: safetensors writes the map in hash order, so two keys would make the bytes vary
    # from save to save and push_to_hub of an unchanged model would upload a new commit
    _atomic_write(folder / WEIGHTS_NAME, lambda p: save_file(state, p, metadata={"format": "pt"}))
    _atomic_write(folder / CONFIG_NAME, lambda p: Path(p).write_text(model.config.to_json()))
    if model.tokenizer is not None:
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            model.tokenizer.save_pretrained(tmp)
            vocab = sorted(model.tokenizer.get_vocab().items(), key=lambda kv: kv[1])
            if not (Path(tmp) / "vocab.txt").exists():  # transformers 5 writes only tokenizer.json
                (Path(tmp) / "vocab.txt").write_text("".join(tok + "\n" for tok, _ in vocab))
            for f in Path(tmp).iterdir():
                os.replace(f, folder / f.name)
    _atomic_write(folder / CARD_NAME, lambda p: Path(p).write_text(_model_card(model)))
    return folder


# -- resolving and reading ---------------------------------------------------------------------------
def _looks_like_path(source: str) -> bool:
    return (
        source.startswith(("/", ".", "~"))
        or "\\" in source
        or source.count("/") != 1
        or source.endswith("/")
        or not _REPO_ID.match(source)
    )


def resolve_source(
    model_cls: type[torch.nn.Module],
    source: str | Path,
    *,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
) -> Path:
    """The local folder holding the model files (``model_cls`` converts a registered release on first use).

    Precedence: an existing local folder; then a registered name (:func:`visd.list_pretrained`),
    converted into the visd cache on first use (``cache_dir`` is then the visd cache root); then a
    Hugging Face Hub repo id ``org/name`` (a snapshot in the HF cache, ``cache_dir`` its location).
    A name never shadows a folder; names hold no ``/``, so they never read as repo ids either.
    """
    path = Path(os.path.expanduser(str(source)))
    if path.is_dir():
        return path
    text = str(source)
    if not isinstance(source, Path) and text in pretrained.list_pretrained():
        if revision is not None:
            raise ConfigError(
                f"revision={revision!r} was passed with the registered name {text!r}, whose files are pinned by its "
                "registry entry. Drop revision, or pass a Hub repo id ('org/name') to pick a revision."
            )
        return pretrained.resolve_pretrained(model_cls, text, cache_dir=cache_dir, local_files_only=local_files_only)
    if isinstance(source, Path) or _looks_like_path(text):
        names = pretrained.list_pretrained()
        raise WeightsNotFoundError(
            f"model folder not found: {text!r}.{did_you_mean(text, names)} Pass an existing folder written by "
            f"save_pretrained, a registered name ({', '.join(names)}; see visd.list_pretrained()), "
            "or a Hugging Face Hub repo id like 'org/name'."
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    try:
        folder = snapshot_download(
            repo_id=text,
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            allow_patterns=_HUB_FILES,
        )
    except RepositoryNotFoundError as e:
        raise WeightsNotFoundError(
            f"no Hugging Face Hub repo {text!r} (and no local folder of that name). Check the repo id, "
            "revision and your access token."
        ) from e
    except LocalEntryNotFoundError as e:
        raise WeightsNotFoundError(
            f"{text!r} is not in the Hugging Face cache and downloading is off (offline mode or "
            "local_files_only=True). Download it once while online, or pass a local folder."
        ) from e
    except (HfHubHTTPError, OSError) as e:
        raise WeightsNotFoundError(f"could not download {text!r} from the Hugging Face Hub: {e}") from e
    return Path(folder)


def from_pretrained(
    model_cls: type[M],
    source: str | Path,
    *,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> M:
    """A ``model_cls(config, tokenizer=...)`` loaded strictly from a folder, registered name or Hub repo; eval mode.

    ``model_cls`` is :class:`~visd.ViSDModel` (``ViSDModel.from_pretrained`` passes itself); see
    :func:`resolve_source` for how ``source`` is found.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from visd.models.text import load_tokenizer

    folder = resolve_source(
        model_cls, source, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only
    )
    if not (folder / CONFIG_NAME).is_file():
        raise WeightsNotFoundError(f"{folder} has no {CONFIG_NAME}: not a visd model folder (see save_pretrained)")
    if not (folder / WEIGHTS_NAME).is_file():
        raise WeightsNotFoundError(f"{folder} has no {WEIGHTS_NAME}: the weights are missing from the model folder")
    config = ViSDConfig.from_file(folder / CONFIG_NAME)
    try:
        state = load_file(str(folder / WEIGHTS_NAME), device="cpu")
    except (SafetensorError, OSError) as e:
        raise CheckpointMismatchError(f"cannot read {folder / WEIGHTS_NAME}: {e}. The file is damaged; download or save it again.") from e
    tokenizer = load_tokenizer(folder, config.text) if (folder / "vocab.txt").is_file() else None
    if tokenizer is None:
        logger.warning("%s has no vocab.txt: the model can encode images but not text", folder)
    model = model_cls(config, tokenizer=tokenizer)
    load_state_dict_strict(model, state, source=str(folder / WEIGHTS_NAME))
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    return model.eval()


def push_to_hub(
    model: torch.nn.Module,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str = "Upload visd model",
) -> str:
    """Create ``repo_id`` if needed and upload the :func:`save_pretrained` folder; returns the commit URL."""
    from huggingface_hub import HfApi

    if not _REPO_ID.match(repo_id):
        raise ConfigError(f"invalid Hub repo id {repo_id!r}: expected 'org/name'")
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            save_pretrained(model, tmp)
            info = api.upload_folder(repo_id=repo_id, folder_path=tmp, revision=revision, commit_message=commit_message)
    except HfHubHTTPError as e:  # the Hub may also answer a refused write with RepositoryNotFoundError
        status = e.response.status_code if e.response is not None else None
        if status not in (401, 403):
            raise
        sent = "the token passed" if token is not None else "no token was passed and the stored one (if any)"
        raise HubAuthError(
            f"the Hugging Face Hub refused to write to {repo_id!r} (HTTP {status}): {sent} gives no write access "
            "to it. Pass token='hf_...' with write access to that namespace, or log in with `hf auth login`."
        ) from e
    return str(getattr(info, "commit_url", info))

