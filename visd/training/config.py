"""Training settings: a strict, frozen pydantic :class:`TrainConfig`, read from YAML.

Separate from :class:`visd.config.ViSDConfig` (which describes the model and travels with the
weights). Unknown keys are errors with a did-you-mean hint; relative paths in a YAML file are
resolved against the file's folder. Defaults follow fVLM's CT-RATE recipe where it is known
(AdamW, lr 1e-4 -> 1e-6 cosine, 20 epochs, batch 14 per GPU, weight decay 0.05); see
``docs/training.md`` for every field.
"""

from __future__ import annotations

import json
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from visd.config import ViSDConfig
from visd.errors import ConfigError, did_you_mean

__all__ = [
    "OBJECTIVES",
    "MODULE_GROUPS",
    "ModelSource",
    "DataConfig",
    "StageConfig",
    "TrainConfig",
    "lr_factor",
]

Objective = Literal["alignment", "disease", "normality"]
ModuleGroup = Literal["vision", "normality", "pooling", "text", "temperature"]
OBJECTIVES: tuple[str, ...] = typing.get_args(Objective)
MODULE_GROUPS: tuple[str, ...] = typing.get_args(ModuleGroup)

#: Module groups each objective runs through (and can therefore train).
USED_GROUPS: dict[str, tuple[str, ...]] = {
    "alignment": ("vision", "normality", "pooling", "text", "temperature"),
    "disease": ("vision", "normality", "pooling"),
    "normality": ("normality",),
}


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSource(_Config):
    """Where the model comes from: exactly one of ``pretrained`` and ``config``.

    Attributes:
        pretrained: a :meth:`ViSDModel.from_pretrained` source (a model folder or a Hub repo id).
        config: a ViSDConfig ``config.json`` path or an inline dict: build a new, randomly
            initialised model (training from scratch).
        tokenizer: with ``config``, the folder holding the tokenizer (``vocab.txt``); needed by the
            alignment objective.
    """

    pretrained: str | None = None
    config: str | dict[str, Any] | None = None
    tokenizer: str | None = None

    @model_validator(mode="after")
    def _check(self) -> "ModelSource":
        if (self.pretrained is None) == (self.config is None):
            raise ValueError(
                f"model needs exactly one of 'pretrained' (a model folder) and 'config' (a ViSDConfig for training "
                f"from scratch): got pretrained={self.pretrained!r}, config={'<set>' if self.config else None}"
            )
        if self.pretrained is not None and self.tokenizer is not None:
            raise ValueError(
                f"model.tokenizer ({self.tokenizer!r}) is only for model.config; a pretrained folder brings its own"
            )
        if isinstance(self.config, dict):
            ViSDConfig.from_dict(self.config)  # fail early, with the model config's own message
        return self


class DataConfig(_Config):
    """The training data: a manifest (see ``docs/training.md``) and the preprocessing cache.

    Attributes:
        manifest: CSV or JSONL manifest; relative image paths are relative to its folder.
        cache_dir: where preprocessed cases are cached (default ``<output_dir>/cache``).
        cache_dtype: ``float16`` halves the cache size (images rounded to ~1e-3).
        mask_format: how organ masks are read (:func:`visd.data.load_case`).
        num_workers: DataLoader worker processes per training process.
        pin_memory: pin batches in page-locked memory (only used on CUDA).
        flip_prob: probability of a flip along each axis (fVLM: 0.2).
    """

    manifest: str
    cache_dir: str | None = None
    cache_dtype: Literal["float32", "float16"] = "float32"
    mask_format: Literal["auto", "visd", "totalsegmentator"] = "auto"
    num_workers: int = Field(4, ge=0)
    pin_memory: bool = True
    flip_prob: float = Field(0.2, ge=0.0, le=1.0)


