"""visd.kernels against their pure-torch references: segment pooling (a lung-sized segment and the
16 CT-RATE organ windows' worth of segments) and the nearest-codebook search (400 x 768 codebook).
On CPU only the reference runs (Triton needs CUDA outside its interpreter)."""

from __future__ import annotations

import sys

import torch

from _common import peak_gpu_gb, peak_rss_gb, record, timed
from visd.kernels import nearest_code, segment_softmax_pool


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    backends = ["reference", "triton"] if device == "cuda" else ["reference"]
    g = torch.Generator(device=device).manual_seed(0)
    n, f, h = 200_000, 256, 4
    x_a = torch.randn(n, f, device=device, generator=g)
    x_b = torch.randn(n, f, device=device, generator=g)
    offsets = torch.tensor([0, 150_000, 170_000, 190_000, n], device=device)
    u_a = torch.randn(4, h, f, device=device, generator=g) / 16
    u_b = torch.randn(4, h, f, device=device, generator=g) / 16
    z = torch.randn(50_000, 768, device=device, generator=g)
    codebook = torch.randn(400, 768, device=device, generator=g)
    results = {}
    for backend in backends:
        out, s = timed(lambda: segment_softmax_pool(x_a, x_b, offsets, u_a, u_b, 0.125, backend=backend), repeat=5)
        results[("pool", backend)] = out.pooled_a
        record("segment_softmax_pool 200k x (256+256), 4 segments", backend, s,
               peak_gpu_gb() if device == "cuda" else peak_rss_gb(), device, "python benchmarks/bench_kernels.py")
        codes, s = timed(lambda: nearest_code(z, codebook, backend=backend), repeat=5)
        results[("code", backend)] = codes.indices
        record("nearest_code 50k x 768, K=400", backend, s,
               peak_gpu_gb() if device == "cuda" else peak_rss_gb(), device, "python benchmarks/bench_kernels.py")
    if len(backends) == 2:
        dev = float((results[("pool", "triton")] - results[("pool", "reference")]).abs().max())
        same = bool(torch.equal(results[("code", "triton")], results[("code", "reference")]))
        print(f"triton vs reference: pool max abs diff {dev:.1e}, codes identical {same}", file=sys.stderr)


if __name__ == "__main__":
    main()
