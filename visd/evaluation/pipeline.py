"""Evaluate a prediction table against labels, and compare two prediction tables on the same scans."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd

from visd.errors import InputError

from .bootstrap import (
    SeedLike,
    check_bootstrap_args,
    chunks,
    joint_weights,
    make_rng,
    percentile_interval,
    stratified_replicates,
    stratified_weights,
    two_sided_p,
)
from .metrics import (
    METRICS,
    check_missing,
    prepare,
    single_class_reason,
    weighted_metrics,
)
from .tables import AlignedData, Labels, Predictions, TableSource, align

__all__ = ["Comparison", "Evaluation", "compare", "evaluate"]

logger = logging.getLogger(__name__)

OVERALL = "overall mean"
MEAN_METRICS = tuple(m for m in METRICS if m != "threshold")  # a mean threshold means nothing


def organ_row(organ: str) -> str:
    """Row name of an organ's mean in the result tables."""
    return f"{organ} mean"


@dataclass(frozen=True)
class Evaluation:
    """The outcome of :func:`evaluate`.

    ``table``: one row per finding (``kind == "finding"``), then one per organ (``"organ"``, named
    ``"<organ> mean"``) and ``"overall mean"`` (``"overall"``). Columns: ``kind, organ, n_findings,
    n_scans, n_positive, n_negative, n_missing``, each metric of :data:`~visd.evaluation.metrics.METRICS`
    with ``<metric>_low`` / ``<metric>_high`` (NaN without bootstrap), and ``reason`` (why a finding
    has NaN metrics). ``data`` holds the aligned scores and labels (used for the ROC plots).
    """

    table: pd.DataFrame
    data: AlignedData
    missing: str
    n_bootstrap: int
    seed: int | None
    confidence: float


@dataclass(frozen=True)
class Comparison:
    """The outcome of :func:`compare`: AUC of A and B, their difference A - B with a paired bootstrap
    interval and two-sided p-value, per finding, per organ mean and overall mean."""

    table: pd.DataFrame
    missing: str
    n_bootstrap: int
    seed: int | None
    confidence: float


def _groups(data: AlignedData) -> list[tuple[str, str, list[int]]]:
    """(row name, kind, finding indices) of every mean row, organs in order of first appearance."""
    organs = list(dict.fromkeys(data.organs))
    rows = [(organ_row(o), "organ", [j for j, oo in enumerate(data.organs) if oo == o]) for o in organs]
    rows.append((OVERALL, "overall", list(range(len(data.findings)))))
    return rows


def _prepared(data: AlignedData, missing: str, j: int, extra_valid: np.ndarray | None = None):
    s, y, valid = prepare(data.scores[:, j], data.labels[:, j], missing)
    if extra_valid is not None:
        valid = valid & extra_valid
    return s, y, valid


def _mean_over(replicates: list[np.ndarray], members: list[int], usable: np.ndarray) -> np.ndarray:
    """Per-replicate mean over the usable member findings; NaN where one of them is NaN."""
    idx = [j for j in members if usable[j]]
    if not idx:
        return np.full(replicates[0].shape if replicates else 0, np.nan)
    return np.mean(np.stack([replicates[j] for j in idx]), axis=0)


def _joint_replicates(
    data: AlignedData, missing: str, n_boot: int, rng: np.random.Generator, valid_extra=None, scores_list=None
) -> list[list[dict[str, np.ndarray]]]:
    """For each score matrix in ``scores_list``: per finding, metric -> (n_boot,) over joint resamples."""
    scores_list = scores_list or [data.scores]
    n = len(data.scans)
    out: list[list[list[dict[str, np.ndarray]]]] = [[[] for _ in data.findings] for _ in scores_list]
    for rows in chunks(n_boot, n):
        w = joint_weights(n, rows, rng)
        for k, scores in enumerate(scores_list):
            for j in range(len(data.findings)):
                s, y, valid = prepare(scores[:, j], data.labels[:, j], missing)
                if valid_extra is not None:
                    valid = valid & valid_extra[:, j]
                out[k][j].append(weighted_metrics(s, y, w * valid))
    return [[{m: np.concatenate([p[m] for p in parts]) for m in METRICS} for parts in per_f] for per_f in out]


def _warn_dropped(name: str, samples: np.ndarray) -> None:
    dropped = int(np.isnan(samples).sum())
    if dropped:
        logger.warning(
            "%s: %d of %d joint resamples had a finding with one class only and were dropped",
            name, dropped, samples.size,
        )


