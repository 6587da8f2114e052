"""One 112 x 256 x 352 window through the full-size model (reference: official code 6.1 s, 2-core CPU)."""

from __future__ import annotations

import argparse
import sys

import torch

from _common import full_size_model, peak_gpu_gb, peak_rss_gb, record, set_mode, timed, window_inputs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--mode", default="fused")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    model = full_size_model(args.device)
    set_mode(model, args.mode)
    image, mask = window_inputs()
    image, mask = image.to(args.device), mask.to(args.device)
    out, seconds = timed(lambda: model.encode_window(image, mask), repeat=args.repeat)
    assert out.scored, out.status
    peak = peak_gpu_gb() if args.device == "cuda" else peak_rss_gb()
    record("window 112x256x352", args.mode, seconds, peak, f"best of {args.repeat}, {args.device}",
           "python benchmarks/bench_window.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
