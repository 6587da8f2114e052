"""The result of :func:`visd.zero_shot.diagnose`: a tidy table, one row per (scan, finding).

Columns ``scan, organ, finding, probability, status``. ``status`` is ``"scored"`` or why the finding
was not scored: the organ's reason (``"organ_absent"``, ...) with a NaN probability, or
``"error: <message>"`` for every finding of a scan that could not be read. This is the *long* format
that ``visd evaluate`` reads.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from visd._io import atomic_write_text

__all__ = ["COLUMNS", "DIAGNOSIS_FORMAT", "ERROR_PREFIX", "DiagnosisReport"]

COLUMNS = ("scan", "organ", "finding", "probability", "status")
DIAGNOSIS_FORMAT = "visd.diagnosis/1"
ERROR_PREFIX = "error: "


@dataclass
class DiagnosisReport:
    """Zero-shot findings of a batch of scans.

    Attributes:
        scans: scan ids, in input order (failed scans included).
        records: one dict per (scan, finding) with the keys of :data:`COLUMNS`, scans in input order
            and findings in catalogue order.
        failed: ``(scan, reason)`` of each scan that was skipped.
        organs: the model's organs (axis 1 of ``embeddings``).
        embeddings: ``(N_scans, N_organs, E)`` float32 L2-normalised organ embeddings; NaN rows for
            organs not scored (absent, not asked for) and for failed scans.
        anomaly_maps: per scan with maps written, the ``(nifti, png)`` paths.
        embeddings_path: the embedding file written, if any.
        resumed: scan ids taken from the journal of an interrupted run (``diagnose(resume=True)``).
        numerics: the image path's numerics, e.g. ``"fused"`` or ``"fused-bf16"``
            (:meth:`visd.models.numerics.Numerics.describe`).
    """

    scans: tuple[str, ...]
    records: list[dict[str, Any]]
    failed: list[tuple[str, str]] = field(default_factory=list)
    organs: tuple[str, ...] = ()
    embeddings: np.ndarray | None = None
    anomaly_maps: dict[str, tuple[Path, Path]] = field(default_factory=dict)
    embeddings_path: Path | None = None
    resumed: list[str] = field(default_factory=list)
    numerics: str = ""

    @property
    def succeeded(self) -> tuple[str, ...]:
        """Scan ids that were diagnosed."""
        bad = {s for s, _ in self.failed}
        return tuple(s for s in self.scans if s not in bad)

    def to_pandas(self):
        """A DataFrame with columns ``scan, organ, finding, probability, status`` (NaN when not scored)."""
        import pandas as pd

        df = pd.DataFrame(self.records, columns=list(COLUMNS))
        df["probability"] = df["probability"].astype("float64")
        return df

    def to_csv(self, path: str | os.PathLike) -> Path:
        """Write the table as CSV (an empty cell for NaN), atomically; returns the path."""
        return atomic_write_text(path, self.to_pandas().to_csv(index=False))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready content: format, numerics, columns, scans, failed scans with reasons, rows (NaN -> null)."""
        rows = [
            {**r, "probability": None if math.isnan(r["probability"]) else float(r["probability"])}
            for r in self.records
        ]
        return {
            "format": DIAGNOSIS_FORMAT,
            "numerics": self.numerics,
            "columns": list(COLUMNS),
            "scans": list(self.scans),
            "failed": [{"scan": s, "reason": r} for s, r in self.failed],
            "rows": rows,
        }

    def to_json(self, path: str | os.PathLike) -> Path:
        """Write :meth:`to_dict` as JSON, atomically; returns the path."""
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n")

    def format_table(self, digits: int = 3) -> str:
        """The findings as text, one block per scan: a header line with the scan id, then one row per
        scored finding (organ, finding, probability, status); the findings of an organ that was not
        scored share one row (``(3 findings)``, ``-``, its reason), a scan that failed is one line with
        its error. What ``visd diagnose`` prints."""
        width = max([len("finding"), *(len(r["finding"]) for r in self.records)])
        organ_width = max([len("organ"), *(len(r["organ"]) for r in self.records)])
        prob_width = max(len("probability"), digits + 2)
        head = f"  {'organ':<{organ_width}}  {'finding':<{width}}  {'probability':>{prob_width}}  status"
        by_scan: dict[str, list[dict[str, Any]]] = {s: [] for s in self.scans}
        for r in self.records:
            by_scan.setdefault(r["scan"], []).append(r)
        failed = dict(self.failed)
        blocks = []
        for scan, rows in by_scan.items():
            if scan in failed:
                blocks.append(f"{scan}: {ERROR_PREFIX}{failed[scan]}")
                continue
            lines = [scan, head]
            grouped: dict[tuple[str, str], int] = {}
            for r in rows:
                if r["status"] != "scored":
                    grouped[(r["organ"], r["status"])] = grouped.get((r["organ"], r["status"]), 0) + 1
            shown = set()
            for r in rows:
                if r["status"] == "scored":
                    p = f"{r['probability']:.{digits}f}"
                    lines.append(f"  {r['organ']:<{organ_width}}  {r['finding']:<{width}}  {p:>{prob_width}}  scored")
                elif (r["organ"], r["status"]) not in shown:
                    shown.add((r["organ"], r["status"]))
                    n = grouped[(r["organ"], r["status"])]
                    what = r["finding"] if n == 1 else f"({n} findings)"
                    lines.append(f"  {r['organ']:<{organ_width}}  {what:<{width}}  {'-':>{prob_width}}  {r['status']}")
            blocks.append("\n".join(lines))
        return "\n\n".join(blocks)

    def __repr__(self) -> str:
        lines = [f"DiagnosisReport({len(self.scans)} scans, {len(self.failed)} failed, {len(self.records)} rows)"]
        for r in self.records[:40]:
            p = "   nan" if math.isnan(r["probability"]) else f"{r['probability']:.4f}"
            lines.append(f"  {r['scan']:<16} {r['organ']:<10} {r['finding']:<36} {p}  {r['status'][:60]}")
        if len(self.records) > 40:
            lines.append(f"  ... {len(self.records) - 40} more rows")
        return "\n".join(lines)
