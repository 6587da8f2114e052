"""Pure-torch ground truth for the kernels in :mod:`visd.kernels`.

Clarity first: a plain loop over segments, float32 arithmetic (float64 for float64 inputs) except
for the pooling's sums over a segment's rows, which are float64; gradients from ordinary autograd.
The Triton fast paths are tested against these functions, and
:func:`visd.kernels.segment_softmax_pool` / :func:`visd.kernels.nearest_code` fall back to them
where Triton cannot run. Arguments are not validated here; the public functions do that.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from visd.kernels._outputs import NearestCodeOutput, SegmentPoolOutput

__all__ = [
    "nearest_code_reference",
    "segment_softmax_pool_reference",
    "single_query_attention_reference",
]

# Rows of ``z`` handled at once by nearest_code_reference, so that at most about this many
# distances (rows x codes) exist at a time.
_DISTANCE_BUDGET = 1 << 22


# Rows of a segment summed per step by _row_sum: a float64 copy of a few MB, which the allocator
# reuses (copies over 32 MiB would be fresh memory each time, see visd.models.fused._zeroed).
_ROW_CHUNK = 1 << 13


def _row_sum(p: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``p.T @ rows`` in float64, ``(n, H)`` float64 weights and ``(n, F)`` rows -> ``(H, F)``.

    A float32 matrix product sums the n rows with little blocking: with the ~40,000 level-1 tokens of
    a heart on the benchmark volume the attention output came out 2e-4 off in relative terms (the
    official attention 5e-6), and 1.3e-4 on 300,000 uniform rows (tests/kernels/test_reference.py).
    The sums are a small share of the work, so they are done in float64, a chunk of rows at a time.
    """
    n = rows.shape[0]
    chunks = range(0, max(n, 1), _ROW_CHUNK)  # an empty segment still gives one (H, F) product, of zeros
    parts = [p[i : i + _ROW_CHUNK].T @ rows[i : i + _ROW_CHUNK].to(torch.float64) for i in chunks]
    return parts[0] if len(parts) == 1 else torch.stack(parts).sum(0)


def _accumulation_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 if any input is float64, float32 otherwise."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def segment_softmax_pool_reference(
    x_a: torch.Tensor,
    x_b: torch.Tensor | None,
    offsets: torch.Tensor,
    u_a: torch.Tensor,
    u_b: torch.Tensor | None,
    scale: float,
) -> SegmentPoolOutput:
    """Segmented multi-head single-query softmax pooling, one segment at a time.

    For segment ``s`` (rows ``offsets[s]:offsets[s+1]``) and head ``h``::

        logits_i = scale * (x_a[i] . u_a[s, h] + x_b[i] . u_b[s, h])
        p = softmax(logits)                      # over the rows i of segment s
        pooled_a[s, h] = sum_i p_i x_a[i]        # likewise pooled_b

    Args:
        x_a: ``(N, Fa)`` floating rows of all segments, concatenated.
        x_b: ``(N, Fb)`` second half of each row, or ``None``.
        offsets: ``(S + 1,)`` integer segment boundaries, ``offsets[0] == 0``, ``offsets[-1] == N``.
        u_a: ``(S, H, Fa)`` score vectors per segment and head.
        u_b: ``(S, H, Fb)``, or ``None`` exactly when ``x_b`` is ``None``.
        scale: multiplies the logits (``1 / sqrt(head_dim)`` in attention).

    Returns:
        :class:`SegmentPoolOutput`; pooled tensors in the dtype of ``x_a``, zeros for an empty
        segment, whose ``lse`` is ``-inf``.
    """
    acc = _accumulation_dtype(x_a, x_b, u_a, u_b)
    num_segments, num_heads, _ = u_a.shape
    bounds = [int(v) for v in offsets.tolist()]
    pooled_a, pooled_b, lse = [], [], []
    for s in range(num_segments):
        lo, hi = bounds[s], bounds[s + 1]
        # An empty segment needs no special case: softmax over 0 rows is empty, the weighted sum
        # (H, 0) @ (0, F) is zeros (still connected to the graph, with zero gradients) and the
        # log-sum-exp over nothing is -inf.
        rows_a = x_a[lo:hi].to(acc)  # (n, Fa)
        logits = rows_a @ u_a[s].to(acc).T  # (n, H)
        if x_b is not None:
            rows_b = x_b[lo:hi].to(acc)
            logits = logits + rows_b @ u_b[s].to(acc).T
        logits = (logits * scale).to(torch.float64)
        p = torch.softmax(logits, dim=0)  # over the rows of the segment
        pooled_a.append(_row_sum(p, rows_a))  # (H, Fa)
        if x_b is not None:
            pooled_b.append(_row_sum(p, rows_b))
        lse.append(torch.logsumexp(logits, dim=0))
    return SegmentPoolOutput(
        pooled_a=_stack(pooled_a, (0, num_heads, x_a.shape[1]), x_a).to(x_a.dtype),
        pooled_b=None if x_b is None else _stack(pooled_b, (0, num_heads, x_b.shape[1]), x_b).to(x_b.dtype),
        lse=_stack(lse, (0, num_heads), x_a).detach().to(torch.float32),
    )


