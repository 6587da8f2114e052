"""Bootstrap resampling of scans: confidence intervals and paired comparisons.

Design (see ``docs/evaluation.md``):

* A resample draws scans **with replacement** and is represented by weights: ``weights[b, i]`` is how
  often scan ``i`` was drawn in resample ``b``. Metrics are then computed on all resamples at once
  (:func:`visd.evaluation.metrics.weighted_metrics`), which equals recomputing them on the resampled
  table.
* Per finding the resample is **stratified by that finding's label**: positives are drawn from
  positives and negatives from negatives, so every resample keeps the positive and negative counts.
  The official threshold is **re-chosen inside every resample**, so the intervals include the
  uncertainty of the operating point the official procedure picks on the same data.
* Means over findings (per organ and overall) use a **joint** resample of scans, the same draws for
  every finding, so the correlation between findings (the same hard scans) enters their interval.
  It cannot be stratified by 16 labels at once; a resample in which some finding has one class only
  is dropped for the means (counted in a warning).
* Intervals are percentile intervals. The paired p-value is two-sided:
  ``min(1, 2 * min((1 + #{d* <= 0}) / (B + 1), (1 + #{d* >= 0}) / (B + 1)))`` over the resampled
  differences ``d*``.
"""

from __future__ import annotations

import logging

import numpy as np

from visd.errors import InputError

from .metrics import METRICS, prepare, weighted_metrics

__all__ = ["bootstrap_finding", "make_rng", "percentile_interval"]

logger = logging.getLogger(__name__)

SeedLike = int | np.random.Generator | None
_CELLS_PER_CHUNK = 1_000_000  # weights (B_chunk, n) held at once


def make_rng(seed: SeedLike) -> np.random.Generator:
    """A ``numpy.random.Generator`` from an int seed, a Generator (used as is) or None (fresh entropy)."""
    if isinstance(seed, np.random.Generator):
        return seed
    if seed is None or isinstance(seed, (int, np.integer)):
        return np.random.default_rng(seed)
    raise InputError(f"seed must be an int, a numpy Generator or None: got {seed!r}. Pass e.g. seed=0.")


def check_bootstrap_args(n_boot: int, confidence: float) -> None:
    if not isinstance(n_boot, (int, np.integer)) or n_boot < 0:
        raise InputError(f"number of bootstrap resamples must be an int >= 0: got {n_boot!r}. Use e.g. 1000.")
    if not 0.0 < confidence < 1.0:
        raise InputError(f"confidence must be in (0, 1): got {confidence!r}. Use e.g. 0.95.")


def _counts(rng: np.random.Generator, n_rows: int, m: int) -> np.ndarray:
    """(n_rows, m): how often each of m items is drawn in m draws with replacement, per row."""
    draws = rng.integers(0, m, size=(n_rows, m))
    offsets = (np.arange(n_rows) * m)[:, None]
    return np.bincount((draws + offsets).ravel(), minlength=n_rows * m).reshape(n_rows, m)


def stratified_weights(
    labels: np.ndarray, valid: np.ndarray, n_rows: int, rng: np.random.Generator
) -> np.ndarray:
    """(n_rows, n) resample weights keeping the counts of valid positives and valid negatives."""
    w = np.zeros((n_rows, labels.size))
    for cls in (True, False):
        idx = np.flatnonzero(valid & (labels == cls))
        if idx.size:
            w[:, idx] = _counts(rng, n_rows, idx.size)
    return w


def joint_weights(n: int, n_rows: int, rng: np.random.Generator) -> np.ndarray:
    """(n_rows, n) weights of a plain resample of all n scans."""
    return _counts(rng, n_rows, n).astype(np.float64)


def chunks(n_boot: int, n: int) -> list[int]:
    """Replicates per chunk so that a weight matrix stays near a fixed size."""
    step = max(1, _CELLS_PER_CHUNK // max(n, 1))
    return [min(step, n_boot - start) for start in range(0, n_boot, step)]


def percentile_interval(samples: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the finite samples; (NaN, NaN) if there are none."""
    samples = np.asarray(samples, dtype=np.float64)
    samples = samples[np.isfinite(samples)]
    if samples.size == 0:
        return float("nan"), float("nan")
    alpha = 1.0 - confidence
    low, high = np.percentile(samples, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(low), float(high)


def two_sided_p(differences: np.ndarray) -> float:
    """Bootstrap two-sided p-value of "no difference" (see the module docstring)."""
    d = np.asarray(differences, dtype=np.float64)
    d = d[np.isfinite(d)]
    if d.size == 0:
        return float("nan")
    low = (1 + np.sum(d <= 0)) / (d.size + 1)
    high = (1 + np.sum(d >= 0)) / (d.size + 1)
    return float(min(1.0, 2 * min(low, high)))


def stratified_replicates(
    scores: np.ndarray, labels: np.ndarray, valid: np.ndarray, n_boot: int, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Metric name -> (n_boot,) values over stratified resamples of one finding."""
    parts: list[dict[str, np.ndarray]] = []
    for rows in chunks(n_boot, scores.size):
        w = stratified_weights(labels, valid, rows, rng)
        parts.append(weighted_metrics(scores, labels, w))
    return {m: np.concatenate([p[m] for p in parts]) for m in METRICS}


def bootstrap_finding(
    scores: np.ndarray,
    labels: np.ndarray,
    *,
    missing: str = "skip",
    n_boot: int = 1000,
    seed: SeedLike = 0,
    confidence: float = 0.95,
) -> dict[str, tuple[float, float]]:
    """Stratified bootstrap percentile intervals of every metric of one finding.

    Args:
        scores: (n,) probabilities, NaN where missing. labels: (n,) 0/1.
        missing: ``"skip"`` or ``"zero"`` (see :mod:`visd.evaluation.metrics`).
        n_boot: number of resamples. seed: int, ``numpy.random.Generator`` or None.

    Returns:
        metric name -> (low, high); (NaN, NaN) when the labels hold one class only.
    """
    check_bootstrap_args(n_boot, confidence)
    s, y, valid = prepare(scores, labels, missing)
    reps = stratified_replicates(s, y, valid, n_boot, make_rng(seed))
    return {m: percentile_interval(reps[m], confidence) for m in METRICS}
