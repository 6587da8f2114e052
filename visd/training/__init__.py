"""Training: the pre-training losses and the distributed helpers they use."""

from visd.training.distributed import gather_rows
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
    "anatomy_alignment_loss",
    "codebook_usage",
    "disease_contrastive_loss",
    "gather_rows",
    "hash_texts",
    "momentum_update",
    "normality_loss",
]
