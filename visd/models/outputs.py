"""Named outputs of :class:`visd.ViSDModel` (never tuples whose length depends on flags)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

__all__ = ["OrganDetail", "OrganEmbeddings", "FindingScore", "ZeroShotResult", "ViSDOutput"]


@dataclass
class OrganDetail:
    """Intermediates of one organ's embedding, for inspection and anomaly maps.

    Attributes:
        level4_index: ``(n,)`` indices of the organ's level-4 tokens (row-major over the level-4 grid).
        level4_grid: ``(d, h, w)`` shape of the level-4 token grid of the window.
        codes: ``(n,)`` codebook indices of those tokens.
        deviation: ``(n,)`` L2 distance between each original and reconstructed level-4 token.
        decoded: ``(n, C)`` decoder output before undoing the min-max scaling.
        attention_output: ``(E,)`` the query attention output.
        projection: ``(E,)`` the organ projection output before L2 normalisation.
        window_start: ``(d, h, w)`` where the window starts in the volume (None for a single window).
    """

    level4_index: torch.Tensor
    level4_grid: tuple[int, int, int]
    codes: torch.Tensor
    deviation: torch.Tensor
    decoded: torch.Tensor
    attention_output: torch.Tensor
    projection: torch.Tensor
    window_start: tuple[int, int, int] | None = None


@dataclass
class OrganEmbeddings:
    """Per-organ image embeddings of one volume.

    Attributes:
        organs: organ names, in the order of ``embeddings`` rows.
        embeddings: ``(O, E)`` the model's dtype (float32, or float64 for a model run in float64); rows of organs not scored are NaN.
        status: per organ, ``"scored"`` or why not (e.g. ``"organ_absent"``).
        details: per scored organ, its :class:`OrganDetail`.
    """

    organs: tuple[str, ...]
    embeddings: torch.Tensor
    status: dict[str, str]
    details: dict[str, OrganDetail] = field(default_factory=dict)

    def __getitem__(self, organ: str) -> torch.Tensor:
        return self.embeddings[self.organs.index(organ)]

    @property
    def scored(self) -> tuple[str, ...]:
        return tuple(o for o in self.organs if self.status[o] == "scored")


@dataclass(frozen=True)
class FindingScore:
    """One finding's zero-shot result: the positive-class probability, NaN when not scored."""

    organ: str
    finding: str
    probability: float
    status: str


@dataclass
class ZeroShotResult:
    """Zero-shot diagnosis of one volume: one :class:`FindingScore` per finding, in catalogue order."""

    scores: list[FindingScore]
    embeddings: OrganEmbeddings

    def __getitem__(self, finding: str) -> FindingScore:
        for s in self.scores:
            if s.finding == finding:
                return s
        raise KeyError(finding)

    @property
    def probabilities(self) -> dict[str, float]:
        return {s.finding: s.probability for s in self.scores}

    def to_records(self) -> list[dict[str, object]]:
        return [
            {"organ": s.organ, "finding": s.finding, "probability": s.probability, "status": s.status}
            for s in self.scores
        ]

    def to_pandas(self):
        """A DataFrame with columns ``organ, finding, probability, status``."""
        import pandas as pd

        return pd.DataFrame(self.to_records(), columns=["organ", "finding", "probability", "status"])

    def __repr__(self) -> str:
        lines = [f"ZeroShotResult({len(self.scores)} findings)"]
        for s in self.scores:
            p = "   nan" if math.isnan(s.probability) else f"{s.probability:.4f}"
            lines.append(f"  {s.organ:<10} {s.finding:<36} {p}  {s.status}")
        return "\n".join(lines)


@dataclass
class ViSDOutput:
    """Training forward pass output.

    Attributes:
        organ_embeddings: ``(B, O, E)`` L2-normalised; zero rows where the organ does not count.
        organ_status: ``(B, O)`` int64 (CPU) codes of :func:`visd.models.windows.window_status`:
            0 the organ counts (present, not touching the crop border), 1 absent, 2 touches the border.
        text_embeddings: ``(N, E)`` L2-normalised, or None when no text was given.
        temperature: scalar, logits are ``cos / temperature``.
    """

    organ_embeddings: torch.Tensor
    organ_status: torch.Tensor
    text_embeddings: torch.Tensor | None
    temperature: torch.Tensor

    @property
    def organ_valid(self) -> torch.Tensor:
        """``(B, O)`` bool on the embeddings' device: the organ counts in the crop."""
        return (self.organ_status == 0).to(self.organ_embeddings.device)
