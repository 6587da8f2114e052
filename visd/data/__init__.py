"""Reading CT scans and organ label maps, and the official preprocessing.

Conventions (axes, orientation, spacing, HU window, organ ids) are in ``docs/ct_conventions.md``::

    from visd.data import load_case
    case = load_case("ct.nii.gz", "totalsegmentator.nii.gz", config)  # case.image, case.mask: (D, H, W)
"""

from visd.data.io import read_ct
from visd.data.masks import read_organ_mask
from visd.data.preprocess import (
    PreprocessedCase,
    PreprocessGeometry,
    load_case,
    preprocess,
    to_input_grid,
)
from visd.data.segment import segment
from visd.data.volume import CTVolume

__all__ = [
    "CTVolume",
    "PreprocessGeometry",
    "PreprocessedCase",
    "load_case",
    "preprocess",
    "read_ct",
    "read_organ_mask",
    "segment",
    "to_input_grid",
]