def _stack(parts: list[torch.Tensor], empty_shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """``torch.stack(parts)``, or an empty tensor of ``empty_shape`` when there are no segments."""
    if not parts:
        return like.new_zeros(empty_shape)
    return torch.stack(parts)


def nearest_code_reference(z: torch.Tensor, codebook: torch.Tensor) -> NearestCodeOutput:
    """Nearest codebook row of each row of ``z`` under the squared Euclidean distance.

    Distances are ``|z|^2 - 2 z.e + |e|^2`` computed in float32 (float64 for float64 inputs), the
    arithmetic of the official model; ``torch.argmin`` picks the lowest index among ties. Rows are
    processed in chunks so that the full ``(N, K)`` distance matrix never exists at once.

    Args:
        z: ``(N, D)`` floating vectors.
        codebook: ``(K, D)`` floating code vectors, ``K >= 1``.

    Returns:
        :class:`NearestCodeOutput` with ``(N,)`` int64 indices and ``(N,)`` float32 distances
        (clamped at 0). Computed without autograd: nothing returned carries a gradient.
    """
    acc = _accumulation_dtype(z, codebook)
    with torch.no_grad():
        e = codebook.to(acc)
        e_sq = (e * e).sum(dim=1)  # (K,)
        chunk = max(1, _DISTANCE_BUDGET // max(1, e.shape[0]))
        indices, distances = [], []
        for start in range(0, z.shape[0], chunk):
            rows = z[start : start + chunk].to(acc)
            d = (rows * rows).sum(dim=1, keepdim=True) - 2.0 * (rows @ e.T) + e_sq  # (n, K)
            best, idx = d.min(dim=1)
            indices.append(idx)
            distances.append(best)
        if not indices:
            return NearestCodeOutput(
                z.new_zeros((0,), dtype=torch.int64), z.new_zeros((0,), dtype=torch.float32)
            )
        best = torch.cat(distances).clamp_min(0.0).to(torch.float32)
        return NearestCodeOutput(torch.cat(indices), best)


PoolFn = Callable[..., SegmentPoolOutput]


def single_query_attention_reference(
    x_a: torch.Tensor,
    x_b: torch.Tensor | None,
    offsets: torch.Tensor,
    query: torch.Tensor,
    *,
    token_weight: torch.Tensor,
    token_bias: torch.Tensor | None,
    in_proj_weight: torch.Tensor,
    in_proj_bias: torch.Tensor | None,
    out_proj_weight: torch.Tensor,
    out_proj_bias: torch.Tensor | None,
    num_heads: int,
    pool: PoolFn | None = None,
) -> torch.Tensor:
    """Multi-head attention of one query per segment over affinely mapped rows, via pooling.

    Computes, for each segment ``s`` with rows ``x_i = [x_a[i] ; x_b[i]]`` (``F = Fa + Fb`` wide),
    exactly what ``torch.nn.MultiheadAttention`` (no dropout, no ``bias_k``/``add_zero_attn``)
    returns for ``attn(q_s, t, t)`` with keys = values = ``t_i = W_s x_i + c_s``, without forming
    ``t`` or the keys. With ``Q_s = Wq q_s + bq`` split into heads ``Q_{s,h}`` (dim ``d = E / H``)::

        score_{s,h,i} = Q_{s,h} . (Wk_h t_i + bk_h) / sqrt(d)
                      = x_i . u_{s,h} / sqrt(d) + const(s, h),   u_{s,h} = W_s^T Wk_h^T Q_{s,h}
        head_{s,h}    = sum_i p_i (Wv_h t_i + bv_h) = Wv_h (W_s xbar_{s,h} + c_s) + bv_h,
                        xbar_{s,h} = sum_i p_i x_i      (p = softmax of score over the segment)
        out_s         = Wo [head_{s,1} ; ... ; head_{s,H}] + bo

    The constant cancels in the softmax, so the only work that scales with the number of rows is
    :func:`segment_softmax_pool_reference` (or the fast kernel passed as ``pool``).

    Args:
        x_a: ``(N, Fa)`` first part of the rows of all segments (the original tokens).
        x_b: ``(N, Fb)`` second part (the reconstructed tokens), or ``None``.
        offsets: ``(S + 1,)`` int64 segment boundaries.
        query: ``(S, E)`` the query of each segment (e.g. the organ's learned query).
        token_weight: ``(E, F)`` shared, or ``(S, E, F)`` per segment: the affine map ``W`` from a
            row to the attention input (two stacked linear layers compose to one).
        token_bias: ``(E,)`` or ``(S, E)``: ``c``; ``None`` for zero.
        in_proj_weight: ``(3E, E)`` packed ``[Wq; Wk; Wv]`` as in ``nn.MultiheadAttention``.
        in_proj_bias: ``(3E,)`` packed ``[bq; bk; bv]``, or ``None``.
        out_proj_weight: ``(E, E)`` ``Wo``.
        out_proj_bias: ``(E,)`` ``bo``, or ``None``.
        num_heads: ``H``; ``E`` must be divisible by it.
        pool: a function with the signature of :func:`segment_softmax_pool_reference`, e.g.
            ``functools.partial(visd.kernels.segment_softmax_pool, backend="auto")``; defaults to
            the reference.

    Returns:
        ``(S, E)`` attention outputs in the dtype of ``query``. For an empty segment (where
        attention is undefined) the pooled rows are zero, so the output is ``Wo(Wv c + bv) + bo``.
    """
    pool = segment_softmax_pool_reference if pool is None else pool
    num_segments, embed_dim = query.shape
    head_dim = embed_dim // num_heads
    fa = x_a.shape[1]
    w_q, w_k, w_v = in_proj_weight.chunk(3, dim=0)  # each (E, E)
    b_q, _, b_v = (None, None, None) if in_proj_bias is None else in_proj_bias.chunk(3)

    q = query @ w_q.T if b_q is None else query @ w_q.T + b_q  # (S, E)
    q = q.view(num_segments, num_heads, head_dim)
    # Move the key projection onto the query: k_dir[s, h] = Wk_h^T Q_{s,h}, in attention space (E).
    k_dir = torch.einsum("shd,hde->she", q, w_k.view(num_heads, head_dim, embed_dim))
    weight = token_weight if token_weight.dim() == 3 else token_weight.expand(num_segments, -1, -1)
    u = torch.einsum("she,sef->shf", k_dir, weight)  # (S, H, F): W_s^T k_dir
    u_a, u_b = u[..., :fa], (None if x_b is None else u[..., fa:])

    pooled = pool(x_a, x_b, offsets, u_a.contiguous(), None if u_b is None else u_b.contiguous(),
                  1.0 / math.sqrt(head_dim))
    xbar = pooled.pooled_a if x_b is None else torch.cat([pooled.pooled_a, pooled.pooled_b], dim=-1)

    # Move the value projection after the weighted sum: t_bar = W_s xbar + c_s, then Wv_h t_bar + bv_h.
    t_bar = torch.einsum("sef,shf->she", weight, xbar.to(weight.dtype))  # (S, H, E)
    if token_bias is not None:
        t_bar = t_bar + (token_bias[:, None, :] if token_bias.dim() == 2 else token_bias)
    heads = torch.einsum("she,hde->shd", t_bar, w_v.view(num_heads, head_dim, embed_dim))
    if b_v is not None:
        heads = heads + b_v.view(num_heads, head_dim)
    out = heads.reshape(num_segments, embed_dim) @ out_proj_weight.T
    if out_proj_bias is not None:
        out = out + out_proj_bias
    return out.to(query.dtype)
