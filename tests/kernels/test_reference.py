"""The pure-torch ground truth against known answers, an independent formulation and torch's MHA."""

from __future__ import annotations

import math

import pytest
import torch

from visd.kernels import reference
from visd.kernels.reference import (
    nearest_code_reference,
    segment_softmax_pool_reference,
    single_query_attention_reference,
)

from ._helpers import assert_close, brute_force_nearest, codebook_inputs, offsets_from, pool_inputs


def test_two_tokens_known_answer():
    # Head 0 scores the tokens ln 3 and 0 -> p = (3/4, 1/4); head 1 scores both 0 -> p = (1/2, 1/2).
    x_a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    x_b = torch.tensor([[2.0], [4.0]])
    u_a = torch.tensor([[[math.log(3.0), 0.0], [0.0, 0.0]]])
    u_b = torch.zeros(1, 2, 1)
    out = segment_softmax_pool_reference(x_a, x_b, offsets_from([2]), u_a, u_b, 1.0)
    torch.testing.assert_close(out.pooled_a, torch.tensor([[[0.75, 0.25], [0.5, 0.5]]]))
    torch.testing.assert_close(out.pooled_b, torch.tensor([[[2.5], [3.0]]]))
    torch.testing.assert_close(out.lse, torch.tensor([[math.log(4.0), math.log(2.0)]]))


def test_scale_multiplies_logits():
    # Scale 2 on logits (ln 3, 0) gives weights (9/10, 1/10).
    x_a = torch.tensor([[10.0], [0.0]])
    u_a = torch.tensor([[[math.log(3.0)]]]) / 10.0
    out = segment_softmax_pool_reference(x_a, None, offsets_from([2]), u_a, None, 2.0)
    torch.testing.assert_close(out.pooled_a, torch.tensor([[[9.0]]]))
    assert out.pooled_b is None


def test_single_token_and_empty_segments():
    x_a, x_b, offsets, u_a, u_b = pool_inputs([0, 1, 0], 5, 3, 2, torch.float64)
    out = segment_softmax_pool_reference(x_a, x_b, offsets, u_a, u_b, 0.7)
    # One token: every head returns it, and lse is its own logit.
    torch.testing.assert_close(out.pooled_a[1], x_a[0].expand(2, 5))
    torch.testing.assert_close(out.pooled_b[1], x_b[0].expand(2, 3))
    logit = 0.7 * (u_a[1] @ x_a[0] + u_b[1] @ x_b[0])
    torch.testing.assert_close(out.lse[1], logit.float())
    # Empty segments: zeros and -inf, with zero gradient for their score vectors.
    assert torch.equal(out.pooled_a[[0, 2]], torch.zeros(2, 2, 5, dtype=torch.float64))
    assert torch.equal(out.lse[[0, 2]], torch.full((2, 2), -math.inf))
    (out.pooled_a.sum() + out.pooled_b.sum()).backward()
    assert torch.equal(u_a.grad[[0, 2]], torch.zeros(2, 2, 5, dtype=torch.float64))
    # One token: the softmax weight is 1 whatever u is, so u gets no gradient either.
    torch.testing.assert_close(u_a.grad[1], torch.zeros(2, 5, dtype=torch.float64))


def _dense_masked_pool(x_a, x_b, offsets, u_a, u_b, scale):
    """Independent formulation: every (segment, head) scores all N rows, other segments masked."""
    x = x_a if x_b is None else torch.cat([x_a, x_b], dim=1)  # (N, F)
    u = u_a if u_b is None else torch.cat([u_a, u_b], dim=2)  # (S, H, F)
    rows = torch.arange(x.shape[0])
    inside = (rows[None, :] >= offsets[:-1, None]) & (rows[None, :] < offsets[1:, None])  # (S, N)
    logits = scale * torch.einsum("shf,nf->shn", u, x)
    logits = logits.masked_fill(~inside[:, None, :], -math.inf)
    p = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # empty segment: all -inf -> nan -> 0
    pooled = torch.einsum("shn,nf->shf", p, x)
    return pooled[..., : x_a.shape[1]], pooled[..., x_a.shape[1] :], torch.logsumexp(logits, dim=-1)


