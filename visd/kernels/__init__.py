"""Fused kernels of the pooling and quantisation hot paths, with pure-torch ground truth.

Two operations, each with a reference (:mod:`visd.kernels.reference`, plain torch) and a Triton
fast path (``triton_*.py``, imported on first use; importing this package never imports triton):

- :func:`segment_softmax_pool`: per segment and head, the softmax(single query)-weighted mean of
  the segment's rows: the part of one-query multi-head attention that scales with the tokens.
- :func:`nearest_code`: nearest codebook row of each vector (vector quantisation).

``backend="auto"`` runs Triton for CUDA tensors when triton is installed, the reference otherwise;
``"triton"`` and ``"reference"`` force one. See ``docs/kernels.md``.
"""

from __future__ import annotations

import torch

from visd.kernels._dispatch import (
    check_backend,
    load_triton_module,
    pool_unsupported,
    use_triton,
    validate_code_args,
    validate_pool_args,
)
from visd.kernels._outputs import NearestCodeOutput, SegmentPoolOutput
from visd.kernels.reference import (
    nearest_code_reference,
    segment_softmax_pool_reference,
)

__all__ = ["NearestCodeOutput", "SegmentPoolOutput", "nearest_code", "segment_softmax_pool"]


def segment_softmax_pool(
    x_a: torch.Tensor,
    x_b: torch.Tensor | None,
    offsets: torch.Tensor,
    u_a: torch.Tensor,
    u_b: torch.Tensor | None,
    scale: float,
    *,
    backend: str = "auto",
) -> SegmentPoolOutput:
    """Segmented multi-head single-query softmax pooling.

    For segment ``s`` (rows ``offsets[s]:offsets[s+1]`` of ``x_a``/``x_b``) and head ``h``::

        logits_i = scale * (x_a[i] . u_a[s, h] + x_b[i] . u_b[s, h])
        p = softmax(logits) over the rows i of segment s
        pooled_a[s, h] = sum_i p_i x_a[i],   pooled_b[s, h] = sum_i p_i x_b[i]

    Args:
        x_a: ``(N, Fa)`` float16/bfloat16/float32/float64, the rows of all segments concatenated
            (in the model: the original organ tokens). May be a column slice (unit feature stride
            is used without a copy).
        x_b: ``(N, Fb)`` same dtype and device, the second half of each row (in the model: the
            reconstructed tokens), or ``None``. Keeping the halves apart avoids materialising
            ``[x_a ; x_b]``.
        offsets: ``(S + 1,)`` int32/int64 on the same device: ``offsets[0] == 0``, non-decreasing,
            ``offsets[-1] == N``. Empty segments are allowed.
        u_a: ``(S, H, Fa)`` score vectors per segment and head, dtype of ``x_a``.
        u_b: ``(S, H, Fb)``, given exactly when ``x_b`` is.
        scale: finite real multiplying the logits (``1 / sqrt(head_dim)`` in attention).
        backend: ``"auto"``, ``"triton"`` or ``"reference"`` (see the module docstring).

    Returns:
        :class:`SegmentPoolOutput` ``(pooled_a, pooled_b, lse)``. ``pooled_*`` have the input dtype
        and are differentiable in ``x_a``, ``x_b``, ``u_a``, ``u_b``; an empty segment gives zeros
        (and zero gradients) with ``lse = -inf``. ``lse`` is float32 and detached. Triton
        accumulates in float32; the reference sums over rows in float64 (see ``docs/kernels.md``).

    Raises:
        InputError: bad shapes, dtypes, devices, offsets or backend; ``"triton"`` with CPU tensors
            when ``TRITON_INTERPRET=1`` is not set.
        MissingDependencyError: ``"triton"`` without triton installed.
    """
    check_backend(backend)
    offsets, scale = validate_pool_args(x_a, x_b, offsets, u_a, u_b, scale)
    unsupported = pool_unsupported(x_a, x_b, u_a)
    if use_triton(backend, x_a.device, "triton_pool", unsupported):
        return load_triton_module("triton_pool").segment_softmax_pool_triton(x_a, x_b, offsets, u_a, u_b, scale)
    return segment_softmax_pool_reference(x_a, x_b, offsets, u_a, u_b, scale)


def nearest_code(z: torch.Tensor, codebook: torch.Tensor, *, backend: str = "auto") -> NearestCodeOutput:
    """Nearest codebook row of each row of ``z`` (squared Euclidean distance).

    Args:
        z: ``(N, D)`` float16/bfloat16/float32/float64 vectors.
        codebook: ``(K, D)`` floating code vectors on the same device, ``K >= 1`` (its dtype may
            differ from ``z``'s).
        backend: ``"auto"``, ``"triton"`` or ``"reference"`` (see the module docstring).

    Returns:
        :class:`NearestCodeOutput` ``(indices, distances)``: ``(N,)`` int64 indices of
        ``argmin_k |z_n - e_k|^2`` with ties to the lowest index, and ``(N,)`` float32 minimum
        squared distances computed in float32 as ``|z|^2 - 2 z.e + |e|^2`` (float64 for float64
        inputs, reference only), clamped at 0. Neither output carries a gradient and the inputs'
        autograd graphs are untouched: gather ``codebook[indices]`` to get a differentiable
        quantised vector.

    Raises:
        InputError: bad shapes, dtypes, devices or backend; ``"triton"`` with CPU tensors when
            ``TRITON_INTERPRET=1`` is not set.
        MissingDependencyError: ``"triton"`` without triton installed.
    """
    check_backend(backend)
    validate_code_args(z, codebook)
    unsupported = None
    if torch.float64 in (z.dtype, codebook.dtype):
        unsupported = "float64 inputs (the Triton kernel computes in float32)"
    if use_triton(backend, z.device, "triton_codebook", unsupported):
        return load_triton_module("triton_codebook").nearest_code_triton(z, codebook)
    return nearest_code_reference(z, codebook)
