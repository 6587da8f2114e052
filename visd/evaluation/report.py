"""Write an evaluation to a folder: metric tables (CSV, Markdown) and ROC plots (PNG), all atomically.

Files written by :func:`write_report`:

* ``metrics.md`` / ``metrics.csv``: one row per finding, then organ means and the overall mean, every
  value formatted ``0.812 (0.771–0.850)`` (point estimate and bootstrap interval).
* ``metrics_raw.csv``: the same numbers unformatted, with ``<metric>_low`` / ``<metric>_high`` columns.
* ``roc_<organ>.png``: a grid of small ROC curves, one per finding of the organ, the AUC (and its
  interval) in each title, the numbers of positive and negative scans on each plot and the official
  threshold marked.
* ``comparison.md`` / ``comparison.csv``: with a :class:`~visd.evaluation.pipeline.Comparison`.

Matplotlib is used through ``Figure`` + ``FigureCanvasAgg`` only, so the global backend and pyplot
state are never touched.
"""

from __future__ import annotations

import io
import logging
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd

from visd._io import atomic_write_bytes, atomic_write_text

from .metrics import METRICS, operating_point, prepare
from .pipeline import Comparison, Evaluation

__all__ = ["format_value", "metrics_markdown", "plot_roc_grid", "write_report"]

logger = logging.getLogger(__name__)

_TITLES = {
    "auc": "AUC",
    "auprc": "AUPRC",
    "threshold": "Threshold",
    "accuracy": "Accuracy",
    "sensitivity": "Sensitivity",
    "specificity": "Specificity",
    "precision": "Precision",
    "f1_weighted": "F1 (weighted)",
    "f1_macro": "F1 (macro)",
}