def evaluate(
    predictions: Predictions | TableSource,
    labels: Labels | TableSource,
    *,
    missing: str = "skip",
    n_bootstrap: int = 1000,
    seed: SeedLike = 0,
    confidence: float = 0.95,
    organ_of: Mapping[str, str] | None = None,
) -> Evaluation:
    """The official per-finding metrics, organ and overall means, with bootstrap intervals.

    Args:
        predictions: a long (visd results) or wide table, as a CSV path or DataFrame
            (see :mod:`visd.evaluation.tables`).
        labels: a CT-RATE style label table (CSV path or DataFrame).
        missing: ``"skip"`` (official: a missing score drops the scan for that finding) or ``"zero"``
            (fVLM: a missing score counts as 0).
        n_bootstrap: resamples for the intervals; 0 for none.
        seed: int, ``numpy.random.Generator`` or None.
        confidence: interval level.
        organ_of: finding -> organ, overriding the organ of the results table and the default
            CT-RATE map.
    """
    check_missing(missing)
    check_bootstrap_args(n_bootstrap, confidence)
    data = align(predictions, labels, organ_of=organ_of)
    root = make_rng(seed)
    streams = root.spawn(len(data.findings) + 1)

    rows: dict[str, dict] = {}
    point: list[dict[str, float]] = []
    for j, (finding, organ) in enumerate(zip(data.findings, data.organs)):
        s, y, valid = _prepared(data, missing, j)
        m = {k: float(v[0]) for k, v in weighted_metrics(s, y, valid[None, :].astype(float)).items()}
        reason = single_class_reason(y, valid)
        if reason:
            logger.warning("finding %r: metrics are NaN: %s", finding, reason)
        row = dict(
            kind="finding", organ=organ, n_findings=1, n_scans=int(valid.sum()),
            n_positive=int((y & valid).sum()), n_negative=int((~y & valid).sum()),
            n_missing=int(np.isnan(data.scores[:, j]).sum()), reason=reason, **m,
        )
        if n_bootstrap and not reason:
            reps = stratified_replicates(s, y, valid, n_bootstrap, streams[j])
            for k in METRICS:
                row[f"{k}_low"], row[f"{k}_high"] = percentile_interval(reps[k], confidence)
        rows[finding] = row
        point.append(m)

    usable = np.array([not rows[f]["reason"] for f in data.findings])
    joint = _joint_replicates(data, missing, n_bootstrap, streams[-1])[0] if n_bootstrap else None
    for name, kind, members in _groups(data):
        used = [j for j in members if usable[j]]
        row = dict(
            kind=kind, organ=name[: -len(" mean")] if kind == "organ" else "", n_findings=len(used),
            n_scans=len(data.scans), reason="" if used else "no finding with both classes",
        )
        for k in MEAN_METRICS:
            row[k] = float(np.mean([point[j][k] for j in used])) if used else float("nan")
            if joint is not None and used and len(members) == 1:  # the mean of one finding is that finding
                f = rows[data.findings[members[0]]]
                row[f"{k}_low"], row[f"{k}_high"] = f[f"{k}_low"], f[f"{k}_high"]
            elif joint is not None and used:
                samples = _mean_over([r[k] for r in joint], members, usable)
                if k == "auc":
                    _warn_dropped(name, samples)
                row[f"{k}_low"], row[f"{k}_high"] = percentile_interval(samples, confidence)
        rows[name] = row

    columns = ["kind", "organ", "n_findings", "n_scans", "n_positive", "n_negative", "n_missing"]
    columns += [c for k in METRICS for c in (k, f"{k}_low", f"{k}_high")] + ["reason"]
    table = pd.DataFrame.from_dict(rows, orient="index").reindex(columns=columns)
    table.index.name = "name"
    for c in ("n_positive", "n_negative", "n_missing"):
        table[c] = table[c].astype("Int64")
    overall = table.loc[OVERALL]
    logger.info(
        "evaluated %d findings on %d scans: mean AUC %.4f (missing=%s, %d resamples)",
        len(data.findings), len(data.scans), overall["auc"], missing, n_bootstrap,
    )
    return Evaluation(
        table=table, data=data, missing=missing, n_bootstrap=int(n_bootstrap),
        seed=int(seed) if isinstance(seed, (int, np.integer)) else None, confidence=confidence,
    )


