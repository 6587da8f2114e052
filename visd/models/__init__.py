"""The ViSD-Boost model: vision encoder, normality model, organ pooling and text tower."""

from visd.models.model import ViSDModel
from visd.models.outputs import (
    FindingScore,
    OrganDetail,
    OrganEmbeddings,
    ViSDOutput,
    ZeroShotResult,
)

__all__ = ["FindingScore", "OrganDetail", "OrganEmbeddings", "ViSDModel", "ViSDOutput", "ZeroShotResult"]
