"""Session fixtures for the data tests: the real CT files in tests/data."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from visd.config import ViSDConfig

from ._helpers import data_file, merge_by_ids


@pytest.fixture(scope="session")
def config() -> ViSDConfig:
    return ViSDConfig()


@pytest.fixture(scope="session")
def expected() -> dict:
    return json.loads(data_file("expected.json").read_text())


@pytest.fixture(scope="session")
def ras_ct() -> nib.Nifti1Image:
    return nib.load(data_file("abdomen_3mm.nii.gz"))


@pytest.fixture(scope="session")
def ras_seg() -> nib.Nifti1Image:
    return nib.load(data_file("abdomen_3mm_totalseg.nii.gz"))


@pytest.fixture(scope="session")
def ras_seg_labels(ras_seg) -> np.ndarray:
    return np.asarray(ras_seg.dataobj)


@pytest.fixture(scope="session")
def ras_organs(ras_seg_labels) -> np.ndarray:
    """The merged chest-organ map of the RAS scan, by the independent id reference."""
    return merge_by_ids(ras_seg_labels)
