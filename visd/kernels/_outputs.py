"""Named results shared by the reference and the Triton kernels."""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["NearestCodeOutput", "SegmentPoolOutput"]


class SegmentPoolOutput(NamedTuple):
    """Result of :func:`visd.kernels.segment_softmax_pool`.

    Attributes:
        pooled_a: ``(S, H, Fa)``, the dtype of ``x_a``: per segment and head, the softmax-weighted
            mean of the segment's ``x_a`` rows. Zeros for an empty segment.
        pooled_b: ``(S, H, Fb)`` likewise for ``x_b``, or ``None`` when ``x_b`` was ``None``.
        lse: ``(S, H)`` float32, detached: the log-sum-exp of the scaled logits over the segment;
            ``-inf`` for an empty segment.
    """

    pooled_a: torch.Tensor
    pooled_b: torch.Tensor | None
    lse: torch.Tensor


class NearestCodeOutput(NamedTuple):
    """Result of :func:`visd.kernels.nearest_code`.

    Attributes:
        indices: ``(N,)`` int64, the nearest codebook row of each input row; ties go to the lowest
            index (the rule of :func:`torch.argmin`).
        distances: ``(N,)`` float32, detached: the squared Euclidean distance to that row, computed in
            float32 as ``|z|^2 - 2 z.e + |e|^2`` and clamped at 0.
    """

    indices: torch.Tensor
    distances: torch.Tensor
