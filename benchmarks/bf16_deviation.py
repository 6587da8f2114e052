"""How far the fused numerics' probabilities are from the exact ones, per finding, in float32 and bf16.

The exact probabilities are the fused numerics run in float64 (exact algebra: within about 1e-12 of
the true value). Cases: the real CT of the tests (``tests/data/expected.npz``: the official
preprocessing of an abdomen CT with its TotalSegmentator labels, lung and aorta present) and the
synthetic chest volume cropped to 144 x 288 x 288 (4 organs). The weights are the seeded random
full-size model of ``_common.full_size_model`` (no pretrained weights are available): the figures
say how much rounding each numerics adds, not how a trained model's findings move. Prints only::

    python benchmarks/bf16_deviation.py --case real-ct
    python benchmarks/bf16_deviation.py --case chest-crop
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch

from visd.inference import zero_shot_classify

from _common import chest_volume, full_size_model, set_mode

DATA = Path(__file__).resolve().parents[1] / "tests" / "data"


def real_ct() -> tuple[torch.Tensor, torch.Tensor]:
    """The official preprocessing of the test CT: image ``(D, H, W)`` in [0, 1] and its 4-label mask."""
    case = np.load(DATA / "expected.npz")
    mask = torch.from_numpy(case["mask"])
    image = torch.zeros(mask.shape)
    inner = tuple(slice(before, n - after) for (before, after), n in zip(case["pad"], mask.shape))
    image[inner] = torch.from_numpy(case["image_inner"])
    return image, mask


def run(model, image, mask, mode: str, float64: bool = False):
    """(probabilities, codes per organ, seconds)."""
    options = set_mode(model, mode)
    if float64:
        model.double()
    t = time.perf_counter()
    try:
        result = zero_shot_classify(model, image, mask, **options)
    finally:
        model.float()
    codes = {name: d.codes for name, d in result.embeddings.details.items()}
    return [s.probability for s in result.scores], codes, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--case", choices=["real-ct", "chest-crop"], default="real-ct")
    args = ap.parse_args()
    model = full_size_model("cpu")
    image, mask = real_ct() if args.case == "real-ct" else chest_volume((144, 288, 288), seed=1)
    exact, exact_codes, seconds = run(model, image, mask, "fused", float64=True)
    print(f"### {args.case}\n\nreference: the fused numerics in float64, {seconds:.1f} s")
    modes = ["official", "fused", "fused-bf16"]
    got = {}
    for mode in modes:
        probs, codes, seconds = run(model, image, mask, mode)
        got[mode] = probs
        flips = ", ".join(f"{o} {int((codes[o] != c).sum())}/{c.numel()}" for o, c in exact_codes.items())
        print(f"{mode}: {seconds:.1f} s; level-4 tokens whose code differs from float64: {flips}")
    print("\n| organ | finding | p_exact | " + " | ".join(f"\\|p - p_exact\\| {m}" for m in modes)
          + " |\n|---|---|---|" + "---|" * len(modes))
    devs: dict[str, list[float]] = {m: [] for m in modes}
    for i, spec in enumerate(model.config.findings):
        if math.isnan(exact[i]):
            continue
        cells = []
        for m in modes:
            devs[m].append(abs(got[m][i] - exact[i]))
            cells.append(f"{devs[m][-1]:.2e}")
        print(f"| {spec.organ} | {spec.name} | {exact[i]:.6f} | " + " | ".join(cells) + " |")
    print("| **max** | | | " + " | ".join(f"**{max(devs[m]):.2e}**" for m in modes) + " |")
    print("| **mean** | | | " + " | ".join(f"**{sum(devs[m]) / len(devs[m]):.2e}**" for m in modes) + " |")


if __name__ == "__main__":
    main()