def format_value(value: float, low: float = math.nan, high: float = math.nan, digits: int = 3) -> str:
    """``0.812 (0.771–0.850)``; ``0.812`` without an interval; ``–`` for NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or pd.isna(value):
        return "–"
    text = f"{value:.{digits}f}"
    if not (pd.isna(low) or pd.isna(high)):
        text += f" ({low:.{digits}f}–{high:.{digits}f})"
    return text


def formatted_table(evaluation: Evaluation) -> pd.DataFrame:
    """The report table: counts and one formatted string per metric."""
    t = evaluation.table
    out = pd.DataFrame(index=t.index)
    out["Organ"] = t["organ"]
    out["Scans"] = t["n_scans"]
    out["Pos/Neg"] = [
        f"{p}/{n}" if r["kind"] == "finding" else f"{r['n_findings']} finding{'s' * (r['n_findings'] != 1)}"
        for (_, r), p, n in zip(t.iterrows(), t["n_positive"], t["n_negative"])
    ]
    for m in METRICS:
        out[_TITLES[m]] = [format_value(v, lo, hi) for v, lo, hi in zip(t[m], t[f"{m}_low"], t[f"{m}_high"])]
    out["Note"] = t["reason"].fillna("")
    out.index.name = "Finding"
    return out


def _markdown(df: pd.DataFrame) -> str:
    def cell(v: object) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    cols = [df.index.name or ""] + list(map(str, df.columns))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for name, row in df.iterrows():
        lines.append("| " + " | ".join(cell(v) for v in [name, *row.tolist()]) + " |")
    return "\n".join(lines) + "\n"


def _settings_line(missing: str, n_bootstrap: int, confidence: float, seed: int | None) -> str:
    seeded = f" (seed {seed})" if seed is not None else ""
    ci = (
        f"{confidence:.0%} percentile intervals from {n_bootstrap} bootstrap resamples{seeded}"
        if n_bootstrap
        else "no bootstrap intervals"
    )
    return f"Missing scores: `{missing}`; {ci}."


def metrics_markdown(evaluation: Evaluation) -> str:
    """The Markdown report: a settings line and the formatted table."""
    d = evaluation.data
    head = (
        f"# Evaluation\n\n{len(d.scans)} scans, {len(d.findings)} findings. "
        f"{_settings_line(evaluation.missing, evaluation.n_bootstrap, evaluation.confidence, evaluation.seed)} "
        "Threshold: the official rule (linspace(0, 1, 100), minimum distance to (FPR 0, TPR 1), ties to the "
        "higher threshold, positive when score >= threshold), re-chosen in every resample.\n\n"
    )
    return head + _markdown(formatted_table(evaluation))


def comparison_markdown(comparison: Comparison) -> str:
    t = comparison.table
    out = pd.DataFrame(index=t.index)
    out.index.name = "Finding"
    out["Scans"] = t["n_scans"]
    out["AUC A"] = [format_value(v) for v in t["auc_a"]]
    out["AUC B"] = [format_value(v) for v in t["auc_b"]]
    out["A − B"] = [format_value(v, lo, hi) for v, lo, hi in zip(t["diff"], t["diff_low"], t["diff_high"])]
    out["p"] = [format_value(v) for v in t["p_value"]]
    head = (
        "# Paired comparison (A − B)\n\n"
        f"{_settings_line(comparison.missing, comparison.n_bootstrap, comparison.confidence, comparison.seed)} "
        "Both tables are scored on the same resamples; p is two-sided.\n\n"
    )
    return head + _markdown(out)


def _roc_points(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=True)
    return fpr, tpr


def _counts_label(row: pd.Series) -> str:
    """``"12 positive / 40 negative"``: the scans one ROC curve is computed from."""
    return f"{int(row['n_positive'])} positive / {int(row['n_negative'])} negative"


def plot_roc_grid(evaluation: Evaluation, organ: str):
    """A matplotlib ``Figure`` with one small ROC plot per finding of ``organ`` (no global state)."""
    from matplotlib.figure import Figure

    d = evaluation.data
    t = evaluation.table
    members = [j for j, o in enumerate(d.organs) if o == organ]
    ncols = min(4, max(1, len(members)))
    nrows = math.ceil(len(members) / ncols)
    fig = Figure(figsize=(3.0 * ncols, 3.2 * nrows + 0.5), dpi=100, layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    for ax, j in zip(axes, members):
        name = d.findings[j]
        row = t.loc[name]
        ax.plot([0, 1], [0, 1], linestyle="--", color="0.7", linewidth=0.8)
        ax.set_xlim(-0.01, 1.01)
        ax.set_ylim(-0.01, 1.01)
        ax.set_aspect("equal")
        ax.tick_params(labelsize=7)
        ax.set_xlabel("1 − specificity", fontsize=7)
        ax.set_ylabel("sensitivity", fontsize=7)
        ax.text(0.97, 0.03, _counts_label(row), transform=ax.transAxes, ha="right", va="bottom", fontsize=7,
                bbox={"boxstyle": "round,pad=0.2", "facecolor": "white", "edgecolor": "0.8"})
        if row["reason"]:
            ax.set_title(f"{name}\nnot evaluable", fontsize=8)
            ax.text(0.5, 0.5, str(row["reason"]), ha="center", va="center", fontsize=6, wrap=True)
            continue
        s, y, valid = prepare(d.scores[:, j], d.labels[:, j], evaluation.missing)
        fpr, tpr = _roc_points(s[valid], y[valid])
        ax.plot(fpr, tpr, color="tab:blue", linewidth=1.5)
        px, py = operating_point(s[valid], y[valid], row["threshold"])
        ax.plot([px], [py], marker="o", color="tab:red", markersize=5)
        ax.annotate(f"t={row['threshold']:.2f}", (px, py), xytext=(6, -10), textcoords="offset points",
                    fontsize=7, color="tab:red")
        auc = format_value(row["auc"], row["auc_low"], row["auc_high"])
        ax.set_title(f"{name}\nAUC {auc}", fontsize=8)
    for ax in axes[len(members):]:
        ax.set_visible(False)
    mean = t.loc[f"{organ} mean"] if f"{organ} mean" in t.index else None
    title = organ if mean is None else f"{organ}: mean AUC {format_value(mean['auc'], mean['auc_low'], mean['auc_high'])}"
    fig.suptitle(title, fontsize=10)
    return fig


def _png_bytes(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    buf = io.BytesIO()
    canvas.print_png(buf)
    return buf.getvalue()


def _file_stem(organ: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", organ).strip("_") or "organ"


def write_report(
    evaluation: Evaluation, out_dir: str | Path, *, comparison: Comparison | None = None
) -> dict[str, Path]:
    """Write the tables and ROC plots of ``evaluation`` (and ``comparison``) into ``out_dir``.

    Returns a mapping of short names (``"metrics_md"``, ``"metrics_csv"``, ``"metrics_raw_csv"``,
    ``"roc_<organ>"``, ``"comparison_md"``, ``"comparison_csv"``) to the written paths.
    """
    out = Path(out_dir)
    written: dict[str, Path] = {}
    written["metrics_md"] = atomic_write_text(out / "metrics.md", metrics_markdown(evaluation))
    written["metrics_csv"] = atomic_write_text(out / "metrics.csv", formatted_table(evaluation).to_csv())
    written["metrics_raw_csv"] = atomic_write_text(out / "metrics_raw.csv", evaluation.table.to_csv())
    for organ in dict.fromkeys(evaluation.data.organs):
        fig = plot_roc_grid(evaluation, organ)
        written[f"roc_{organ}"] = atomic_write_bytes(out / f"roc_{_file_stem(organ)}.png", _png_bytes(fig))
    if comparison is not None:
        written["comparison_md"] = atomic_write_text(out / "comparison.md", comparison_markdown(comparison))
        written["comparison_csv"] = atomic_write_text(out / "comparison.csv", comparison.table.to_csv())
    logger.info("wrote evaluation report to %s (%d files)", out, len(written))
    return written
