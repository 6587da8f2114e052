"""The Triton nearest-code kernel against the reference and the brute-force definition."""

from __future__ import annotations

import pytest
import torch

from visd.kernels import nearest_code
from visd.kernels.reference import nearest_code_reference

from ._helpers import brute_force_nearest, codebook_inputs

pytestmark = pytest.mark.usefixtures("needs_triton")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (N, K, D, blocks): several code tiles with a ragged last one, D not a multiple of the D chunk,
# fewer codes than one tile, and the default blocks with several row programs.
CASES = {
    "tiled": (50, 70, 24, dict(block_m=16, block_k=16, block_d=16)),
    "tiny": (9, 5, 3, dict(block_m=16, block_k=16, block_d=16)),
    "default-blocks": (130, 300, 40, {}),
}


def _triton(z, codebook, **blocks):
    from visd.kernels.triton_codebook import nearest_code_triton

    return nearest_code_triton(z, codebook, **blocks)


def _distance_atol(z, codebook) -> float:
    """float32 cancellation error bound of |z|^2 - 2 z.e + |e|^2, with a safety factor of 8."""
    z_sq = z.double().pow(2).sum(1).max() if z.numel() else 0.0
    return float(8 * torch.finfo(torch.float32).eps * (z_sq + codebook.double().pow(2).sum(1).max()))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference_and_brute_force(case, dtype, device):
    n, k, d, blocks = CASES[case]
    z, codebook = codebook_inputs(n, k, d, dtype, device, seed=n + k)
    idx, dist, gap = brute_force_nearest(z.cpu(), codebook.cpu())
    assert gap.min() > 1e-3  # the data are unambiguous at float32 precision
    out = _triton(z, codebook, **blocks)
    assert out.indices.dtype == torch.int64 and out.distances.dtype == torch.float32
    assert torch.equal(out.indices.cpu(), idx)
    expected = nearest_code_reference(z, codebook)
    assert torch.equal(out.indices, expected.indices)
    atol = _distance_atol(z, codebook)
    torch.testing.assert_close(out.distances, expected.distances, rtol=0, atol=atol)
    torch.testing.assert_close(out.distances.double().cpu(), dist, rtol=0, atol=atol)


def test_duplicate_codes_go_to_lowest_index_across_tiles(device):
    g = torch.Generator().manual_seed(0)
    codebook = torch.randn(70, 8, generator=g)
    dup = codebook[3].clone()
    for i in (20, 37, 69):  # duplicates of code 3 in later tiles of 16 codes
        codebook[i] = dup
    codebook[50] = codebook[45].clone()  # and a duplicate inside one tile
    z = torch.stack([dup, codebook[45], codebook[50] + 1e-3, codebook[69] - 1e-3])
    out = _triton(z.to(device), codebook.to(device), block_m=16, block_k=16, block_d=16)
    assert out.indices.tolist() == [3, 45, 45, 3]
    assert out.distances[:2].tolist() == [0.0, 0.0]
    assert torch.equal(out.indices.cpu(), nearest_code_reference(z, codebook).indices)
    assert torch.equal(out.indices.cpu(), brute_force_nearest(z, codebook)[0])


def test_equidistant_codes_in_different_tiles(device):
    # z = 0 is at squared distance exactly 1 from codes 5, 17 and 40 (in tiles 0, 1 and 2 of 16
    # codes) and at 36 from the 45 other codes, all equal to (3, 3, 3, 3): code 5 must win.
    # z = (3, 3, 3, 3) equals those 45 codes: the lowest of them, 0, must win.
    codebook = torch.full((48, 4), 3.0)
    codebook[5] = torch.tensor([1.0, 0, 0, 0])
    codebook[17] = torch.tensor([0.0, -1, 0, 0])
    codebook[40] = torch.tensor([0.0, 0, 1, 0])
    z = torch.tensor([[0.0, 0, 0, 0], [3.0, 3, 3, 3]])
    out = _triton(z.to(device), codebook.to(device), block_m=16, block_k=16, block_d=16)
    assert out.indices.tolist() == [5, 0]
    assert out.distances.tolist() == [1.0, 0.0]
    assert torch.equal(out.indices.cpu(), nearest_code_reference(z, codebook).indices)


def test_mixed_dtypes_and_public_function(device):
    z, codebook = codebook_inputs(40, 33, 10, torch.float32, device, seed=2)
    out = nearest_code(z.half(), codebook, backend="triton")
    expected = nearest_code_reference(z.half(), codebook)
    assert torch.equal(out.indices, expected.indices)
    torch.testing.assert_close(out.distances, expected.distances, rtol=0, atol=_distance_atol(z, codebook))


def test_does_not_touch_autograd(device):
    z, codebook = codebook_inputs(20, 12, 6, torch.float32, device, seed=5)
    z.requires_grad_()
    codebook.requires_grad_()
    out = nearest_code(z, codebook, backend="triton")
    assert not out.indices.requires_grad and not out.distances.requires_grad
    # The caller's straight-through / commitment losses still differentiate as usual.
    quantized = codebook[out.indices]
    loss = ((quantized - z) ** 2).sum()
    loss.backward()
    torch.testing.assert_close(z.grad, 2 * (z - quantized).detach())
    expected = torch.zeros_like(codebook).index_add_(0, out.indices, 2 * (quantized - z).detach())
    torch.testing.assert_close(codebook.grad, expected)


def test_no_rows(device):
    out = nearest_code(torch.zeros(0, 4, device=device), torch.ones(3, 4, device=device), backend="triton")
    assert out.indices.shape == (0,) and out.distances.shape == (0,)
