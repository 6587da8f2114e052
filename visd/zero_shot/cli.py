"""Command-line glue for ``visd diagnose``.

The main ``visd`` parser calls :func:`add_diagnose_parser` with its ``add_subparsers()`` object. Bad
arguments and a model that cannot be loaded raise :class:`visd.errors.VisdError`, which the main CLI
prints as one line with exit code 2; a bad *case* is skipped (one line on stderr, its reason in the
table) and makes the exit code 1. Importing this module is cheap.
"""

from __future__ import annotations

import argparse
import csv
import difflib
import os
from pathlib import Path

from visd.errors import InputError, did_you_mean

# visd.models.numerics.NUMERICS_CHOICES, without importing torch to build the parser
NUMERICS_CHOICES = ("fused", "fused-bf16", "official", "auto")

__all__ = ["add_diagnose_parser", "read_manifest", "run_diagnose"]

_MANIFEST_COLUMNS = ("image", "mask", "scan")


def add_diagnose_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``diagnose`` on an ``argparse`` subparsers object."""
    p = subparsers.add_parser(
        "diagnose",
        help="zero-shot findings, anomaly maps and embeddings for your own CT scans",
        description="Score every finding of the model's catalogue (or --findings) on each CT, per organ. "
        "INPUT is a .nii/.nii.gz file or a DICOM series folder; each needs an organ mask (TotalSegmentator "
        "output or a label map in the model's organ ids). A case that cannot be read is skipped with its "
        "reason in the table; the exit code is then 1.",
        epilog="examples:\n  visd diagnose scan.nii.gz --segment --out results.csv\n"
        "  visd diagnose ct.nii.gz --mask ct_totalseg.nii.gz --model ./my-visd-model --out results.csv\n"
        "  visd diagnose --manifest cases.csv --out results.csv --anomaly-maps maps/",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="CT: NIfTI file or DICOM series folder")
    p.add_argument("--model", default=None,
                   help="a named model (visd.list_pretrained()), a model folder (save_pretrained) or a Hugging Face "
                   "Hub repo id (default: visd-boost-ctrate, the official chest CT model, downloaded and converted "
                   "on first use)")
    p.add_argument("--mask", action="append", default=None, metavar="MASK",
                   help="organ mask of an INPUT; repeat once per INPUT, in the same order")
    p.add_argument("--mask-format", choices=("auto", "visd", "totalsegmentator"), default="auto",
                   help="how to read the masks (default: auto)")
    p.add_argument("--manifest", default=None, metavar="CSV",
                   help="table of cases with columns image,mask (and optionally scan); relative paths are "
                   "resolved against the manifest's folder. Replaces INPUT and --mask")
    p.add_argument("--out", required=True, metavar="CSV",
                   help="results table: scan, organ, finding, probability, status (also printed after the run)")
    p.add_argument("--json", default=None, metavar="JSON", help="also write the results as JSON")
    p.add_argument("--embeddings", default=None, metavar="SAFETENSORS", help="write per-organ embeddings")
    p.add_argument("--anomaly-maps", default=None, metavar="DIR",
                   help="write <scan>_anomaly.nii.gz (on the input grid) and <scan>_anomaly.png per scan")
    p.add_argument("--dicom-out", default=None, metavar="DIR",
                   help="for DICOM series inputs, write DIR/<scan>/findings_sr.dcm (and anomaly_pm.dcm with "
                   "--anomaly-maps); pip install \"visd[dicom]\"")
    p.add_argument("--findings", default=None, metavar="YAML", help="your own findings (YAML or JSON list)")
    p.add_argument("--segment", action="store_true",
                   help="compute missing masks with TotalSegmentator (pip install \"visd[segment]\"). "
                   "TotalSegmentator sends anonymous usage statistics to its authors unless turned off; "
                   "visd turns them off (send_usage_stats=false in TotalSegmentator's config)")
    p.add_argument("--segment-dir", default=None, metavar="DIR",
                   help="where --segment writes masks (default: 'segmentations' next to --out)")
    p.add_argument("--workers", type=int, default=0, metavar="N",
                   help="read and preprocess scans in N worker processes, ahead of the model (default 0: in "
                   "the main process); for a GPU, or a CPU with cores the model leaves free")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run: take the scans it finished from OUT.journal and diagnose "
                   "the rest (same model, findings and outputs). A run writes OUT.journal from its first "
                   "diagnosed scan until its outputs are written, and a run without --resume refuses to start "
                   "over one that holds scans")
    p.add_argument("--numerics", choices=NUMERICS_CHOICES, default="fused",  # the models' own list, tested equal
                   help="the image path's numerics: fused (default; exact algebra, float rounding only), "
                   "fused-bf16 (bf16 backbone: faster on AMX / AVX512-BF16 CPUs and GPUs, ~1e-4 to 1e-2 on "
                   "probabilities), official (the authors' operation order), auto (fused-bf16 where the "
                   "device computes bf16 natively, else fused); the JSON and the summary record it")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_diagnose)
    return p


def read_manifest(path: str | os.PathLike) -> tuple[list[str], list[str | None], list[str] | None]:
    """Images, masks (None where the cell is empty) and scan ids (None without a ``scan`` column).

    Relative paths are resolved against the manifest's folder.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"manifest not found: {path}. Expected a CSV file with columns image,mask.")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            columns = [c.strip() for c in reader.fieldnames or []]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise InputError(f"cannot read manifest {path}: {e}. Expected a UTF-8 CSV file with columns image,mask.") from e
    if "image" not in columns:
        close = difflib.get_close_matches("image", columns, n=1, cutoff=0.6)
        hint = f" Is {close[0]!r} the image column? Rename it to 'image'." if close else ""
        raise InputError(
            f"manifest {path} has no 'image' column: columns {columns}. Expected columns image,mask "
            f"(and optionally scan).{hint}"
        )
    unknown = [c for c in columns if c not in _MANIFEST_COLUMNS]
    if unknown:
        raise InputError(
            f"manifest {path} has unknown column {unknown[0]!r}. Expected image, mask and optionally scan."
            + did_you_mean(unknown[0], _MANIFEST_COLUMNS)
        )
    if not rows:
        raise InputError(f"manifest {path} lists no cases. Expected one row per scan.")
    base = path.absolute().parent

    def resolve(value: str | None) -> str | None:
        value = (value or "").strip()
        if not value:
            return None
        p = Path(os.path.expanduser(value))
        return str(p if p.is_absolute() else base / p)

    images, masks, scans = [], [], []
    for i, row in enumerate(rows):
        row = {(k or "").strip(): v for k, v in row.items()}
        image = resolve(row.get("image"))
        if image is None:
            raise InputError(f"manifest {path}, row {i + 2}: the image cell is empty. Expected a file or folder path.")
        images.append(image)
        masks.append(resolve(row.get("mask")))
        scans.append((row.get("scan") or "").strip())
    has_ids = "scan" in columns
    if has_ids and not all(scans):
        raise InputError(f"manifest {path}: the scan column has empty cells. Fill them or drop the column.")
    return images, masks, scans if has_ids else None


