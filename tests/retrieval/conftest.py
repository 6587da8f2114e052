"""Shared fixtures of the retrieval tests: one tiny model folder and an index of the real scans."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import DATA, make_tiny_model

CT = DATA / "abdomen_3mm.nii.gz"
SEG = DATA / "abdomen_3mm_totalseg.nii.gz"
CT_LPS = DATA / "ct_lps.nii.gz"
SEG_LPS = DATA / "totalseg_lps.nii.gz"


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    return make_tiny_model(seed=0).save_pretrained(tmp_path_factory.mktemp("models") / "visd-tiny")


@pytest.fixture(scope="session")
def model(model_dir):
    from visd import ViSDModel

    return ViSDModel.from_pretrained(model_dir)


def synthetic_embeddings(n: int, organs, dim: int, seed: int = 0) -> np.ndarray:
    """(n, organs, dim) random directions, a few organs not scored (NaN rows)."""
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((n, len(organs), dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=2, keepdims=True)
    emb[rng.random((n, len(organs))) < 0.2] = np.nan
    return emb
