"""One optimizer step of each training stage with the full-size model on a 2-scan batch of
112 x 256 x 352 crops (the fVLM ROI), CPU float32 unless a GPU is present.

``--stage alignment`` (anatomy-level image-report alignment), ``disease`` (disease-level vision
contrastive learning with a momentum encoder, two views), ``normality`` (the VQ-VAE on normal organs,
vision encoder frozen). ``--numerics official`` runs the authors' operation order (the training forward
before the fused algebra), ``fused`` (default) the fused algebra; ``--precision bf16`` runs the step
under CPU/GPU bf16 autocast, as ``precision: bf16`` in a training config does. Run the pairs back to
back, one per process::

    python benchmarks/bench_train_step.py --stage alignment --numerics official
    python benchmarks/bench_train_step.py --stage alignment --numerics fused
"""

from __future__ import annotations

import argparse
import sys

import torch

from _common import full_size_model, peak_gpu_gb, peak_rss_gb, record, timed, window_inputs
from visd.training.config import StageConfig
from visd.training.data import Batch
from visd.training.engine import make_optimizer
from visd.training.stages import StageObjective, configure_trainable, make_momentum, momentum_keys, set_train_modes, update_momentum


def make_batch(model, views: int, device: str) -> Batch:
    crops = [window_inputs(seed) for seed in (0, 1)]
    image = torch.stack([c[0] for c in crops])[:, None]
    mask = torch.stack([c[1] for c in crops])[:, None]
    abnormal = torch.tensor([[True, False, True, False], [False, True, False, True]])
    texts = [[f"{o} shows no significant abnormalities." if not a else f"{o} abnormal finding." for o, a in zip(model.organs, row)]
             for row in abnormal.tolist()]
    ids, am = model.tokenize([t for row in texts for t in row])
    second = dict(image2=image.flip(-1), mask2=mask.flip(-1)) if views == 2 else {}
    return Batch(indices=torch.arange(2), image=image, mask=mask, abnormal=abnormal, texts=texts,
                 input_ids=ids, attention_mask=am, **second).to(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--stage", default="alignment", choices=["alignment", "disease", "normality"])
    ap.add_argument("--numerics", default="fused", choices=["official", "fused"])
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--no-channels-last", action="store_true", help="fused numerics with the backbone in the contiguous layout (see visd.models.fused.channels_last_features)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    model = full_size_model(args.device)
    if args.numerics == "fused":
        model.set_numerics("fused", channels_last=not args.no_channels_last)
    else:
        model.set_numerics("official")
    amp = torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    stage = StageConfig(objectives=(args.stage,), lr=1e-4)
    params = configure_trainable(model, stage)
    momentum = make_momentum(model) if args.stage == "disease" else None
    objective = StageObjective(model, stage)
    optimizer = make_optimizer(model, params, stage)  # as visd train builds it
    batch = make_batch(model, stage.views, args.device)

    def step():
        set_train_modes(model, stage)
        with amp:
            keys = momentum_keys(model, momentum, batch) if momentum is not None else (None, None)
            out = objective(batch, *keys)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        if momentum is not None:
            update_momentum(model, momentum, stage.momentum)
        return float(out.loss.detach())

    loss, seconds = timed(step)
    peak = peak_gpu_gb() if args.device == "cuda" else peak_rss_gb()
    record(f"train step, {args.stage}, 2 x 112x256x352", f"{model.numerics.describe()} {args.precision}", seconds, peak, f"{args.device}, loss {loss:.3f}",
           "python benchmarks/bench_train_step.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
