"""The normality VQ-VAE: quantiser known answers, the EMA update, straight-through gradients."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from visd.config import NormalityConfig
from visd.models.normality import EMAQuantizer, NormalityModel, minmax_scale


def _quantizer(k=4, dim=3, decay=0.5, eps=1e-5, commitment=0.25):
    cfg = NormalityConfig(dim=dim, codebook_size=k, decay=decay, eps=eps, commitment_cost=commitment)
    return EMAQuantizer(cfg)


def test_exact_codebook_vectors_give_their_indices_and_zero_loss(generator):
    q = _quantizer(k=6, dim=5)
    q.embeddings.copy_(torch.randn(6, 5, generator=generator))
    idx = torch.tensor([3, 0, 5, 1, 2, 4])
    z = q.embeddings[idx].clone()
    q.eval()
    out = q(z)
    assert out.codes.tolist() == idx.tolist()
    assert torch.equal(out.quantized, z)
    q.train()
    out = q(z)  # every code used once: the EMA update keeps each row where it is
    assert out.codes.tolist() == idx.tolist()
    torch.testing.assert_close(q.embeddings[idx], z, rtol=0, atol=1e-6)
    assert float(out.commitment_loss) < 1e-10


def test_nearest_ties_go_to_lowest_index():
    q = _quantizer(k=3, dim=2)
    q.embeddings.copy_(torch.tensor([[1.0, 0.0], [1.0, 0.0], [-1.0, 0.0]]))
    assert q.nearest(torch.tensor([[0.9, 0.1]])).tolist() == [0]


def test_ema_update_worked_example():
    """decay 0.5: after one step each used row is the mean of its assigned vectors."""
    q = _quantizer(k=2, dim=2, decay=0.5, eps=1e-5)
    q.embeddings.copy_(torch.tensor([[0.0, 0.0], [10.0, 10.0]]))
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [9.0, 10.0]])
    q.train()
    out = q(z)
    assert out.codes.tolist() == [0, 0, 1]
    # hand computation: counts [2, 1] -> debiased cluster sizes [2, 1]; n = 3, K = 2
    eps, n = 1e-5, 3.0
    c0, c1 = (2 + eps) / (n + 2 * eps) * n, (1 + eps) / (n + 2 * eps) * n
    expected = torch.tensor([[1.0 / c0, 1.0 / c0], [9.0 / c1, 10.0 / c1]])
    torch.testing.assert_close(q.embeddings, expected, rtol=1e-6, atol=1e-6)
    assert torch.allclose(q.ema_cluster_size.hidden, torch.tensor([1.0, 0.5]))
    assert int(q.ema_steps) == 1
    # second step, same data: the debiased averages are unchanged
    q(z)
    torch.testing.assert_close(q.embeddings, expected, rtol=1e-6, atol=1e-6)
    # commitment loss = 0.25 * mse(z, q) with the updated codebook
    out = q(z)
    expected_loss = 0.25 * torch.mean((z - expected[out.codes]) ** 2)
    torch.testing.assert_close(out.commitment_loss, expected_loss)


def test_straight_through_gradient_is_identity(generator):
    q = _quantizer(k=4, dim=3, commitment=0.0)
    q.train()
    z = torch.randn(5, 3, generator=generator, requires_grad=True)
    upstream = torch.randn(5, 3, generator=generator)
    out = q(z)
    (out.quantized * upstream).sum().backward()
    torch.testing.assert_close(z.grad, upstream)
    torch.testing.assert_close(out.quantized.detach(), q.embeddings[out.codes])


def test_minmax_scale_known_answer():
    x = torch.tensor([[1.0, 3.0], [5.0, 2.0]])
    scaled, mn, mx = minmax_scale(x)
    assert float(mn) == 1.0 and float(mx) == 4.0
    torch.testing.assert_close(scaled, torch.tensor([[-0.5, 0.0], [0.5, -0.25]]))


def test_reconstruction_undoes_scaling(generator):
    cfg = NormalityConfig(hidden_dim=16, dim=24, depth=1, heads=2, head_dim=8, mlp_dim=32, codebook_size=8)
    model = NormalityModel(8, cfg).eval()
    tokens = torch.randn(7, 8, generator=generator) * 3 + 1
    (out,) = model([tokens], [2])
    mn = tokens.min()
    mx = (tokens - mn).max()
    torch.testing.assert_close(out.reconstruction, (out.decoded + 0.5) * mx + mn)
    # the decoder sees only the quantised codes: equal codes give equal decoded rows
    same = out.codes[:, None] == out.codes[None, :]
    dist = torch.cdist(out.decoded, out.decoded)
    # rows with equal codes differ only through attention context, which is shared: identical rows
    assert torch.all(dist[same] < 1e-5)


def test_fused_attention_matches_the_official_order(generator, monkeypatch):
    """``fused_attention`` (scaled_dot_product_attention) computes the same function as the official
    matmul-softmax-matmul order: the same codes, continuous outputs equal to float rounding."""
    cfg = NormalityConfig(hidden_dim=32, dim=48, depth=2, heads=4, head_dim=12, mlp_dim=64, codebook_size=16)
    model = NormalityModel(16, cfg).eval()
    tokens = torch.randn(300, 16, generator=generator)
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    with torch.no_grad():
        (plain,) = model([tokens], [1])
        assert not calls
        (fused,) = model([tokens], [1], fused_attention=True)
    assert len(calls) == 2 * cfg.depth  # every attention of the encoder and the decoder
    assert torch.equal(fused.codes, plain.codes)
    torch.testing.assert_close(fused.encoded, plain.encoded, rtol=0, atol=1e-5)
    torch.testing.assert_close(fused.reconstruction, plain.reconstruction, rtol=0, atol=1e-5)


def test_many_organs_in_one_call_equal_each_alone_and_update_the_codebook_once(generator):
    cfg = NormalityConfig(hidden_dim=16, dim=24, depth=1, heads=2, head_dim=8, mlp_dim=32, codebook_size=8)
    model = NormalityModel(8, cfg).eval()
    tokens = [torch.randn(n, 8, generator=generator) for n in (5, 1, 9)]
    with torch.no_grad():
        together = model(tokens, [0, 3, 1])
        alone = [model([t], [o])[0] for t, o in zip(tokens, [0, 3, 1])]
    for a, b in zip(together, alone):  # the codes are looked up row by row: the same bits
        assert torch.equal(a.codes, b.codes) and torch.equal(a.reconstruction, b.reconstruction)
    model.train()
    steps = int(model.quantizer.ema_steps)
    model(tokens, [0, 3, 1])
    assert int(model.quantizer.ema_steps) == steps + 1  # one EMA update for three organs
    before = model.quantizer.embeddings.clone()
    assert model([], []) == []
    assert int(model.quantizer.ema_steps) == steps + 1 and torch.equal(model.quantizer.embeddings, before)