class StageConfig(_Config):
    """One stage of the pipeline: its objectives and optimisation schedule.

    Attributes:
        objectives: any of ``alignment`` (anatomy-level image-report), ``disease`` (disease-level
            vision contrastive with a momentum encoder), or ``normality`` alone (the VQ-VAE on
            normal organs, vision encoder frozen).
        loss_weights: per objective weight of the summed loss (default 1).
        freeze: module groups not trained. Default: ``[normality]`` for alignment/disease stages
            (the VQ-VAE keeps its codebook); everything but ``normality`` in a normality stage.
        epochs, max_steps: the stage ends after ``epochs`` or ``max_steps`` optimizer steps.
        batch_size: scans per process per micro-batch (fVLM: 14 per GPU on 4 GPUs).
        grad_accum_steps: micro-batches per optimizer step.
        lr, min_lr, warmup_steps: linear warmup from ``min_lr`` to ``lr``, then cosine to ``min_lr``.
        weight_decay, betas, eps: AdamW (no decay on biases, norms and the temperature).
        grad_clip: max global gradient norm (None: no clipping).
        momentum: momentum-encoder update ``m`` (disease objective; 0.995).
        disease_temperature: logit temperature of the disease loss (0.07).
    """

    name: str | None = None
    objectives: tuple[Objective, ...] = ("alignment",)
    loss_weights: dict[Objective, float] = Field(default_factory=dict)
    freeze: tuple[ModuleGroup, ...] | None = None
    epochs: int = Field(20, ge=1)
    max_steps: int | None = Field(None, ge=1)
    batch_size: int = Field(14, ge=1)
    grad_accum_steps: int = Field(1, ge=1)
    lr: float = Field(1e-4, gt=0.0)
    min_lr: float = Field(1e-6, ge=0.0)
    warmup_steps: int = Field(1000, ge=0)
    weight_decay: float = Field(0.05, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0.0)
    grad_clip: float | None = Field(None, gt=0.0)
    momentum: float = Field(0.995, ge=0.0, le=1.0)
    disease_temperature: float = Field(0.07, gt=0.0)

    @model_validator(mode="after")
    def _check(self) -> "StageConfig":
        if not self.objectives or len(set(self.objectives)) != len(self.objectives):
            raise ValueError(f"objectives must be a non-empty list of distinct names, got {list(self.objectives)}")
        if "normality" in self.objectives and len(self.objectives) > 1:
            raise ValueError(
                f"objectives {list(self.objectives)}: 'normality' trains the VQ-VAE with the vision encoder frozen "
                "and cannot share a stage with 'alignment' or 'disease'; give it its own stage"
            )
        for name in self.loss_weights:
            if name not in self.objectives:
                raise ValueError(f"loss_weights names {name!r}, which is not in objectives {list(self.objectives)}")
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        if self.objectives == ("normality",) and self.freeze is not None and "normality" in self.freeze:
            raise ValueError("freeze lists 'normality' in a normality stage: nothing would be trained")
        if not self.trainable_groups:
            raise ValueError(
                f"freeze {list(self.freeze or ())} leaves nothing to train for objectives {list(self.objectives)}"
            )
        return self

    @property
    def label(self) -> str:
        """The stage's name in logs and checkpoints."""
        return self.name or "+".join(self.objectives)

    @property
    def views(self) -> int:
        """Augmented views per scan (two for the disease objective)."""
        return 2 if "disease" in self.objectives else 1

    @property
    def trainable_groups(self) -> tuple[str, ...]:
        """Module groups that receive gradients: used by an objective and not frozen."""
        used = {g for o in self.objectives for g in USED_GROUPS[o]}
        if self.freeze is not None:
            frozen = set(self.freeze)
        elif self.objectives == ("normality",):
            frozen = set()
        else:
            frozen = {"normality"}
        return tuple(g for g in MODULE_GROUPS if g in used and g not in frozen)

    def weight(self, objective: str) -> float:
        return float(self.loss_weights.get(objective, 1.0))  # type: ignore[call-overload]