def run_diagnose(args: argparse.Namespace) -> int:
    """Run ``visd diagnose``; print the findings table and a summary; return 0, or 1 when a case failed.

    Without ``--model`` the official named model (:data:`visd.pretrained.DEFAULT_MODEL`) is used.
    """
    if args.manifest is not None:
        if args.inputs or args.mask:
            raise InputError("pass either --manifest or INPUT/--mask arguments, not both.")
        inputs, masks, scan_ids = read_manifest(args.manifest)
    else:
        if not args.inputs:
            raise InputError("no scans given. Pass INPUT files/DICOM folders with --mask, or --manifest cases.csv.")
        inputs, scan_ids = list(args.inputs), None
        if args.mask:
            if len(args.mask) != len(inputs):
                raise InputError(
                    f"got {len(inputs)} INPUT(s) but {len(args.mask)} --mask. Expected one --mask per INPUT, "
                    "in the same order (or --segment to compute masks)."
                )
            masks = list(args.mask)
        else:
            masks = [None] * len(inputs)
    if args.workers < 0:
        raise InputError(f"--workers must be 0 or more, got {args.workers}. Use 0 to read scans in the main process.")
    if any(m is None for m in masks) and not args.segment:
        raise InputError(
            "no organ mask for some scans. Pass one --mask per INPUT (TotalSegmentator output or organ ids), "
            "a mask column in the manifest, or --segment to compute them with TotalSegmentator."
        )
    segment_dir = None
    if args.segment:
        segment_dir = args.segment_dir or str(Path(args.out).resolve().parent / "segmentations")
    from . import shard

    if shard.wanted(args.out):  # under torchrun, or the journals of a sharded run are there
        return shard.run_sharded(args, inputs, masks, scan_ids, segment_dir)

    from .journal import holds_scans

    journal = Path(str(args.out) + ".journal")
    if args.resume and not journal.is_file():
        raise InputError(f"--resume: no journal of an interrupted run at {journal}. Run without --resume.")
    if not args.resume and holds_scans(journal):
        raise InputError(
            f"{journal} holds the scans of an interrupted run. Pass --resume to continue it, or delete the file "
            "to start over."
        )

    from tqdm.contrib.logging import logging_redirect_tqdm

    from visd.models.model import ViSDModel
    from visd.models.numerics import numerics_for
    from visd.pretrained import DEFAULT_MODEL

    from .findings import load_findings
    from .pipeline import diagnose

    model = ViSDModel.from_pretrained(args.model if args.model is not None else DEFAULT_MODEL)
    numerics, numerics_note = numerics_for(args.numerics, model.device)
    model.set_numerics(numerics)
    findings = load_findings(args.findings, model.organs) if args.findings else None
    with logging_redirect_tqdm():
        report = diagnose(
            inputs, masks, model, findings=findings, mask_format=args.mask_format,
            anomaly_maps_dir=args.anomaly_maps, embeddings_path=args.embeddings,
            progress=not args.no_progress, scan_ids=scan_ids, segment_dir=segment_dir, num_workers=args.workers,
            journal=journal, resume=args.resume, dicom_out=args.dicom_out,
        )
    written = [str(report.to_csv(args.out))]
    if args.json:
        written.append(str(report.to_json(args.json)))
    journal.unlink(missing_ok=True)  # every output is written (a run that diagnosed no scan wrote none)
    if report.embeddings_path is not None:
        written.append(str(report.embeddings_path))
    if args.anomaly_maps:
        written.append(f"anomaly maps of {len(report.anomaly_maps)} scan(s) in {args.anomaly_maps}")
    print(report.format_table())
    print()
    n, bad = len(report.scans), len(report.failed)
    resumed = f" ({len(report.resumed)} taken from the journal)" if report.resumed else ""
    print(f"diagnosed {n} scan(s): {n - bad} ok{resumed}, {bad} failed; numerics {report.numerics} "
          f"({numerics_note}); wrote {', '.join(written)}")
    return 1 if bad else 0
