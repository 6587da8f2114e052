"""Command-line glue for ``visd index`` and ``visd search``; importing this module is cheap."""

from __future__ import annotations

import argparse
from pathlib import Path

from visd.errors import InputError

__all__ = ["add_index_parser", "add_search_parser"]


def add_index_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "index",
        help="build or extend a searchable index of per-organ scan embeddings",
        description="Embed every organ of each scan (or take an embedding file from visd diagnose --embeddings) "
        "and add the scans to the index folder OUT (created, or appended to). A scan that cannot be read is "
        "skipped with its reason; the exit code is then 1.",
        epilog="examples:\n  visd index --manifest cases.csv --out archive/\n"
        "  visd index --embeddings emb.safetensors --model ./visd-model --out archive/ --approximate",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="CT: NIfTI file or DICOM series folder")
    p.add_argument("--mask", action="append", default=None, metavar="MASK", help="organ mask of an INPUT; repeat")
    p.add_argument("--manifest", default=None, metavar="CSV", help="table of cases with columns image,mask[,scan]")
    p.add_argument("--embeddings", default=None, metavar="SAFETENSORS", help="an embedding file to index")
    p.add_argument("--model", default=None,
                   help="a named model, model folder or Hub repo id, recorded in the index (default when embedding "
                   "scans: visd-boost-ctrate, as for visd diagnose)")
    p.add_argument("--mask-format", choices=("auto", "visd", "totalsegmentator"), default="auto")
    p.add_argument("--out", required=True, metavar="DIR", help="index folder")
    p.add_argument("--approximate", action="store_true",
                   help="also keep an approximate (FAISS HNSW) index for large archives: pip install \"visd[ann]\"")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_index)
    return p


def run_index(args: argparse.Namespace) -> int:
    from .search import index_embeddings, index_scans
    from .store import ScanIndex

    failed: list = []
    if args.embeddings is not None:
        if args.inputs or args.manifest:
            raise InputError("pass either --embeddings or scans (INPUT/--manifest), not both.")
        index = index_embeddings(args.embeddings, args.out, model=args.model, approximate=args.approximate)
    elif args.inputs or args.manifest:
        from visd.zero_shot.cli import read_manifest

        if args.manifest is not None:
            if args.inputs or args.mask:
                raise InputError("pass either --manifest or INPUT/--mask arguments, not both.")
            inputs, masks, scan_ids = read_manifest(args.manifest)
        else:
            inputs, masks, scan_ids = list(args.inputs), list(args.mask or []), None
            if len(masks) != len(inputs):
                raise InputError(f"got {len(inputs)} INPUT(s) but {len(masks)} --mask. Expected one --mask per INPUT.")
        from visd.pretrained import DEFAULT_MODEL

        index, failed = index_scans(
            inputs, masks, args.model if args.model is not None else DEFAULT_MODEL, args.out, scan_ids=scan_ids, mask_format=args.mask_format,
            approximate=args.approximate, progress=not args.no_progress,
        )
    elif args.approximate:
        index = ScanIndex.open(args.out)
        index.set_approximate(True)
    else:
        raise InputError("nothing to index. Pass INPUT files with --mask, --manifest CSV or --embeddings FILE.")
    for scan, reason in failed:
        print(f"skipped {scan}: {reason}")
    scans = index.rows()["scan"].nunique()
    print(f"index {Path(args.out)}: {len(index)} rows of {scans} scans"
          f"{' (approximate index kept)' if index.approximate else ''}; {len(failed)} scan(s) skipped")
    return 1 if failed else 0


def add_search_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "search",
        help="find the scans of an index most similar to a text, a finding or a scan",
        description="Rank the scans of an index by one organ's embedding: cosine similarity to a free text "
        "(--text) or a query scan (--scan/--mask), or the zero-shot probability of a catalogue finding "
        "(--finding). Exact by default; --approximate asks the FAISS HNSW index.",
        epilog="examples:\n  visd search --index archive/ --text \"pleural effusion\" --organ lung --top 20\n"
        "  visd search --index archive/ --scan ct.nii.gz --mask ct_seg.nii.gz --organ heart",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--index", required=True, metavar="DIR", help="index folder (visd index --out)")
    query = p.add_mutually_exclusive_group(required=True)
    query.add_argument("--text", help="free-text query")
    query.add_argument("--finding", help="a finding of the model's catalogue (its organ is implied)")
    query.add_argument("--scan", metavar="CT", help="query scan: NIfTI file or DICOM folder (with --mask)")
    p.add_argument("--mask", default=None, metavar="MASK", help="organ mask of --scan")
    p.add_argument("--mask-format", choices=("auto", "visd", "totalsegmentator"), default="auto")
    p.add_argument("--organ", default=None, help="organ to compare (needed for --text and --scan)")
    p.add_argument("--top", type=int, default=20, help="number of results (default 20)")
    p.add_argument("--model", default=None, help="model folder or Hub repo id (default: the index's model)")
    p.add_argument("--approximate", action="store_true", help="use the approximate index")
    p.add_argument("--out", default=None, metavar="CSV", help="also write the results table")
    p.set_defaults(func=run_search)
    return p


def run_search(args: argparse.Namespace) -> int:
    from visd._io import atomic_write_text

    from .search import search

    table = search(
        args.index, text=args.text, finding=args.finding, scan=args.scan, mask=args.mask, organ=args.organ,
        top=args.top, model=args.model, approximate=args.approximate, mask_format=args.mask_format,
    )
    print(table[["rank", "scan", "organ", "score"]].to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    if args.out:
        print(f"wrote {atomic_write_text(args.out, table.to_csv(index=False))}")
    return 0
