"""Command-line glue for ``visd segment``: TotalSegmentator's organ label map of one CT.

The main ``visd`` parser calls :func:`add_segment_parser` with its ``add_subparsers()`` object. The
label map is what ``visd diagnose --mask`` reads; ``visd diagnose --segment`` runs the same step for
every scan without a mask.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from visd.errors import InputError

__all__ = ["add_segment_parser", "run_segment"]

_SUFFIXES = (".nii.gz", ".nii")


def add_segment_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``segment`` on an ``argparse`` subparsers object."""
    p = subparsers.add_parser(
        "segment",
        help="organ label map of a CT with TotalSegmentator (the mask that visd diagnose --mask reads)",
        description="Run TotalSegmentator (task 'total') on a CT and write its multilabel map, with the label "
        'table in the header. Needs TotalSegmentator: pip install "visd[segment]"; it downloads its weights '
        "on first use. TotalSegmentator sends anonymous usage statistics to its authors unless turned off; "
        "visd turns them off (send_usage_stats=false in TotalSegmentator's config) unless --allow-statistics.",
        epilog="example:\n  visd segment scan.nii.gz --out scan_totalseg.nii.gz\n"
        "  visd diagnose scan.nii.gz --mask scan_totalseg.nii.gz --out results.csv",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("ct", metavar="CT", help="CT: NIfTI file or DICOM series folder")
    p.add_argument("--out", required=True, metavar="MASK", help="output label map (.nii.gz)")
    p.add_argument("--fast", action="store_true", help="TotalSegmentator's 3 mm --fast model (quicker, coarser)")
    p.add_argument("--device", default=None, metavar="DEVICE",
                   help="where TotalSegmentator runs: cpu, cuda, cuda:N or mps (default: the GPU when there is one)")
    p.add_argument("--allow-statistics", action="store_true",
                   help="leave TotalSegmentator's usage statistics setting as it is")
    p.set_defaults(func=run_segment)
    return p


def run_segment(args: argparse.Namespace) -> int:
    """Run ``visd segment``: the label map is moved into place only once TotalSegmentator has finished."""
    out = Path(args.out)
    if not out.name.lower().endswith(_SUFFIXES):
        raise InputError(f"--out must be a NIfTI file name, got {str(out)!r}. Expected e.g. scan_totalseg.nii.gz.")
    if not Path(args.ct).exists():
        raise InputError(f"CT not found: {args.ct}. Expected a NIfTI file or a DICOM series folder to segment.")
    from visd.data.segment import segment

    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as work:
        written = segment(args.ct, Path(work), fast=args.fast, statistics=args.allow_statistics, device=args.device)
        os.replace(written, out)
    print(f"wrote {out} (TotalSegmentator 'total' label map; pass it to visd diagnose with --mask)")
    return 0
