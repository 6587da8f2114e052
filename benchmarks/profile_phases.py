"""Wall-clock seconds and minor page faults per phase of the per-volume run (synthetic chest volume).

Times the steps of :func:`visd.inference.zero_shot_classify` by wrapping them in place: organ windows,
backbone levels (stem and each stage timed separately for the fused numerics' folded backbone), organ
token gathering, the normality model, the pooling and the text tower; the rest is "other". Prints
only (no row in README.md)::

    python benchmarks/profile_phases.py --mode fused
    python benchmarks/profile_phases.py --mode fused-bf16
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import time
from collections import defaultdict

import torch

import visd.inference.volume as volume
from visd.inference import clear_prompt_cache, zero_shot_classify
from visd.models import fused

from _common import chest_volume, full_size_model, set_mode


class Phases:
    """Wall seconds and minor page faults per phase name; nested phases count in their own row only."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.faults: dict[str, int] = defaultdict(int)
        self.stack: list[str] = []

    @contextlib.contextmanager
    def __call__(self, name: str):
        f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
        self.stack.append(name)
        try:
            yield
        finally:
            self.stack.pop()
            dt, df = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
            self.seconds[name] += dt
            self.faults[name] += df
            if self.stack:  # time of a nested phase is not its parent's own
                self.seconds[self.stack[-1]] -= dt
                self.faults[self.stack[-1]] -= df

    def wrap(self, owner, attr: str, name: str) -> None:
        fn = getattr(owner, attr)

        def timed(*args, **kwargs):
            with self(name):
                return fn(*args, **kwargs)

        setattr(owner, attr, timed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--mode", default="fused")
    args = ap.parse_args()
    model = full_size_model("cpu")
    options = set_mode(model, args.mode)
    image, mask = chest_volume()
    clear_prompt_cache()
    t = time.perf_counter()
    plain = [s.probability for s in zero_shot_classify(model, image, mask, **options).scores]
    end_to_end = time.perf_counter() - t

    phases = Phases()
    path = model.image_path
    phases.wrap(volume, "organ_window", "organ windows (crop, pad)")
    phases.wrap(path, "levels", "backbone levels (other)")
    phases.wrap(fused, "_stem", "backbone: stem")
    phases.wrap(fused, "_block", "backbone: residual blocks")
    phases.wrap(path, "organ_tokens", "organ tokens (gather, project)")
    phases.wrap(model.normality, "forward", "normality model")
    phases.wrap(path, "attend", "pooling (attend)")
    phases.wrap(model, "encode_text", "text tower")
    clear_prompt_cache()
    with phases("other"):
        probs = [s.probability for s in zero_shot_classify(model, image, mask, **options).scores]
    same = max(abs(a - b) for a, b in zip(probs, plain) if a == a and b == b)
    total = sum(phases.seconds.values())
    print(f"mode {args.mode} ({model.numerics.describe()}), threads {torch.get_num_threads()}: end to end "
          f"{end_to_end:.2f} s, phased {total:.2f} s, max |p_phased - p| = {same:.1e}\n")
    print("| phase | seconds | share | minor page faults |\n|---|---|---|---|")
    for name in sorted(phases.seconds, key=phases.seconds.get, reverse=True):
        s = phases.seconds[name]
        print(f"| {name} | {s:.2f} | {s / total:.0%} | {phases.faults[name] / 1e3:.0f}k |")


if __name__ == "__main__":
    main()
