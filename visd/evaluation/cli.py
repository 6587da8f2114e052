"""Command-line glue for ``visd evaluate`` and ``visd probe``.

The main ``visd`` parser calls :func:`add_evaluate_parser` and :func:`add_probe_parser` with its
``add_subparsers()`` object; each sets ``func`` to a function that takes the parsed ``Namespace`` and
returns an exit code. Bad input raises :class:`visd.errors.VisdError`, which the main CLI turns into a
one-line error; logging is configured by the main CLI.
"""

from __future__ import annotations

import argparse
import sys

from visd.errors import InputError

__all__ = ["add_evaluate_parser", "add_probe_parser", "parse_organ_of", "run_evaluate", "run_probe"]

_SUMMARY = ["Organ", "Pos/Neg", "AUC", "Accuracy", "F1 (weighted)", "Precision"]


def parse_organ_of(items: list[str] | None) -> dict[str, str]:
    """``["Lung nodule=lung", ...]`` -> ``{"Lung nodule": "lung"}`` (split at the last ``=``)."""
    mapping: dict[str, str] = {}
    for item in items or []:
        finding, sep, organ = item.rpartition("=")
        if not sep or not finding.strip() or not organ.strip():
            raise InputError(
                f"bad --organ-of value: {item!r}. Expected FINDING=ORGAN, e.g. 'Lung nodule=lung'. "
                "Quote values that contain spaces."
            )
        mapping[finding.strip()] = organ.strip()
    return mapping


def _organ_of_argument(parser: argparse.ArgumentParser, default_note: str) -> None:
    parser.add_argument(
        "--organ-of", action="append", metavar="FINDING=ORGAN", default=None,
        help=f"organ of a finding; repeat for several. {default_note}",
    )


def add_evaluate_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``evaluate`` on an ``argparse`` subparsers object."""
    p = subparsers.add_parser(
        "evaluate",
        help="official metrics with bootstrap intervals, ROC plots, paired comparison",
        description="Compute the official per-finding metrics (AUC, threshold, accuracy, sensitivity, "
        "specificity, precision, weighted F1, AUPRC) with bootstrap confidence intervals.",
    )
    p.add_argument("--predictions", required=True, help="results CSV (visd long format or one column per finding)")
    p.add_argument("--labels", required=True, help="labels CSV in CT-RATE format (VolumeName + 0/1 columns)")
    p.add_argument("--out", default=None, help="folder for the report (tables and ROC plots)")
    p.add_argument("--missing", choices=("skip", "zero"), default="skip",
                   help="missing scores: skip the scan (official, default) or count as 0 (fVLM)")
    p.add_argument("--bootstrap", type=int, default=1000, metavar="N", help="bootstrap resamples (0: none)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the bootstrap")
    p.add_argument("--confidence", type=float, default=0.95, help="interval level (default 0.95)")
    p.add_argument("--compare", default=None, metavar="OTHER.csv",
                   help="second results CSV: paired bootstrap of the AUC difference (predictions - other)")
    _organ_of_argument(p, "Overrides the organ column of the results and the CT-RATE default map.")
    p.set_defaults(func=run_evaluate)
    return p


def run_evaluate(args: argparse.Namespace) -> int:
    """Run ``visd evaluate``; print the summary table; return 0."""
    from .pipeline import compare, evaluate
    from .report import comparison_markdown, formatted_table, write_report
    from .tables import read_labels

    organ_of = parse_organ_of(args.organ_of)
    labels = read_labels(args.labels)
    common = dict(missing=args.missing, n_bootstrap=args.bootstrap, seed=args.seed,
                  confidence=args.confidence, organ_of=organ_of)
    evaluation = evaluate(args.predictions, labels, **common)
    comparison = compare(args.predictions, args.compare, labels, **common) if args.compare else None
    table = formatted_table(evaluation)[_SUMMARY]
    print(table.to_string())
    if comparison is not None:
        print()
        print(comparison_markdown(comparison))
    if args.out:
        written = write_report(evaluation, args.out, comparison=comparison)
        print(f"\nreport: {len(written)} files in {args.out}")
    return 0


def add_probe_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``probe`` on an ``argparse`` subparsers object."""
    p = subparsers.add_parser(
        "probe",
        help="linear probe (logistic regression, stratified k-fold AUC) on exported organ embeddings",
        description="Fit a logistic regression per finding on the embedding of its organ and report the "
        "cross-validated AUC (mean and std over folds).",
    )
    p.add_argument("--embeddings", required=True, help="embedding .safetensors file exported by visd")
    p.add_argument("--labels", required=True, help="labels CSV in CT-RATE format (VolumeName + 0/1 columns)")
    _organ_of_argument(p, "Extends/overrides the CT-RATE default map (lung, heart, esophagus, aorta findings).")
    p.add_argument("--findings", nargs="+", default=None, metavar="FINDING",
                   help="findings to probe (default: every label column with an organ)")
    p.add_argument("--folds", type=int, default=5, help="stratified folds (default 5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the fold shuffling")
    p.add_argument("--C", type=float, default=1.0, dest="C", help="inverse L2 regularisation strength")
    p.add_argument("--out", default=None, help="CSV file for the per-finding results")
    p.set_defaults(func=run_probe)
    return p


def run_probe(args: argparse.Namespace) -> int:
    """Run ``visd probe``; print the per-finding AUCs; return 0."""
    from visd._io import atomic_write_text

    from .probe import linear_probe

    table = linear_probe(
        args.embeddings, args.labels, organ_of=parse_organ_of(args.organ_of), findings=args.findings,
        n_splits=args.folds, seed=args.seed, C=args.C,
    )
    shown = table[["organ", "n_positive", "n_negative"]].copy()
    shown["AUC"] = [
        "–" if reason else f"{m:.3f} ± {s:.3f}" for m, s, reason in zip(table["auc_mean"], table["auc_std"], table["reason"])
    ]
    print(shown.to_string())
    print(f"\nmean AUC {table['auc_mean'].mean():.3f} over {int(table['auc_mean'].notna().sum())} findings")
    if args.out:
        atomic_write_text(args.out, table.to_csv())
        print(f"results: {args.out}", file=sys.stdout)
    return 0
