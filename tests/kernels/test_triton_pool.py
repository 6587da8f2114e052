"""The Triton pooling kernel against the reference, forward and backward (interpreter on CPU)."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from visd.kernels import segment_softmax_pool
from visd.kernels.reference import segment_softmax_pool_reference

from ._helpers import assert_close, pool_grads, pool_inputs
from .test_reference import _mha_setup, identity, mha_oracle

pytestmark = pytest.mark.usefixtures("needs_triton")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (segment sizes, Fa, Fb, heads). With block_n=16: a 1-token segment, empty segments, segments
# longer than a block and exactly one block, N = 74 not a multiple of the block, features that are
# not powers of two, H = 4 as in the model, x_b absent, and no rows at all.
CASES = {
    "mixed": ([1, 0, 40, 17, 16], 20, 12, 3),
    "model-heads": ([5, 33], 32, 32, 4),
    "single-input": ([0, 3, 50], 24, 0, 1),
    "all-empty": ([0, 0], 8, 8, 2),
}


def _triton(*args, block_n=None):
    from visd.kernels.triton_pool import segment_softmax_pool_triton

    return segment_softmax_pool_triton(*args, block_n=block_n)


def assert_matches_reference(out, expected, inputs, dtype, check_grads=True):
    assert out.pooled_a.dtype == dtype and out.lse.dtype == torch.float32
    assert not out.lse.requires_grad
    assert_close(out.pooled_a, expected.pooled_a, dtype)
    assert (out.pooled_b is None) == (expected.pooled_b is None)
    if out.pooled_b is not None:
        assert_close(out.pooled_b, expected.pooled_b, dtype)
    assert torch.equal(torch.isinf(out.lse), torch.isinf(expected.lse))  # -inf exactly for empty segments
    finite = torch.isfinite(expected.lse)
    torch.testing.assert_close(out.lse[finite], expected.lse[finite], rtol=1e-5, atol=1e-5)
    if check_grads:
        for got, want in zip(pool_grads(out, inputs), pool_grads(expected, inputs), strict=True):
            assert got.dtype == dtype
            assert_close(got, want, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_forward_backward_match_reference(case, dtype, device):
    lengths, fa, fb, heads = CASES[case]
    inputs = pool_inputs(lengths, fa, fb, heads, dtype, device, seed=len(lengths) + fa)
    scale = 1.0 / math.sqrt(fa + fb)  # logits of order 1: neither uniform nor one-hot weights
    out = _triton(*inputs, scale, block_n=16)
    expected = segment_softmax_pool_reference(*inputs, scale)
    assert_matches_reference(out, expected, inputs, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_public_function_default_blocks(dtype, device):
    inputs = pool_inputs([70, 2, 0, 31], 40, 24, 4, dtype, device, seed=9)
    out = segment_softmax_pool(*inputs, 0.2, backend="triton")
    assert_matches_reference(out, segment_softmax_pool_reference(*inputs, 0.2), inputs, dtype)


def test_column_slices_of_one_hybrid_tensor(device):
    # In the model x_a and x_b may be views of one (N, 2C) tensor: a row stride != feature count.
    g = torch.Generator().manual_seed(4)
    hybrid = torch.randn(45, 48, generator=g).to(device).requires_grad_()
    u = torch.randn(2, 2, 48, generator=g).to(device).requires_grad_()
    offsets = torch.tensor([0, 20, 45], device=device)
    args = (hybrid[:, :32], hybrid[:, 32:], offsets, u[..., :32], u[..., 32:])
    out = _triton(*args, 0.25, block_n=16)
    expected = segment_softmax_pool_reference(*args, 0.25)
    assert_matches_reference(out, expected, (hybrid, u), torch.float32)


def test_unused_output_gets_zero_upstream_gradient(device):
    # Only pooled_a feeds the loss: autograd passes zeros for pooled_b's gradient.
    x_a, x_b, offsets, u_a, u_b = pool_inputs([6, 19], 10, 6, 2, torch.float32, device, seed=8)
    got = torch.autograd.grad(_triton(x_a, x_b, offsets, u_a, u_b, 0.5, block_n=16).pooled_a.sum(), [x_a, x_b, u_a, u_b])
    want = torch.autograd.grad(
        segment_softmax_pool_reference(x_a, x_b, offsets, u_a, u_b, 0.5).pooled_a.sum(), [x_a, x_b, u_a, u_b]
    )
    for a, e in zip(got, want, strict=True):
        assert_close(a, e, torch.float32)


def test_no_segments(device):
    x = torch.zeros(0, 4, device=device)
    out = segment_softmax_pool(x, None, torch.zeros(1, dtype=torch.int64, device=device),
                               torch.zeros(0, 2, 4, device=device), None, 1.0, backend="triton")
    assert out.pooled_a.shape == (0, 2, 4) and out.lse.shape == (0, 2)


def test_single_query_attention_with_triton_pool(device):
    # The model's path: the identity of reference.py with the Triton kernel as the pool, vs torch MHA.
    lengths = [5, 1, 30]
    attn, weight, bias, query = _mha_setup(16, 2, 8, 8, len(lengths), per_segment_map=True)
    x_a, x_b, offsets, _, _ = pool_inputs(lengths, 8, 8, 1, torch.float64, seed=12)
    expected = mha_oracle(attn, x_a, x_b, offsets, query, weight, bias)
    attn, weight, bias, query, x_a, x_b = (
        t.to(device=device, dtype=torch.float32) for t in (attn, weight, bias, query, x_a.detach(), x_b.detach())
    )
    pool = functools.partial(segment_softmax_pool, backend="triton")
    actual = identity(attn, x_a, x_b, offsets.to(device), query, weight, bias, pool=pool)
    assert_close(actual, expected, torch.float32)
