"""Reading the findings table that ``visd diagnose`` and ``visd demo`` print, and checking it against the CSV."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd


def parse_table(text: str) -> pd.DataFrame:
    """The rows of the printed findings table (``DiagnosisReport.format_table``) as a DataFrame."""
    rows, scan = [], None
    for line in text.splitlines():
        if not line.strip() or line.startswith("diagnosed "):
            continue
        if not line.startswith("  "):
            scan, _, error = line.partition(": error: ")
            if error:
                rows.append(dict(scan=scan, organ="", finding="", probability=np.nan, status="error: " + error))
            continue
        organ, finding, probability, status = re.split(r"\s{2,}", line.strip())
        if organ == "organ":
            continue
        rows.append(dict(scan=scan, organ=organ, finding=finding,
                         probability=np.nan if probability == "-" else float(probability), status=status))
    return pd.DataFrame(rows)


def assert_table_is_the_csv(printed: pd.DataFrame, csv: pd.DataFrame) -> None:
    """Scored rows one by one (3 decimals); the findings of an unscored organ as one '(n findings)' row;
    a failed scan as one error line."""
    expected = []
    for scan, rows in csv.groupby("scan", sort=False):
        if rows.status.str.startswith("error: ").all():
            expected.append((scan, "", "", np.nan, rows.status.iloc[0]))
            continue
        seen = set()
        for r in rows.itertuples():
            if r.status == "scored":
                expected.append((scan, r.organ, r.finding, round(r.probability, 3), "scored"))
            elif (r.organ, r.status) not in seen:
                seen.add((r.organ, r.status))
                n = int(((rows.organ == r.organ) & (rows.status == r.status)).sum())
                expected.append((scan, r.organ, r.finding if n == 1 else f"({n} findings)", np.nan, r.status))
    got = list(printed.itertuples(index=False, name=None))
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g[:3] == e[:3] and g[4] == e[4], (g, e)
        assert (np.isnan(g[3]) and np.isnan(e[3])) or abs(g[3] - e[3]) < 1e-9, (g, e)
