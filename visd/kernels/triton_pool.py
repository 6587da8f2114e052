"""Triton fast path of :func:`visd.kernels.segment_softmax_pool`, forward and backward.

Imported lazily by :mod:`visd.kernels` (importing this module imports triton). One program per
segment handles every head: the segment's rows are streamed once in blocks of ``BLOCK_N`` with an
online softmax per head (FlashAttention with the heads' score vectors as the queries), so each
row of ``x_a``/``x_b`` is read from memory once in the forward pass and once in the backward pass,
whatever the number of heads. Heads are padded to 16 (the smallest ``tl.dot`` tile); the padded
score vectors are zero and their results are never stored.

All arithmetic is float32 (tiles are upcast after loading; ``tl.dot`` with ``input_precision="ieee"``,
no TF32), so fp16/bf16 inputs accumulate in float32 and the results match the reference to float32
rounding before the final cast. The backward pass recomputes the softmax from the saved
log-sum-exp (no ``(N, H)`` probabilities are stored) and needs no atomics: a row belongs to one
segment, and a segment's ``du`` is accumulated by its one program.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from visd.kernels._outputs import SegmentPoolOutput

__all__ = ["interpreted", "segment_softmax_pool_triton"]

_LOG2E = 1.4426950408889634  # log2(e); the kernels use exp2/log2 and spell the constants out


def _pad(n: int) -> int:
    """Smallest power of two >= n and >= 16 (the minimum ``tl.dot`` dimension).

    :func:`visd.kernels._dispatch.pool_unsupported` bounds the padded tile sizes the same way.
    """
    return max(16, triton.next_power_of_2(n))


@triton.jit
def _pool_fwd_kernel(
    xa_ptr, xb_ptr, off_ptr, ua_ptr, ub_ptr, pa_ptr, pb_ptr, lse_ptr,
    stride_xa, stride_xb, num_heads, fa, fb, qk_scale,
    HAS_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_FA: tl.constexpr, BLOCK_FB: tl.constexpr,
):
    seg = tl.program_id(0).to(tl.int64)
    start = tl.load(off_ptr + seg)
    end = tl.load(off_ptr + seg + 1)
    heads = tl.arange(0, BLOCK_H)
    mask_h = heads < num_heads
    cols_a = tl.arange(0, BLOCK_FA)
    mask_fa = cols_a < fa
    cols_b = tl.arange(0, BLOCK_FB)
    mask_fb = cols_b < fb

    # Score vectors of this segment, (BLOCK_H, F): the "queries".
    ua_offs = seg * num_heads * fa + heads[:, None] * fa + cols_a[None, :]
    u_a = tl.load(ua_ptr + ua_offs, mask=mask_h[:, None] & mask_fa[None, :], other=0.0).to(tl.float32)
    ub_offs = seg * num_heads * fb + heads[:, None] * fb + cols_b[None, :]
    if HAS_B:
        u_b = tl.load(ub_ptr + ub_offs, mask=mask_h[:, None] & mask_fb[None, :], other=0.0).to(tl.float32)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)  # running max, log2 units
    l_i = tl.zeros([BLOCK_H], tl.float32)  # running sum of exp2(s - m_i)
    acc_a = tl.zeros([BLOCK_H, BLOCK_FA], tl.float32)
    acc_b = tl.zeros([BLOCK_H, BLOCK_FB], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        mask_n = rows < end
        x_a = tl.load(xa_ptr + rows[:, None] * stride_xa + cols_a[None, :],
                      mask=mask_n[:, None] & mask_fa[None, :], other=0.0).to(tl.float32)
        s = tl.dot(u_a, tl.trans(x_a), input_precision="ieee")  # (BLOCK_H, BLOCK_N)
        if HAS_B:
            x_b = tl.load(xb_ptr + rows[:, None] * stride_xb + cols_b[None, :],
                          mask=mask_n[:, None] & mask_fb[None, :], other=0.0).to(tl.float32)
            s += tl.dot(u_b, tl.trans(x_b), input_precision="ieee")
        s = tl.where(mask_n[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: the block has a valid row
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc_a = acc_a * alpha[:, None] + tl.dot(p, x_a, input_precision="ieee")
        if HAS_B:
            acc_b = acc_b * alpha[:, None] + tl.dot(p, x_b, input_precision="ieee")
        m_i = m_new

    nonempty = l_i > 0.0
    denom = tl.where(nonempty, l_i, 1.0)  # an empty segment keeps acc == 0 -> pooled == 0
    tl.store(pa_ptr + ua_offs, acc_a / denom[:, None], mask=mask_h[:, None] & mask_fa[None, :])
    if HAS_B:
        tl.store(pb_ptr + ub_offs, acc_b / denom[:, None], mask=mask_h[:, None] & mask_fb[None, :])
    lse = tl.where(nonempty, (m_i + tl.log2(denom)) * 0.6931471805599453, float("-inf"))
    tl.store(lse_ptr + seg * num_heads + heads, lse, mask=mask_h)


@triton.jit
def _pool_bwd_kernel(
    xa_ptr, xb_ptr, off_ptr, ua_ptr, ub_ptr, ga_ptr, gb_ptr, lse_ptr, delta_ptr,
    dxa_ptr, dxb_ptr, dua_ptr, dub_ptr,
    stride_xa, stride_xb, stride_dxa, stride_dxb, num_heads, fa, fb, scale, qk_scale,
    HAS_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_FA: tl.constexpr, BLOCK_FB: tl.constexpr,
):
    seg = tl.program_id(0).to(tl.int64)
    start = tl.load(off_ptr + seg)
    end = tl.load(off_ptr + seg + 1)
    heads = tl.arange(0, BLOCK_H)
    mask_h = heads < num_heads
    cols_a = tl.arange(0, BLOCK_FA)
    mask_fa = cols_a < fa
    cols_b = tl.arange(0, BLOCK_FB)
    mask_fb = cols_b < fb

    ua_offs = seg * num_heads * fa + heads[:, None] * fa + cols_a[None, :]
    mask_ua = mask_h[:, None] & mask_fa[None, :]
    u_a = tl.load(ua_ptr + ua_offs, mask=mask_ua, other=0.0).to(tl.float32)
    g_a = tl.load(ga_ptr + ua_offs, mask=mask_ua, other=0.0).to(tl.float32)
    ub_offs = seg * num_heads * fb + heads[:, None] * fb + cols_b[None, :]
    mask_ub = mask_h[:, None] & mask_fb[None, :]
    if HAS_B:
        u_b = tl.load(ub_ptr + ub_offs, mask=mask_ub, other=0.0).to(tl.float32)
        g_b = tl.load(gb_ptr + ub_offs, mask=mask_ub, other=0.0).to(tl.float32)
    lse2 = tl.load(lse_ptr + seg * num_heads + heads, mask=mask_h, other=0.0) * 1.4426950408889634
    delta = tl.load(delta_ptr + seg * num_heads + heads, mask=mask_h, other=0.0)  # g . pooled

    du_a = tl.zeros([BLOCK_H, BLOCK_FA], tl.float32)
    du_b = tl.zeros([BLOCK_H, BLOCK_FB], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        mask_n = rows < end
        mask_xa = mask_n[:, None] & mask_fa[None, :]
        x_a = tl.load(xa_ptr + rows[:, None] * stride_xa + cols_a[None, :], mask=mask_xa, other=0.0).to(tl.float32)
        s = tl.dot(u_a, tl.trans(x_a), input_precision="ieee")  # (BLOCK_H, BLOCK_N)
        gx = tl.dot(g_a, tl.trans(x_a), input_precision="ieee")  # dL/dp
        if HAS_B:
            mask_xb = mask_n[:, None] & mask_fb[None, :]
            x_b = tl.load(xb_ptr + rows[:, None] * stride_xb + cols_b[None, :], mask=mask_xb, other=0.0).to(tl.float32)
            s += tl.dot(u_b, tl.trans(x_b), input_precision="ieee")
            gx += tl.dot(g_b, tl.trans(x_b), input_precision="ieee")
        p = tl.exp2(s * qk_scale - lse2[:, None])
        p = tl.where(mask_h[:, None] & mask_n[None, :], p, 0.0)
        ds = p * (gx - delta[:, None])  # dL/dlogit
        pt = tl.trans(p)
        dst = tl.trans(ds)
        dx_a = tl.dot(pt, g_a, input_precision="ieee") + scale * tl.dot(dst, u_a, input_precision="ieee")
        tl.store(dxa_ptr + rows[:, None] * stride_dxa + cols_a[None, :],
                 dx_a.to(dxa_ptr.dtype.element_ty), mask=mask_xa)
        du_a += tl.dot(ds, x_a, input_precision="ieee")
        if HAS_B:
            dx_b = tl.dot(pt, g_b, input_precision="ieee") + scale * tl.dot(dst, u_b, input_precision="ieee")
            tl.store(dxb_ptr + rows[:, None] * stride_dxb + cols_b[None, :],
                     dx_b.to(dxb_ptr.dtype.element_ty), mask=mask_xb)
            du_b += tl.dot(ds, x_b, input_precision="ieee")

    tl.store(dua_ptr + ua_offs, (du_a * scale).to(dua_ptr.dtype.element_ty), mask=mask_ua)
    if HAS_B:
        tl.store(dub_ptr + ub_offs, (du_b * scale).to(dub_ptr.dtype.element_ty), mask=mask_ub)


def interpreted() -> bool:
    """Whether these kernels were built for the Triton interpreter (``TRITON_INTERPRET=1``)."""
    return type(_pool_fwd_kernel).__name__ == "InterpretedFunction"


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` with unit stride along features (row stride may be anything, e.g. a column slice)."""
    return x if x.stride(1) == 1 else x.contiguous()


