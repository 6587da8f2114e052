"""The 16 CT-RATE prompt pairs through the full-size text tower (reference: official 13.7 s, 2-core CPU).

Modes: ``official`` (one batch per finding, padded to 384 tokens), ``fast`` (all prompts in one
batch, padded to the longest), ``cached`` (the model's prompt cache, after a first call).
"""

from __future__ import annotations

import argparse
import sys

import torch

from visd.inference import clear_prompt_cache

from _common import full_size_model, peak_rss_gb, record, timed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--mode", default="fast", choices=["official", "fused", "cached"])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    model = full_size_model()
    findings = model.config.findings
    with torch.no_grad():
        if args.mode == "official":
            fn = lambda: torch.stack([model.encode_text([f.negative[0], f.positive[0]], padding="max_length") for f in findings])  # noqa: E731
        elif args.mode == "fused":
            def fn():
                clear_prompt_cache()
                return model.prompt_embeddings(findings)
        else:
            model.prompt_embeddings(findings)
            fn = lambda: model.prompt_embeddings(findings)  # noqa: E731
        out, seconds = timed(fn, repeat=args.repeat)
        ref = torch.stack([model.encode_text([f.negative[0], f.positive[0]], padding="max_length") for f in findings])
    dev = float((out - ref).abs().max())
    record("16 prompt pairs, full text tower", args.mode, seconds, peak_rss_gb(),
           f"best of {args.repeat}, max |e - e_official| = {dev:.1e}", "python benchmarks/bench_text.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