class TrainConfig(_Config):
    """Everything ``visd train`` needs; see ``docs/training.md``.

    Attributes:
        model: where the model comes from (:class:`ModelSource`).
        data: manifest and cache (:class:`DataConfig`).
        stages: run in order (:class:`StageConfig`).
        output_dir: checkpoints, logs, cache and the exported model (``<output_dir>/model``).
        seed: seeds model initialisation, data order and augmentation.
        deterministic: ``torch.use_deterministic_algorithms(True, warn_only=True)`` during training.
        precision: ``fp32``, ``bf16`` (autocast) or ``fp16`` (autocast + gradient scaler, CUDA only).
        gradient_checkpointing: recompute the backbone's four stages in the backward pass.
        batchnorm: ``batch`` (per-process batch statistics, as plain DDP), ``running`` (BatchNorm in
            eval mode: running statistics, not updated) or ``sync`` (SyncBatchNorm, CUDA only).
        checkpoint_every: optimizer steps between checkpoints (and one at each stage end).
        keep_checkpoints: how many of the newest checkpoints to keep.
        log_every: optimizer steps between log rows.
        organ_check_steps: an objective that has used no organ after this many optimizer steps of a
            stage (or by the end of a shorter stage) stops the run with an error
            (:mod:`visd.training.summary`); every step in which it used none logs a warning.
        tensorboard: also write TensorBoard events (needs ``tensorboard``).
        progress_bar: tqdm bar on rank 0 when stderr is a terminal.
        device: ``cpu``, ``cuda`` or None (CUDA when available).
        backend: process-group backend under torchrun (``auto``: nccl on CUDA, gloo on CPU).
    """

    model: ModelSource
    data: DataConfig
    stages: tuple[StageConfig, ...] = Field(min_length=1)
    output_dir: str
    seed: int = 0
    deterministic: bool = True
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    gradient_checkpointing: bool = False
    batchnorm: Literal["batch", "running", "sync"] = "batch"
    checkpoint_every: int = Field(1000, ge=1)
    keep_checkpoints: int = Field(3, ge=1)
    log_every: int = Field(1, ge=1)
    organ_check_steps: int = Field(10, ge=1)
    tensorboard: bool = False
    progress_bar: bool = True
    device: Literal["cpu", "cuda"] | None = None
    backend: Literal["auto", "nccl", "gloo"] = "auto"

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        labels = [s.label for s in self.stages]
        if len(set(labels)) != len(labels):
            raise ValueError(f"stage names must be distinct, got {labels}; set 'name' on repeated stages")
        needs_text = any("alignment" in s.objectives for s in self.stages)
        if needs_text and self.model.config is not None and self.model.tokenizer is None:
            raise ValueError(
                "the alignment objective needs a tokenizer: set model.tokenizer to a folder with vocab.txt "
                "(or start from model.pretrained)"
            )
        return self

    # -- files -----------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any], base_dir: str | Path | None = None) -> "TrainConfig":
        """Validate a dict; relative paths are resolved against ``base_dir`` when given.

        Raises:
            ConfigError: unknown keys (with a did-you-mean hint), wrong values or types.
        """
        if not isinstance(data, dict):
            raise ConfigError(f"a training config must be a mapping, got {type(data).__name__}")
        _check_unknown_keys(cls, data, ())
        try:
            config = cls.model_validate(data)
        except ValidationError as e:
            raise ConfigError(f"invalid training config: {_format_errors(e)}") from e
        return config._resolved(Path(base_dir)) if base_dir is not None else config

    @classmethod
    def from_file(cls, path: str | Path) -> "TrainConfig":
        """Read a YAML (or JSON) file; relative paths are relative to the file's folder."""
        import yaml

        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"cannot read training config {path}: {e}. Expected a YAML file.") from e
        return cls.from_dict(data if data is not None else {}, base_dir=path.resolve().parent)

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True) + "\n"

    def _resolved(self, base: Path) -> "TrainConfig":
        def rel(p: str | None) -> str | None:
            return None if p is None or Path(p).is_absolute() else str((base / p).resolve())

        data = self.model_dump(mode="json")
        m = data["model"]
        if m["pretrained"] is not None and (base / m["pretrained"]).exists():
            m["pretrained"] = rel(m["pretrained"]) or m["pretrained"]  # else: a Hub repo id, left alone
        if isinstance(m["config"], str):
            m["config"] = rel(m["config"]) or m["config"]
        m["tokenizer"] = rel(m["tokenizer"]) or m["tokenizer"]
        d = data["data"]
        d["manifest"] = rel(d["manifest"]) or d["manifest"]
        d["cache_dir"] = rel(d["cache_dir"]) or d["cache_dir"]
        data["output_dir"] = rel(data["output_dir"]) or data["output_dir"]
        return type(self).model_validate(data)

    def visd_config(self) -> ViSDConfig | None:
        """The :class:`ViSDConfig` of a from-scratch model (None for a pretrained source)."""
        c = self.model.config
        if c is None:
            return None
        return ViSDConfig.from_dict(c) if isinstance(c, dict) else ViSDConfig.from_file(c)


def lr_factor(step: int, total: int, warmup: int, lr: float, min_lr: float) -> float:
    """Learning rate at optimizer step ``step`` (0-based) as a fraction of ``lr``.

    Linear warmup from ``min_lr`` to ``lr`` over ``warmup`` steps, then cosine decay from ``lr`` to
    ``min_lr`` at step ``total - 1``.
    """
    if step < warmup:
        value = min_lr + (lr - min_lr) * step / warmup
    else:
        span = max(total - 1 - warmup, 1)
        progress = min((step - warmup) / span, 1.0)
        value = min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))
    return value / lr


# -- unknown keys and readable errors ----------------------------------------------------------------
def _model_classes(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic model classes inside an annotation (``X``, ``X | None``, ``tuple[X, ...]``)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    out: list[type[BaseModel]] = []
    for arg in typing.get_args(annotation):
        out += _model_classes(arg)
    return out


def _check_unknown_keys(cls: type[BaseModel], data: Any, loc: tuple) -> None:
    if not isinstance(data, dict):
        return
    fields = cls.model_fields
    for key, value in data.items():
        if key not in fields:
            where = ".".join(str(p) for p in (*loc, key))
            raise ConfigError(
                f"unknown training config key {where!r}; expected one of {sorted(fields)}."
                f"{did_you_mean(str(key), fields)}"
            )
        annotation = fields[key].annotation
        origin = typing.get_origin(annotation)
        for sub in _model_classes(annotation):
            if isinstance(value, (list, tuple)) and origin not in (dict,) and _is_sequence(annotation):
                for i, item in enumerate(value):
                    _check_unknown_keys(sub, item, (*loc, key, i))
            else:
                _check_unknown_keys(sub, value, (*loc, key))


def _is_sequence(annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (tuple, list):
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_is_sequence(a) for a in typing.get_args(annotation))
    return False


def _format_errors(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        where = ".".join(str(p) for p in err["loc"]) or "config"
        msg = f"{where}: {err['msg']} (got {err.get('input')!r:.80})"
        if err["type"] == "literal_error":
            choices = re.findall(r"'([^']*)'", str(err.get("ctx", {}).get("expected", "")))
            msg += did_you_mean(str(err.get("input")), choices)
        parts.append(msg)
    return "; ".join(parts)
