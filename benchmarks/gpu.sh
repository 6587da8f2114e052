#!/usr/bin/env bash
# One prepared GPU check (run from the repository root on a CUDA machine with visd installed):
# per-window and per-volume latency in each mode, scans per second through diagnose() with 0, 2 and 4
# DataLoader workers, and the Triton kernels against their references. Each line appends a row to
# benchmarks/README.md.
set -euo pipefail
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))"
for mode in official fast fast-nobatch fast-bf16 fast-cl; do
  python benchmarks/bench_window.py --mode "$mode" --repeat 3
done
for mode in official fast fast-nobatch fast-bf16; do
  python benchmarks/bench_volume.py --mode "$mode" --compare
done
python benchmarks/bench_throughput.py --scans 8 --workers 0 2 4
python benchmarks/bench_kernels.py
python -m pytest tests/kernels -q
