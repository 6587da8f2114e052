"""Conversion of the authors' official ViSD-Boost release into a visd config, state dict and tokenizer.

The release is two PyTorch pickles (``checkpoint_vqvae.pth``, then ``checkpoint.pth``; the second
overrides shared keys) and the BiomedVLP-CXR-BERT-specialized text-encoder folder. Pickles are read
with ``torch.load(weights_only=True)`` only. Known differences to the official key layout:

- the unused MLM head (``text_encoder.cls.*``) and pooler are dropped;
- the ``text_encoder.embeddings.position_ids`` buffer is dropped (newer transformers omit it);
- ``text_encoder.embeddings.token_type_embeddings.weight`` is dropped: the official text path
  adds no token-type embedding, and visd's text tower has none;
- the EMA step count of the codebook, absent from the release, is set so that the released EMA
  state is used as is (no bias correction) if training continues.

:func:`convert_official_release` returns them checked against the config (organ count, no
cross-attention); :meth:`visd.ViSDModel.from_official` builds the model and loads them strictly. This
module imports neither the model class nor :mod:`visd.hub`, so both can use it without a cycle.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from visd.config import TextConfig, ViSDConfig
from visd.errors import CheckpointMismatchError, ConfigError, WeightsNotFoundError

__all__ = [
    "convert_official_release",
    "convert_official_state_dict",
    "read_official_checkpoints",
    "text_config_from_bert",
]

logger = logging.getLogger(__name__)

_RENAMES: tuple[tuple[str, str], ...] = (
    ("visual_encoder.res_model.", "vision.backbone."),
    ("visual_encoder.", "vision."),
    ("text_encoder.", "text.bert."),
    ("text_proj.", "text.proj."),
    ("id_projs.", "normality.condition."),
    ("encoder.", "normality.encoder."),
    ("decoder.", "normality.decoder."),
    ("vq_layer.", "normality.quantizer."),
    ("query_tokens", "pooling.query_tokens"),
    ("attention.", "pooling.attention."),
    ("res_projs1.", "pooling.fuse1."),
    ("res_projs2.", "pooling.fuse2."),
    ("vision_projs.", "pooling.project."),
    ("temp", "temperature"),
)
_DROPPED = (
    re.compile(r"^text_encoder\.cls\."),
    re.compile(r"^text_encoder\.pooler\."),
    re.compile(r"^text_encoder\.embeddings\.position_ids$"),
    re.compile(r"^text_encoder\.embeddings\.token_type_embeddings\.weight$"),
)
# the released EMA state is taken as already bias-corrected: (1 - decay**steps) == 1 in float32
_EMA_STEPS_TRAINED = 1 << 20


def _rename(key: str) -> str:
    for old, new in _RENAMES:
        if key == old or (old.endswith(".") and key.startswith(old)):
            return new + key[len(old) :] if old.endswith(".") else new
    return key


def read_official_checkpoints(paths: Sequence[str | Path]) -> dict[str, torch.Tensor]:
    """Merge the official ``.pth`` files in order (later files override earlier keys)."""
    if not paths:
        raise WeightsNotFoundError("no official checkpoint given; pass [checkpoint_vqvae.pth, checkpoint.pth]")
    merged: dict[str, torch.Tensor] = {}
    for path in map(Path, paths):
        if not path.is_file():
            raise WeightsNotFoundError(f"official checkpoint not found: {path}")
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises several types for corrupt or unsafe pickles
            raise CheckpointMismatchError(
                f"cannot read official checkpoint {path}: {e}. Expected a dict saved by torch.save holding "
                "tensors under 'model'; visd reads pickles only with weights_only=True."
            ) from e
        state = obj.get("model", obj) if isinstance(obj, dict) else None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointMismatchError(
                f"{path} does not hold a state dict (a dict of tensors, under 'model' in the official release)"
            )
        if state and all(k.startswith("module.") for k in state):
            state = {k[len("module.") :]: v for k, v in state.items()}
        merged.update(state)
        logger.info("read %d tensors from %s", len(state), path)
    return merged


def convert_official_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map official keys to visd keys, dropping the known-unused entries (see module docstring)."""
    cross = [k for k in state if ".crossattention." in k]
    if cross:
        raise CheckpointMismatchError(
            f"the official text encoder has cross-attention layers ({cross[0]}, {len(cross)} keys): a BLIP-style "
            "fusion_layer text config that visd does not support. The released ViSD-Boost checkpoint has none; "
            "check that this is the right file."
        )
    out = {}
    for key, value in state.items():
        if any(p.search(key) for p in _DROPPED):
            continue
        out[_rename(key)] = value
    if "normality.quantizer.ema_steps" not in out:
        hidden = out.get("normality.quantizer.ema_cluster_size.hidden")
        trained = hidden is not None and bool(hidden.abs().sum() > 0)
        out["normality.quantizer.ema_steps"] = torch.tensor(_EMA_STEPS_TRAINED if trained else 0)
    return out


_BERT_FIELDS = set(TextConfig.model_fields) - {"do_lower_case", "max_length"}


def text_config_from_bert(folder: str | Path) -> TextConfig:
    """A :class:`TextConfig` from a Hugging Face BERT folder's ``config.json``."""
    path = Path(folder) / "config.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise WeightsNotFoundError(
            f"cannot read the text encoder config {path}: {e}. Pass the BiomedVLP-CXR-BERT-specialized folder "
            "(config.json, vocab.txt)."
        ) from e
    if data.get("add_cross_attention") or data.get("fusion_layer") is not None:
        raise ConfigError(
            f"{path} asks for cross-attention (add_cross_attention / fusion_layer); visd's text tower is a plain BERT"
        )
    return TextConfig(**{k: v for k, v in data.items() if k in _BERT_FIELDS})


def _organ_count(state: dict[str, torch.Tensor]) -> int | None:
    q = state.get("query_tokens")
    return int(q.shape[0]) if q is not None else None


def convert_official_release(
    checkpoints: Sequence[str | Path], text_encoder: str | Path, *, config: ViSDConfig | None = None
) -> tuple[ViSDConfig, dict[str, torch.Tensor], Any]:
    """The official release as ``(config, state_dict, tokenizer)``, converted to visd's key layout.

    Args:
        checkpoints: official ``.pth`` files applied in order, e.g. ``[checkpoint_vqvae.pth, checkpoint.pth]``.
        text_encoder: the CXR-BERT folder (``config.json``, ``vocab.txt``).
        config: the model config; default: the CT-RATE chest config with the folder's text config.

    The tokenizer is read here, with ``config.text`` (lower-casing, length), so it always matches the
    config returned. The organ count of the checkpoint is checked against the config; key names and
    shapes are checked when the caller loads ``state_dict`` strictly (``ViSDModel.from_official``).
    """
    from visd.models.text import load_tokenizer

    state = read_official_checkpoints(checkpoints)
    text = text_config_from_bert(text_encoder)
    if config is None:
        config = ViSDConfig(text=text)
    n = _organ_count(state)
    if n is not None and n != len(config.organs):
        raise CheckpointMismatchError(
            f"the checkpoint has {n} organ queries but the config has {len(config.organs)} organs "
            f"{list(config.organs)}; pass a config with the checkpoint's organs"
        )
    return config, convert_official_state_dict(state), load_tokenizer(text_encoder, config.text)


def official_keys(path: str | Path) -> Iterable[str]:
    """Keys of an official key manifest (``key<TAB>shape<TAB>dtype<TAB>kind``)."""
    lines = Path(path).read_text().splitlines()[1:]
    return [line.split("\t")[0] for line in lines if line]