def _launch_sizes(fa: int, fb: int) -> tuple[int, int]:
    """Default ``(BLOCK_N, num_warps)``: smaller row blocks and more warps for wide rows (untuned)."""
    width = _pad(fa) + (_pad(fb) if fb else 0)
    return (32 if width <= 256 else 16), (4 if width < 512 else 8)


def _forward(x_a, x_b, offsets, u_a, u_b, scale, block_n, num_warps):
    """Launch the forward kernel; float32 pooled outputs and the log-sum-exp."""
    num_segments, num_heads, fa = u_a.shape
    fb = 0 if x_b is None else x_b.shape[1]
    dev = x_a.device
    pooled_a = torch.empty((num_segments, num_heads, fa), device=dev, dtype=torch.float32)
    pooled_b = None if x_b is None else torch.empty((num_segments, num_heads, fb), device=dev, dtype=torch.float32)
    lse = torch.empty((num_segments, num_heads), device=dev, dtype=torch.float32)
    if num_segments > 0:
        has_b = x_b is not None
        _pool_fwd_kernel[(num_segments,)](
            x_a, x_b if has_b else x_a, offsets, u_a, u_b if has_b else u_a,
            pooled_a, pooled_b if has_b else pooled_a, lse,
            x_a.stride(0), x_b.stride(0) if has_b else 0, num_heads, fa, fb, scale * _LOG2E,
            HAS_B=has_b, BLOCK_N=block_n, BLOCK_H=_pad(num_heads), BLOCK_FA=_pad(fa),
            BLOCK_FB=_pad(fb) if has_b else 16, num_warps=num_warps,
        )
    return pooled_a, pooled_b, lse


