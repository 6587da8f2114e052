"""Where the per-volume time goes: the fused numerics on the synthetic 240 x 480 x 480 chest volume under
``torch.profiler``, as a table of operators by self CPU time. Prints only (no row in README.md); the
profiler adds some overhead, so take the shares, not the total, from it::

    python benchmarks/profile_volume.py --mode fused --rows 20
"""

from __future__ import annotations

import argparse

from torch.profiler import ProfilerActivity, profile

from visd.inference import zero_shot_classify

from _common import chest_volume, full_size_model, set_mode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--mode", default="fused")
    ap.add_argument("--rows", type=int, default=20, help="operators to list")
    args = ap.parse_args()
    model = full_size_model("cpu")
    options = set_mode(model, args.mode)
    image, mask = chest_volume()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        zero_shot_classify(model, image, mask, **options)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=40))


if __name__ == "__main__":
    main()
