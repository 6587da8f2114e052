"""Scans per second of ``visd.zero_shot.diagnose`` over chest-CT files, with and without DataLoader
workers that read and preprocess the next scans while the model runs.

The scans are written once into ``--data`` (default: a temporary folder): gzip NIfTI files, int16
Hounsfield units, 480 x 480 x 480 voxels of 1 x 1 x 1.5 mm (the synthetic chest volume of
``bench_volume.py`` at twice the slice count), with their organ label maps; preprocessing turns each
into a 186 x 480 x 424 model input. On a CPU-only machine the workers compete with the model for the
cores; they are for a GPU, or a CPU with cores to spare. Each ``--workers`` value is one timed run of all scans (the model
and prompt embeddings are loaded before the clock starts), recorded as a row; the time to read and
preprocess one scan in this process is in the note::

    python benchmarks/bench_throughput.py --scans 3 --workers 0 1
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
import time
from pathlib import Path

import torch

from _common import chest_scan_files, full_size_model, peak_gpu_gb, peak_rss_gb, record, set_mode, timed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scans", type=int, default=3)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--mode", default="fused")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--data", type=Path, default=None, help="folder for the scan files (kept; default: temporary)")
    ap.add_argument("--maps", action="store_true", help="also write each scan's anomaly maps (NIfTI and PNG)")
    args = ap.parse_args()
    from visd.data import load_case
    from visd.zero_shot import diagnose

    with tempfile.TemporaryDirectory() as tmp:
        pairs = chest_scan_files(args.data or Path(tmp), args.scans)
        model = full_size_model(args.device)
        set_mode(model, args.mode)
        model.prompt_embeddings(list(model.config.findings))  # cached: the clock measures scans only
        start = time.perf_counter()
        case = load_case(pairs[0][0], pairs[0][1], model.config, mask_format="visd")
        load_s = time.perf_counter() - start
        shape = "x".join(map(str, case.image.shape))
        del case
        for workers in args.workers:
            options = {"num_workers": workers} if workers else {}  # so that older checkouts can be measured
            if args.maps:
                options["anomaly_maps_dir"] = Path(tmp) / "maps"
            report, seconds = timed(functools.partial(
                diagnose, [c for c, _ in pairs], [s for _, s in pairs], model, mask_format="visd", progress=False,
                **options,
            ))
            if report.failed:
                raise SystemExit(f"scans failed: {report.failed}")
            peak = peak_gpu_gb() if args.device == "cuda" else peak_rss_gb()
            note = (f"{args.device}, {args.scans / seconds:.3f} scans/s, reading + preprocessing {load_s:.1f} s "
                    f"per scan in-process (model input {shape}); peak memory of the main process")
            maps = ", anomaly maps" if args.maps else ""
            record(f"diagnose {args.scans} scans 480x480x480 .nii.gz", f"{args.mode}, workers {workers}{maps}", seconds,
                   peak, note, "python benchmarks/bench_throughput.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