def _backward(x_a, x_b, offsets, u_a, u_b, scale, block_n, num_warps, lse, delta, g_a, g_b):
    """Launch the backward kernel; gradients for x_a, x_b, u_a, u_b in the input dtypes."""
    num_segments, num_heads, fa = u_a.shape
    has_b = x_b is not None
    fb = x_b.shape[1] if has_b else 0
    dx_a = torch.empty_like(x_a, memory_format=torch.contiguous_format)
    dx_b = torch.empty_like(x_b, memory_format=torch.contiguous_format) if has_b else None
    du_a = torch.empty_like(u_a)
    du_b = torch.empty_like(u_b) if has_b else None
    if num_segments > 0:
        _pool_bwd_kernel[(num_segments,)](
            x_a, x_b if has_b else x_a, offsets, u_a, u_b if has_b else u_a,
            g_a, g_b if has_b else g_a, lse, delta,
            dx_a, dx_b if has_b else dx_a, du_a, du_b if has_b else du_a,
            x_a.stride(0), x_b.stride(0) if has_b else 0, dx_a.stride(0), dx_b.stride(0) if has_b else 0,
            num_heads, fa, fb, scale, scale * _LOG2E,
            HAS_B=has_b, BLOCK_N=block_n, BLOCK_H=_pad(num_heads), BLOCK_FA=_pad(fa),
            BLOCK_FB=_pad(fb) if has_b else 16, num_warps=num_warps,
        )
    return dx_a, dx_b, du_a, du_b


