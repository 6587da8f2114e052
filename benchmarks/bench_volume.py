"""The per-volume zero-shot procedure on a 240 x 480 x 480 chest volume with 4 organs
(reference: official code 60.5 s and 7.5 GB peak on a 2-core CPU; its lung window is 176 x 448 x 384).

``--mode official`` runs the official operation order and encodes the 16 prompt pairs one finding at a
time padded to 384 tokens, as the official evaluation does for every volume; the fused modes encode the
prompts in one batch without padding. The time includes the text (first call, nothing cached), and
``--compare`` also checks the probabilities against the official-numerics path, and ``--float64`` against
the fused numerics run in float64 (exact algebra, so within about 1e-12 of the true value): how far each
float32 path is from the exact probabilities.
"""

from __future__ import annotations

import argparse
import math
import sys

import torch

from visd.inference import clear_prompt_cache, encode_volume, zero_shot_classify

from _common import chest_volume, full_size_model, peak_gpu_gb, peak_rss_gb, record, set_mode, system_usage, timed


def official_text(model):
    return torch.stack(
        [model.encode_text([f.negative[0], f.positive[0]], padding="max_length") for f in model.config.findings]
    )


def _max_dev(a, b) -> float:
    return max(abs(x - y) for x, y in zip(a, b) if not (math.isnan(x) or math.isnan(y)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--mode", default="fused")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--compare", action="store_true", help="also run the official path and report the max deviation")
    ap.add_argument("--float64", action="store_true", help="also report the deviation from a float64 run of the fused numerics")
    args = ap.parse_args()
    model = full_size_model(args.device)
    options = set_mode(model, args.mode)
    image, mask = chest_volume()
    image, mask = image.to(args.device), mask.to(args.device)
    if args.mode == "official":
        def run():
            with torch.no_grad():
                text = official_text(model)
                emb = encode_volume(model, image, mask, **options)
                return [float(torch.softmax(emb[f.organ] @ t.t() / model.temperature, -1)[1]) for f, t in zip(model.config.findings, text)]
    else:
        def run():
            clear_prompt_cache()
            return [s.probability for s in zero_shot_classify(model, image, mask, **options).scores]
    faults, system = system_usage()
    probs, seconds = timed(run)
    faults, system = (b - a for a, b in zip((faults, system), system_usage()))
    peak = peak_gpu_gb() if args.device == "cuda" else peak_rss_gb()
    note = f"{args.device}, {faults / 1e6:.2f}M page faults, {system:.1f} s system CPU"
    official = probs if args.mode == "official" else None
    if args.compare and args.mode != "official":
        official = [s.probability for s in zero_shot_classify(model, image, mask, **set_mode(model, "official")).scores]
        note += f", max |p - p_official| = {_max_dev(probs, official):.1e}"
    if args.float64:
        options = set_mode(model, "fused")
        model.double()
        exact = [s.probability for s in zero_shot_classify(model, image, mask, **options).scores]
        note += f", max |p - p_float64| = {_max_dev(probs, exact):.1e}"
        if official is not None and args.mode != "official":
            note += f", official path vs float64 {_max_dev(official, exact):.1e}"
    record("volume 240x480x480, 4 organs", args.mode, seconds, peak, note,
           "python benchmarks/bench_volume.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
