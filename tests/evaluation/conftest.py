"""Shared fixtures for the evaluation tests: small synthetic CT-RATE style tables."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

FINDINGS = {"Emphysema": "lung", "Lung nodule": "lung", "Cardiomegaly": "heart", "Hiatal hernia": "esophagus"}


def make_tables(rng: np.random.Generator, n: int = 120, missing_frac: float = 0.05, shift: float = 1.5):
    """(long predictions, wide predictions, labels): labels use '.nii.gz' ids, predictions do not."""
    scans = [f"valid_{i}_a_1" for i in range(n)]
    labels = pd.DataFrame({"VolumeName": [s + ".nii.gz" for s in scans]})
    wide = pd.DataFrame({"scan": scans})
    rows = []
    for finding, organ in FINDINGS.items():
        y = (rng.random(n) < 0.3).astype(int)
        y[:2] = [0, 1]  # both classes always present
        labels[finding] = y
        p = 1 / (1 + np.exp(-(shift * y + rng.normal(size=n) - 1)))
        p[rng.random(n) < missing_frac] = np.nan
        wide[finding] = p
        for scan, value in zip(scans, p):
            status = "scored" if np.isfinite(value) else "organ not in field of view"
            rows.append(dict(scan=scan, organ=organ, finding=finding, probability=value, status=status))
    labels["Lymphadenopathy"] = rng.integers(0, 2, n)  # a label column without predictions
    return pd.DataFrame(rows), wide, labels


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture
def tables(rng):
    return make_tables(rng)


@pytest.fixture
def table_factory():
    """``make_tables`` itself, for tests that need other sizes or settings."""
    return make_tables
