"""Training: the ViSD-Boost recipe (:func:`train` driven by a :class:`TrainConfig`), its losses and
distributed helpers. See ``docs/training.md``."""

from visd.training.config import TrainConfig
from visd.training.distributed import gather_rows
from visd.training.engine import train
from visd.training.losses import (
    CodebookUsage,
    NormalityLoss,
    OrganLossOutput,
    anatomy_alignment_loss,
    codebook_usage,
    disease_contrastive_loss,
    hash_texts,
    momentum_update,
    normality_loss,
)

__all__ = [
    "CodebookUsage",
    "NormalityLoss",
    "OrganLossOutput",
    "TrainConfig",
    "anatomy_alignment_loss",
    "codebook_usage",
    "disease_contrastive_loss",
    "gather_rows",
    "hash_texts",
    "momentum_update",
    "normality_loss",
    "train",
]
