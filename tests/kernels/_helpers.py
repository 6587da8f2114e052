"""Input builders and per-dtype tolerances shared by the kernel tests."""

from __future__ import annotations

import torch

# Per-dtype tolerances, relative to the largest magnitude of the expected tensor (see assert_close).
# float32: both sides accumulate in float32, so differences are a few float32 ulps.
# float16/bfloat16: both sides accumulate in float32 and round once at the end (results may differ
# by one or two ulps of the storage dtype: 2**-11 and 2**-8 relative).
TOLERANCES = {
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
    torch.float64: 1e-12,
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """``|actual - expected| <= tol * (|expected| + max(1, max|expected|))`` elementwise."""
    tol = TOLERANCES[dtype]
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    a, e = actual.double(), expected.double()
    scale = max(1.0, e.abs().max().item()) if e.numel() else 1.0
    torch.testing.assert_close(a, e, rtol=tol, atol=tol * scale)


def offsets_from(lengths: list[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """``(S + 1,)`` int64 boundaries of segments with the given sizes."""
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return torch.tensor(out, dtype=torch.int64, device=device)


def pool_inputs(lengths, fa, fb, heads, dtype, device="cpu", seed=0):
    """Random ``x_a, x_b, offsets, u_a, u_b`` (leaf tensors requiring grad); ``fb=0`` gives no b."""
    g = torch.Generator().manual_seed(seed)
    n, s = sum(lengths), len(lengths)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype).requires_grad_()

    x_a, u_a = rand(n, fa), rand(s, heads, fa)
    x_b, u_b = (rand(n, fb), rand(s, heads, fb)) if fb else (None, None)
    return x_a, x_b, offsets_from(lengths, device), u_a, u_b


def pool_grads(out, inputs, seed=1):
    """Gradients of ``sum(g_a * pooled_a) + sum(g_b * pooled_b)`` with seeded random ``g``."""
    g = torch.Generator().manual_seed(seed)
    loss = 0.0
    for pooled in (out.pooled_a, out.pooled_b):
        if pooled is not None:
            upstream = torch.randn(pooled.shape, generator=g).to(pooled.device, pooled.dtype)
            loss = loss + (pooled.float() * upstream.float()).sum()
    return torch.autograd.grad(loss, [t for t in inputs if t is not None and t.requires_grad])


def codebook_inputs(n, k, d, dtype, device="cpu", seed=0, noise=0.01):
    """A random codebook and rows ``z`` = chosen codes + small noise (nearest code well separated)."""
    g = torch.Generator().manual_seed(seed)
    codebook = torch.randn(k, d, generator=g)
    pick = torch.randint(0, k, (n,), generator=g)
    z = codebook[pick] + noise * torch.randn(n, d, generator=g)
    return z.to(device=device, dtype=dtype), codebook.to(device=device, dtype=dtype)


def brute_force_nearest(z: torch.Tensor, codebook: torch.Tensor):
    """float64 ``((z_n - e_k)^2).sum()`` for every pair: indices, distances and the gap to the runner-up."""
    d = ((z.double()[:, None, :] - codebook.double()[None, :, :]) ** 2).sum(-1)
    top = d.topk(min(2, d.shape[1]), dim=1, largest=False)
    gap = (top.values[:, 1] - top.values[:, 0]) if d.shape[1] > 1 else torch.full_like(top.values[:, 0], float("inf"))
    return d.argmin(dim=1), top.values[:, 0], gap
