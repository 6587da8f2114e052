"""Hybrid fusion and query attention pooling."""

from __future__ import annotations

import torch

from visd.models.pooling import OrganPooling


def test_attend_matches_explicit_attention(generator):
    torch.manual_seed(0)
    pool = OrganPooling(num_organs=2, dim=8, heads=2).eval()
    orig, normal = torch.randn(5, 8, generator=generator), torch.randn(5, 8, generator=generator)
    out = pool.attend(orig, normal, organ_index=1)
    # explicit: fused tokens, per-head softmax(q k^T / sqrt(d)) v, output projection
    fused = pool.fuse2[1](pool.fuse1[1](torch.cat([orig, normal], -1)))
    w, b = pool.attention.in_proj_weight, pool.attention.in_proj_bias
    q = pool.query_tokens[1] @ w[:8].t() + b[:8]
    k = fused @ w[8:16].t() + b[8:16]
    v = fused @ w[16:].t() + b[16:]
    heads = []
    for h in range(2):
        s = slice(4 * h, 4 * h + 4)
        p = torch.softmax(k[:, s] @ q[s] / 2.0, 0)
        heads.append(p @ v[:, s])
    expected = pool.attention.out_proj(torch.cat(heads))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_pooling_is_invariant_to_token_order(generator):
    pool = OrganPooling(num_organs=1, dim=8, heads=2).eval()
    orig, normal = torch.randn(9, 8, generator=generator), torch.randn(9, 8, generator=generator)
    perm = torch.randperm(9, generator=generator)
    torch.testing.assert_close(pool.attend(orig, normal, 0), pool.attend(orig[perm], normal[perm], 0), rtol=1e-5, atol=1e-6)
