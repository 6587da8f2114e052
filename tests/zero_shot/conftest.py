"""Shared fixtures of the zero-shot tests: one tiny model folder, loaded once; the real CT case."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import DATA, make_tiny_model

CT = DATA / "abdomen_3mm.nii.gz"
SEG = DATA / "abdomen_3mm_totalseg.nii.gz"
CT_LPS = DATA / "ct_lps.nii.gz"
SEG_LPS = DATA / "totalseg_lps.nii.gz"


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """A small random-initialised model written with save_pretrained."""
    return make_tiny_model(seed=0).save_pretrained(tmp_path_factory.mktemp("models") / "visd-tiny")


@pytest.fixture(scope="session")
def model(model_dir):
    from visd import ViSDModel

    return ViSDModel.from_pretrained(model_dir)


@pytest.fixture(scope="session")
def real_case(model):
    """The abdomen CT preprocessed with its TotalSegmentator labels."""
    from visd.data import load_case

    return load_case(CT, SEG, model.config)


@pytest.fixture(scope="session")
def reference(model, real_case):
    """The model's own zero-shot result on the preprocessed case: the oracle of the pipeline."""
    return model.zero_shot_classify(real_case.image, real_case.mask)