@pytest.mark.parametrize(
    ("lengths", "fa", "fb", "heads"),
    [([3, 0, 7, 1], 6, 4, 3), ([12], 5, 0, 1), ([2, 9, 4, 4, 0], 8, 8, 4)],
)
def test_matches_dense_masked_formulation(lengths, fa, fb, heads):
    inputs = pool_inputs(lengths, fa, fb, heads, torch.float64, seed=3)
    out = segment_softmax_pool_reference(*inputs, 0.4)
    pooled_a, pooled_b, lse = _dense_masked_pool(*inputs, 0.4)
    assert_close(out.pooled_a, pooled_a, torch.float64)
    if fb:
        assert_close(out.pooled_b, pooled_b, torch.float64)
    torch.testing.assert_close(out.lse, lse.float())


def test_gradcheck_float64():
    x_a, x_b, offsets, u_a, u_b = pool_inputs([2, 0, 3], 3, 2, 2, torch.float64, seed=5)

    def f(x_a, x_b, u_a, u_b):
        out = segment_softmax_pool_reference(x_a, x_b, offsets, u_a, u_b, 0.9)
        return out.pooled_a, out.pooled_b

    assert torch.autograd.gradcheck(f, (x_a, x_b, u_a, u_b))


def test_low_precision_inputs_accumulate_in_float32():
    x_a, x_b, offsets, u_a, u_b = pool_inputs([40, 3], 16, 8, 2, torch.float32, seed=7)
    for dtype in (torch.float16, torch.bfloat16):
        args = [t.detach().to(dtype) for t in (x_a, x_b, u_a, u_b)]
        out = segment_softmax_pool_reference(args[0], args[1], offsets, args[2], args[3], 0.3)
        assert out.pooled_a.dtype == dtype and out.lse.dtype == torch.float32
        # Same inputs (rounded to dtype) computed in float64: the result is the float64 one, rounded once.
        rounded = segment_softmax_pool_reference(*(t.double() for t in args[:2]), offsets,
                                                 *(t.double() for t in args[2:]), 0.3)
        assert_close(out.pooled_a, rounded.pooled_a, dtype)
        assert_close(out.pooled_b, rounded.pooled_b, dtype)


def test_long_segments_are_summed_accurately():
    """A lung has ~500,000 level-1 tokens: the weighted sum over them is done in float64, so a float32
    input gives the float64 result rounded once (a float32 matrix product was 1.3e-4 off here)."""
    g = torch.Generator().manual_seed(0)
    n = 300_000
    x = torch.rand(n, 64, generator=g)
    u = torch.randn(1, 4, 64, generator=g) * 0.01  # near-uniform weights: a plain mean, no cancellation
    offsets = torch.tensor([0, n])
    out = segment_softmax_pool_reference(x, None, offsets, u, None, 0.125)
    exact = segment_softmax_pool_reference(x.double(), None, offsets, u.double(), None, 0.125)
    rel = (out.pooled_a.double() - exact.pooled_a).abs().max() / exact.pooled_a.abs().max()
    assert rel < 2e-7
    assert (out.lse.double() - exact.lse).abs().max() < 1e-5


def _mha_setup(embed_dim, heads, fa, fb, num_segments, per_segment_map, seed=0):
    g = torch.Generator().manual_seed(seed)
    attn = torch.nn.MultiheadAttention(embed_dim, heads, batch_first=True).double().eval()
    with torch.no_grad():
        for p in attn.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.4)
    shape = (num_segments, embed_dim, fa + fb) if per_segment_map else (embed_dim, fa + fb)
    weight = torch.randn(shape, generator=g, dtype=torch.float64) * 0.3
    bias = torch.randn(shape[:-1], generator=g, dtype=torch.float64) * 0.3
    query = torch.randn(num_segments, embed_dim, generator=g, dtype=torch.float64)
    return attn, weight, bias, query


def mha_oracle(attn, x_a, x_b, offsets, query, weight, bias):
    """torch.nn.MultiheadAttention run segment by segment on t = W x + c (keys = values = t)."""
    x = x_a if x_b is None else torch.cat([x_a, x_b], dim=1)
    outs = []
    for s in range(query.shape[0]):
        w = weight[s] if weight.dim() == 3 else weight
        c = bias[s] if bias.dim() == 2 else bias
        t = x[offsets[s] : offsets[s + 1]] @ w.T + c
        out, _ = attn(query[s][None, None], t[None], t[None], need_weights=False)
        outs.append(out[0, 0])
    return torch.stack(outs)


