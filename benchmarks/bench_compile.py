"""torch.compile of the backbone (the only heavy part) on one 112 x 256 x 352 window, against eager.

Records the eager time, the first compiled call (compilation included) and the best later call, and
the largest deviation of the level features from eager.
"""

from __future__ import annotations

import sys

import torch

from _common import full_size_model, peak_rss_gb, record, timed, window_inputs
from visd.models.fused import FoldedBackbone


def main() -> None:
    model = full_size_model()
    image, _ = window_inputs()
    x = image[None, None]
    folded = FoldedBackbone(model.vision.backbone)
    eager, t_eager = timed(lambda: folded(x), repeat=2)
    compiled_fn = torch.compile(lambda t: folded(t), dynamic=False)
    _, t_first = timed(lambda: compiled_fn(x))
    out, t_best = timed(lambda: compiled_fn(x), repeat=2)
    dev = max(float((a - b).abs().max()) for a, b in zip(out, eager))
    cmd = "python benchmarks/bench_compile.py " + " ".join(sys.argv[1:])
    record("backbone, window 112x256x352", "fused (eager)", t_eager, peak_rss_gb(), "best of 2", cmd)
    record("backbone, window 112x256x352", "fused + torch.compile", t_best, peak_rss_gb(),
           f"best of 2 after a first call of {t_first:.1f} s; max |feature - eager| = {dev:.1e}", cmd)


if __name__ == "__main__":
    main()
