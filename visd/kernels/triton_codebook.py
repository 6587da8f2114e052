"""Triton fast path of :func:`visd.kernels.nearest_code`.

Imported lazily by :mod:`visd.kernels` (importing this module imports triton). One program per
block of ``BLOCK_M`` rows of ``z``; it streams the codebook in tiles of ``BLOCK_K`` codes (and the
feature axis in chunks of ``BLOCK_D``), keeping only a running minimum and its index per row, so
the ``(N, K)`` distance matrix is never materialised. Distances are float32
``|z|^2 - 2 z.e + |e|^2`` (``tl.dot`` with ``input_precision="ieee"``, no TF32), the arithmetic
of the reference. Ties: ``tl.min(..., return_indices=True)`` keeps the leftmost index inside a
tile and a later tile replaces the running minimum only when strictly smaller, so the lowest
index wins, as with :func:`torch.argmin`. Nothing here is differentiable.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from visd.kernels._outputs import NearestCodeOutput

__all__ = ["interpreted", "nearest_code_triton"]


@triton.jit
def _nearest_code_kernel(
    z_ptr, e_ptr, idx_ptr, dist_ptr, n, k, d, stride_z, stride_e,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = rows < n

    z_sq = tl.zeros([BLOCK_M], tl.float32)
    for d0 in range(0, d, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        z = tl.load(z_ptr + rows[:, None] * stride_z + cols[None, :],
                    mask=mask_m[:, None] & (cols < d)[None, :], other=0.0).to(tl.float32)
        z_sq += tl.sum(z * z, axis=1)

    best = tl.full([BLOCK_M], float("inf"), tl.float32)
    best_idx = tl.zeros([BLOCK_M], tl.int64)
    for k0 in range(0, k, BLOCK_K):
        codes = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        mask_k = codes < k
        dots = tl.zeros([BLOCK_M, BLOCK_K], tl.float32)
        e_sq = tl.zeros([BLOCK_K], tl.float32)
        for d0 in range(0, d, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            mask_d = cols < d
            z = tl.load(z_ptr + rows[:, None] * stride_z + cols[None, :],
                        mask=mask_m[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
            e = tl.load(e_ptr + codes[:, None] * stride_e + cols[None, :],
                        mask=mask_k[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
            dots += tl.dot(z, tl.trans(e), input_precision="ieee")
            e_sq += tl.sum(e * e, axis=1)
        dist = z_sq[:, None] - 2.0 * dots + e_sq[None, :]
        dist = tl.where(mask_k[None, :], dist, float("inf"))
        tile_best, tile_idx = tl.min(dist, axis=1, return_indices=True, return_indices_tie_break_left=True)
        better = tile_best < best  # strict: an equal distance in a later tile has a higher index
        best = tl.where(better, tile_best, best)
        best_idx = tl.where(better, tile_idx.to(tl.int64) + k0, best_idx)

    tl.store(idx_ptr + rows, best_idx, mask=mask_m)
    tl.store(dist_ptr + rows, tl.maximum(best, 0.0), mask=mask_m)


def interpreted() -> bool:
    """Whether this kernel was built for the Triton interpreter (``TRITON_INTERPRET=1``)."""
    return type(_nearest_code_kernel).__name__ == "InterpretedFunction"


def nearest_code_triton(
    z: torch.Tensor,
    codebook: torch.Tensor,
    *,
    block_m: int = 64,
    block_k: int = 64,
    block_d: int | None = None,
) -> NearestCodeOutput:
    """Triton version of :func:`visd.kernels.reference.nearest_code_reference`.

    Arguments as there (already validated by :func:`visd.kernels.nearest_code`). The block sizes
    (powers of two >= 16) are exposed for tests; ``block_d`` defaults to the padded feature size,
    at most 64.
    """
    n, d = z.shape
    k = codebook.shape[0]
    if block_d is None:
        block_d = min(64, max(16, triton.next_power_of_2(d)))
    z = z.detach()
    codebook = codebook.detach()
    z = z if z.stride(1) == 1 else z.contiguous()
    codebook = codebook if codebook.stride(1) == 1 else codebook.contiguous()
    indices = torch.empty((n,), device=z.device, dtype=torch.int64)
    distances = torch.empty((n,), device=z.device, dtype=torch.float32)
    if n > 0:
        _nearest_code_kernel[(triton.cdiv(n, block_m),)](
            z, codebook, indices, distances, n, k, d, z.stride(0), codebook.stride(0),
            BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_D=block_d, num_warps=4,
        )
    return NearestCodeOutput(indices=indices, distances=distances)