def identity(attn, x_a, x_b, offsets, query, weight, bias, pool=None):
    return single_query_attention_reference(
        x_a, x_b, offsets, query, token_weight=weight, token_bias=bias,
        in_proj_weight=attn.in_proj_weight, in_proj_bias=attn.in_proj_bias,
        out_proj_weight=attn.out_proj.weight, out_proj_bias=attn.out_proj.bias,
        num_heads=attn.num_heads, pool=pool,
    )


@pytest.mark.parametrize("per_segment_map", [False, True], ids=["shared-map", "per-segment-map"])
@pytest.mark.parametrize("fb", [8, 0], ids=["hybrid", "single"])
def test_single_query_attention_equals_torch_mha(per_segment_map, fb):
    lengths = [5, 1, 9]
    attn, weight, bias, query = _mha_setup(16, 2, 8, fb, len(lengths), per_segment_map)
    x_a, x_b, offsets, _, _ = pool_inputs(lengths, 8, fb, 1, torch.float64, seed=11)
    expected = mha_oracle(attn, x_a, x_b, offsets, query, weight, bias)
    actual = identity(attn, x_a, x_b, offsets, query, weight, bias)
    assert_close(actual, expected, torch.float64)
    # The identity holds for training too: same gradients for inputs, query and attention weights.
    wrt = [t for t in (x_a, x_b, query, attn.in_proj_weight, attn.out_proj.weight) if t is not None]
    query.requires_grad_()
    g_up = torch.randn(expected.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    expected = mha_oracle(attn, x_a, x_b, offsets, query, weight, bias)
    actual = identity(attn, x_a, x_b, offsets, query, weight, bias)
    grads_expected = torch.autograd.grad((expected * g_up).sum(), wrt)
    grads_actual = torch.autograd.grad((actual * g_up).sum(), wrt)
    for a, e in zip(grads_actual, grads_expected, strict=True):
        assert_close(a, e, torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_nearest_code_reference_matches_brute_force(dtype):
    z, codebook = codebook_inputs(200, 37, 12, dtype, seed=4)
    idx, dist, gap = brute_force_nearest(z, codebook)
    assert gap.min() > 1e-3  # the data are unambiguous at float32 precision
    out = nearest_code_reference(z, codebook)
    assert out.indices.dtype == torch.int64 and out.distances.dtype == torch.float32
    assert torch.equal(out.indices, idx)
    # float32 cancellation in |z|^2 - 2 z.e + |e|^2: error ~ eps32 * (|z|^2 + |e|^2).
    atol = 8 * torch.finfo(torch.float32).eps * (z.double().pow(2).sum(1).max() + codebook.double().pow(2).sum(1).max())
    torch.testing.assert_close(out.distances.double(), dist, rtol=0, atol=atol.item())


def test_nearest_code_reference_ties_go_to_lowest_index():
    codebook = torch.tensor([[1.0, 0.0], [3.0, 0.0], [-1.0, 0.0], [3.0, 0.0], [1.0, 0.0]])
    z = torch.tensor([[0.0, 0.0], [2.0, 0.0], [3.0, 0.0], [1.0, 0.0]])
    out = nearest_code_reference(z, codebook)
    # z0: codes 0 and 2 at distance 1; z1: codes 0, 1, 3, 4 at 1; z2: duplicates 1 and 3; z3: 0 and 4.
    assert out.indices.tolist() == [0, 0, 1, 0]
    assert out.distances.tolist() == [1.0, 1.0, 0.0, 0.0]


def test_nearest_code_reference_chunks_rows(monkeypatch):
    z, codebook = codebook_inputs(50, 9, 4, torch.float32, seed=6)
    whole = nearest_code_reference(z, codebook)
    monkeypatch.setattr(reference, "_DISTANCE_BUDGET", 20)  # 2 rows per chunk
    chunked = nearest_code_reference(z, codebook)
    # The chunks are matrix products of other sizes, which BLAS may block differently (it does on AMX
    # CPUs): the indices are equal, the distances equal to float32 rounding of the same expression.
    idx, dist, gap = brute_force_nearest(z, codebook)
    assert gap.min() > 1e-3  # the data are unambiguous at float32 precision
    assert torch.equal(whole.indices, chunked.indices) and torch.equal(whole.indices, idx)
    atol = 8 * torch.finfo(torch.float32).eps * (z.double().pow(2).sum(1).max() + codebook.double().pow(2).sum(1).max())
    torch.testing.assert_close(chunked.distances, whole.distances, rtol=0, atol=atol.item())
    torch.testing.assert_close(chunked.distances.double(), dist, rtol=0, atol=atol.item())
