"""Hybrid fusion of original and normal-reconstructed tokens, and per-organ query attention pooling."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["OrganPooling"]


class OrganPooling(nn.Module):
    """One learned query per organ attends over the organ's fused tokens.

    For organ ``o`` with tokens ``original`` and ``normal`` (both ``(n, E)``), the hybrid token is
    ``[original ; normal]`` (``2E`` wide), fused by ``fuse2[o](fuse1[o](.))`` to ``E``; the organ's
    query attends over the fused tokens with the shared multi-head attention (:meth:`attend`);
    ``project[o]`` maps the result to the embedding space. :func:`visd.models.fused_pooling.pool_organ`
    computes :meth:`attend` with the same weights in O(n d).
    """

    def __init__(self, num_organs: int, dim: int, heads: int) -> None:
        super().__init__()
        self.query_tokens = nn.Parameter(torch.randn(num_organs, dim) * 0.02)
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.fuse1 = nn.ModuleList(nn.Linear(2 * dim, dim) for _ in range(num_organs))
        self.fuse2 = nn.ModuleList(nn.Linear(dim, dim) for _ in range(num_organs))
        self.project = nn.ModuleList(nn.Linear(dim, dim) for _ in range(num_organs))

    def attend(self, original: torch.Tensor, normal: torch.Tensor, organ_index: int) -> torch.Tensor:
        """Attention output ``(E,)`` for one organ (before :attr:`project`)."""
        hybrid = torch.cat([original, normal], dim=-1)
        fused = self.fuse2[organ_index](self.fuse1[organ_index](hybrid))[None]
        query = self.query_tokens[organ_index][None, None]
        out, _ = self.attention(query, fused, fused)
        return out[0, 0]