def compare(
    predictions_a: Predictions | TableSource,
    predictions_b: Predictions | TableSource,
    labels: Labels | TableSource,
    *,
    missing: str = "skip",
    n_bootstrap: int = 1000,
    seed: SeedLike = 0,
    confidence: float = 0.95,
    organ_of: Mapping[str, str] | None = None,
) -> Comparison:
    """Paired bootstrap comparison of the AUC of two prediction tables on the same scans.

    Both tables are scored on the same resamples (stratified per finding; joint for the means), so
    the interval of the difference A - B is much narrower than the two AUC intervals would suggest
    when the models err on the same scans. With ``missing="skip"`` a scan counts for a finding only
    where both tables score it. Columns of ``table``: ``kind, organ, n_scans, auc_a, auc_b, diff,
    diff_low, diff_high, p_value``.
    """
    check_missing(missing)
    check_bootstrap_args(n_bootstrap, confidence)
    a = align(predictions_a, labels, organ_of=organ_of)
    b = align(predictions_b, labels, organ_of=organ_of)
    if set(a.findings) != set(b.findings):
        raise InputError(
            f"the two prediction tables score different findings: only in A {sorted(set(a.findings) - set(b.findings))}, "
            f"only in B {sorted(set(b.findings) - set(a.findings))}. Expected the same findings. "
            "Restrict both tables to the shared findings."
        )
    pos_a = {s: i for i, s in enumerate(a.scans)}
    pos_b = {s: i for i, s in enumerate(b.scans)}
    scans = [s for s in a.scans if s in pos_b]
    if len(scans) < max(len(a.scans), len(b.scans)):
        logger.warning(
            "comparing on the %d scans both tables score (A has %d, B has %d)", len(scans), len(a.scans), len(b.scans)
        )
    ia = [pos_a[s] for s in scans]
    ib = [pos_b[s] for s in scans]
    jb = [b.findings.index(f) for f in a.findings]
    data = AlignedData(
        scans=tuple(scans), findings=a.findings, organs=a.organs,
        scores=a.scores[ia], labels=a.labels[ia],
    )
    scores_b = b.scores[np.ix_(ib, jb)]
    both = ~np.isnan(data.scores) & ~np.isnan(scores_b) if missing == "skip" else np.ones_like(data.labels, bool)
    root = make_rng(seed)
    streams = root.spawn(len(data.findings) + 1)

    rows: dict[str, dict] = {}
    point_a, point_b, usable = [], [], []
    for j, (finding, organ) in enumerate(zip(data.findings, data.organs)):
        sa, y, valid = _prepared(data, missing, j, both[:, j])
        sb, _, _ = prepare(scores_b[:, j], data.labels[:, j], missing)
        reason = single_class_reason(y, valid)
        w1 = valid[None, :].astype(float)
        auc_a = float(weighted_metrics(sa, y, w1)["auc"][0])
        auc_b = float(weighted_metrics(sb, y, w1)["auc"][0])
        row = dict(kind="finding", organ=organ, n_scans=int(valid.sum()), auc_a=auc_a, auc_b=auc_b,
                   diff=auc_a - auc_b, reason=reason)
        if n_bootstrap and not reason:
            diffs = []
            for n_rows in chunks(n_bootstrap, sa.size):
                w = stratified_weights(y, valid, n_rows, streams[j])
                diffs.append(weighted_metrics(sa, y, w)["auc"] - weighted_metrics(sb, y, w)["auc"])
            d = np.concatenate(diffs)
            row["diff_low"], row["diff_high"] = percentile_interval(d, confidence)
            row["p_value"] = two_sided_p(d)
        rows[finding] = row
        point_a.append(auc_a)
        point_b.append(auc_b)
        usable.append(not reason)
    usable_arr = np.array(usable)

    joint = None
    if n_bootstrap:
        ja, jb_ = _joint_replicates(data, missing, n_bootstrap, streams[-1], valid_extra=both,
                                    scores_list=[data.scores, scores_b])
        joint = [ra["auc"] - rb["auc"] for ra, rb in zip(ja, jb_)]
    for name, kind, members in _groups(data):
        used = [j for j in members if usable_arr[j]]
        ma = float(np.mean([point_a[j] for j in used])) if used else float("nan")
        mb = float(np.mean([point_b[j] for j in used])) if used else float("nan")
        row = dict(kind=kind, organ=name[: -len(" mean")] if kind == "organ" else "", n_scans=len(scans),
                   auc_a=ma, auc_b=mb, diff=ma - mb, reason="" if used else "no finding with both classes")
        if joint is not None and used and len(members) == 1:  # the mean of one finding is that finding
            f = rows[data.findings[members[0]]]
            row.update(diff_low=f["diff_low"], diff_high=f["diff_high"], p_value=f["p_value"])
        elif joint is not None and used:
            d = _mean_over(joint, members, usable_arr)
            _warn_dropped(name, d)
            row["diff_low"], row["diff_high"] = percentile_interval(d, confidence)
            row["p_value"] = two_sided_p(d)
        rows[name] = row
    columns = ["kind", "organ", "n_scans", "auc_a", "auc_b", "diff", "diff_low", "diff_high", "p_value", "reason"]
    table = pd.DataFrame.from_dict(rows, orient="index").reindex(columns=columns)
    table.index.name = "name"
    return Comparison(
        table=table, missing=missing, n_bootstrap=int(n_bootstrap),
        seed=int(seed) if isinstance(seed, (int, np.integer)) else None, confidence=confidence,
    )
