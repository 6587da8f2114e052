"""The fused numerics' per-organ part (see :mod:`visd.models.fused` for the whole list): the organ's
tokens gathered as rows of the backbone's feature maps and projected only where needed, the two fusion
maps folded into one, and the single-query attention pooling in O(n d).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from visd.kernels import segment_softmax_pool
from visd.models.pooling import OrganPooling

__all__ = ["FoldedQuery", "SharedPart", "fold_query", "organ_features", "pool_organ", "project"]


def organ_features(
    feats: list[torch.Tensor],
    flags: list[torch.Tensor],
    items: list[tuple[int, int]],
    dtype: torch.dtype | None = None,
) -> list[list[torch.Tensor]]:
    """Backbone features ``(n_k, C_k)`` at the tokens of organ ``o`` in batch item ``b``, for each
    ``(b, o)`` of ``items``, per level: ``out[i][k]`` is item ``i``'s level ``k``.

    One gather per level for all items (rows of the channels-last maps, no flattening copy), so with
    gradients the backward fills one zero map per level, not one per organ; converted to ``dtype``
    when given (only the gathered rows, not the whole maps).
    """
    if not items:
        return []
    per_level = []
    for f, fl in zip(feats, flags):
        n_tokens = fl.shape[-1]
        by_token = f.permute(0, 2, 3, 4, 1).reshape(-1, f.shape[1])  # (B * L, C), a view for channels-last maps
        index = [torch.nonzero(fl[b, o]).flatten() + b * n_tokens for b, o in items]
        rows = by_token.index_select(0, torch.cat(index))
        rows = rows if dtype is None else rows.to(dtype)
        per_level.append(rows.split([len(i) for i in index]))
    return [list(level_rows) for level_rows in zip(*per_level)]


def project(proj: torch.nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    """A 1x1x1 convolution applied to token rows ``(n, C_in)`` -> ``(n, C_out)``."""
    return torch.addmm(proj.bias, x, proj.weight.view(proj.out_channels, proj.in_channels).t())


SharedPart = tuple[torch.Tensor, "torch.nn.Conv3d | None"]


@dataclass(frozen=True)
class FoldedQuery:
    """One organ's pooling weights, folded for :func:`pool_organ`.

    Attributes:
        u: ``(H, 2E)`` per head, the score vector of a hybrid token ``[t ; r]`` (the key projection
            moved onto the query: ``score_h = scale * h_fused . (Wk_h^T q_h)``, ``h_fused = A [t ; r] + c``).
        fusion: ``(E, 2E)`` the folded fusion ``A = W2 W1``; ``bias`` ``(E,)`` its ``c = W2 b1 + b2``.
        shared: ``(E, E)`` the fusion of a token whose halves are equal: ``A_l + A_r``.
    """

    u: torch.Tensor
    fusion: torch.Tensor
    bias: torch.Tensor
    shared: torch.Tensor


def fold_query(pooling: OrganPooling, o: int) -> FoldedQuery:
    """Organ ``o``'s :class:`FoldedQuery` (differentiable in the pooling's weights)."""
    mha = pooling.attention
    e, h = mha.embed_dim, mha.num_heads
    w1, b1 = pooling.fuse1[o].weight, pooling.fuse1[o].bias
    w2, b2 = pooling.fuse2[o].weight, pooling.fuse2[o].bias
    a = w2 @ w1
    wq, wk, _ = mha.in_proj_weight.chunk(3)
    bq = mha.in_proj_bias.chunk(3)[0]
    q = (wq @ pooling.query_tokens[o] + bq).view(h, e // h)
    kq = torch.einsum("hd,hde->he", q, wk.view(h, e // h, e))  # Wk_h^T q_h
    return FoldedQuery(kq @ a, a, w2 @ b1 + b2, a[:, :e] + a[:, e:])


def pool_organ(
    pooling: OrganPooling,
    query: FoldedQuery,
    shared: list[SharedPart],
    level4: torch.Tensor,
    normal4: torch.Tensor,
) -> torch.Tensor:
    """The attention output ``(E,)`` of :meth:`OrganPooling.attend` for one organ, in O(n C).

    Args:
        query: the organ's :func:`fold_query`.
        shared: the level 1-3 tokens, whose two hybrid halves are equal, as parts ``(x, proj)``:
            ``x`` ``(n, C)`` backbone features with the 1x1x1 ``proj`` that makes them tokens, or
            already projected tokens ``(n, E)`` with ``proj=None``. Scores and means are taken in the
            ``C``-wide feature space, so the tokens are never projected.
        level4, normal4: ``(n4, E)`` the level-4 tokens and their normal reconstruction.

    Without gradients the token sums run in :func:`visd.kernels.segment_softmax_pool` (float64 row
    sums); with gradients in plain differentiable torch.
    """
    mha = pooling.attention
    e, h = mha.embed_dim, mha.num_heads
    dh = e // h
    scale = dh**-0.5
    pool_part = _pool_part_autograd if torch.is_grad_enabled() else _pool_part_kernel
    u_shared = query.u[:, :e] + query.u[:, e:]  # [t ; t] -> (A_l + A_r) t
    lses, means = [], []  # per part: (H,) log-sum-exp of its logits, (H, E) its mean fused token (minus c)
    for x, proj in shared:
        if proj is None:
            lse, mean_x, _ = pool_part(x, None, u_shared, None, scale)
            lses.append(lse)
            means.append(mean_x @ query.shared.t())
        else:
            p = proj.weight.view(proj.out_channels, proj.in_channels)
            lse, mean_x, _ = pool_part(x, None, u_shared @ p, None, scale)
            lses.append(lse + (u_shared @ proj.bias) * scale)
            means.append((mean_x @ p.t() + proj.bias) @ query.shared.t())
    lse, mean_a, mean_b = pool_part(level4, normal4, query.u[:, :e], query.u[:, e:], scale)
    lses.append(lse)
    means.append(mean_a @ query.fusion[:, :e].t() + mean_b @ query.fusion[:, e:].t())
    weights = torch.softmax(torch.stack(lses), dim=0)  # (parts, H)
    fused_mean = (weights[..., None] * torch.stack(means)).sum(0) + query.bias  # (H, E)
    wv = mha.in_proj_weight.chunk(3)[2]
    bv = mha.in_proj_bias.chunk(3)[2]
    values = torch.einsum("hde,he->hd", wv.view(h, dh, e), fused_mean) + bv.view(h, dh)
    return mha.out_proj(values.reshape(e))


def _pool_part_kernel(x_a, x_b, u_a, u_b, scale):
    """``(lse (H,), mean of x_a (H, C_a), mean of x_b or None)`` by the segment pooling kernel, in
    the widest dtype of the inputs (under autocast they may differ)."""
    dtype = x_a.dtype
    for t in (x_b, u_a, u_b):
        dtype = dtype if t is None else torch.promote_types(dtype, t.dtype)
    x_a, u_a = x_a.to(dtype), u_a.to(dtype)
    x_b, u_b = (None, None) if x_b is None else (x_b.to(dtype), u_b.to(dtype))
    offsets = torch.tensor([0, x_a.shape[0]], device=x_a.device)
    out = segment_softmax_pool(
        x_a.contiguous() if x_a.stride(-1) != 1 else x_a,
        x_b,
        offsets,
        u_a[None].contiguous(),
        None if u_b is None else u_b[None].contiguous(),
        scale,
    )
    return out.lse[0].to(x_a.dtype), out.pooled_a[0], None if x_b is None else out.pooled_b[0]


def _pool_part_autograd(x_a, x_b, u_a, u_b, scale):
    """:func:`_pool_part_kernel` in plain torch, differentiable in every input (the lse included)."""
    logits = (x_a @ u_a.t()) * scale  # (n, H)
    if x_b is not None:
        logits = logits + (x_b @ u_b.t()) * scale
    lse = torch.logsumexp(logits, dim=0)
    p = torch.exp(logits - lse)
    return lse, p.t() @ x_a, None if x_b is None else p.t() @ x_b