class _SegmentSoftmaxPool(torch.autograd.Function):
    """Autograd wrapper: outputs ``(pooled_a, [pooled_b,] lse)``; ``lse`` is not differentiable."""

    @staticmethod
    def forward(ctx, x_a, x_b, offsets, u_a, u_b, scale, block_n, num_warps):
        pooled_a, pooled_b, lse = _forward(x_a, x_b, offsets, u_a, u_b, scale, block_n, num_warps)
        ctx.save_for_backward(x_a, x_b, offsets, u_a, u_b, pooled_a, pooled_b, lse)
        ctx.scale, ctx.block_n, ctx.num_warps = scale, block_n, num_warps
        ctx.mark_non_differentiable(lse)
        if x_b is None:
            return pooled_a.to(x_a.dtype), lse
        return pooled_a.to(x_a.dtype), pooled_b.to(x_b.dtype), lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        x_a, x_b, offsets, u_a, u_b, pooled_a, pooled_b, lse = ctx.saved_tensors
        g_a = grads[0].contiguous()
        delta = (g_a.float() * pooled_a).sum(-1)  # (S, H): g . pooled, the softmax-backward term
        g_b = None
        if x_b is not None:
            g_b = grads[1].contiguous()
            delta = delta + (g_b.float() * pooled_b).sum(-1)
        dx_a, dx_b, du_a, du_b = _backward(
            x_a, x_b, offsets, u_a, u_b, ctx.scale, ctx.block_n, ctx.num_warps, lse, delta.contiguous(), g_a, g_b
        )
        return dx_a, dx_b, None, du_a, du_b, None, None, None


def segment_softmax_pool_triton(
    x_a: torch.Tensor,
    x_b: torch.Tensor | None,
    offsets: torch.Tensor,
    u_a: torch.Tensor,
    u_b: torch.Tensor | None,
    scale: float,
    *,
    block_n: int | None = None,
) -> SegmentPoolOutput:
    """Triton version of :func:`visd.kernels.reference.segment_softmax_pool_reference`.

    Arguments as there (already validated by :func:`visd.kernels.segment_softmax_pool`);
    ``offsets`` int64. ``block_n`` (a power of two >= 16) overrides the row block size, for tests.
    Differentiable in ``x_a``, ``x_b``, ``u_a``, ``u_b`` (first order only).
    """
    fb = 0 if x_b is None else x_b.shape[1]
    default_block_n, num_warps = _launch_sizes(x_a.shape[1], fb)
    block_n = default_block_n if block_n is None else block_n
    x_a = _rows(x_a)
    x_b = None if x_b is None else _rows(x_b)
    u_a = u_a.contiguous()
    u_b = None if u_b is None else u_b.contiguous()
    out = _SegmentSoftmaxPool.apply(x_a, x_b, offsets.contiguous(), u_a, u_b, float(scale), block_n, num_warps)
    if x_b is None:
        return SegmentPoolOutput(pooled_a=out[0], pooled_b=None, lse=out[1])
    return SegmentPoolOutput(pooled_a=out[0], pooled_b=out[1], lse=out[2])

