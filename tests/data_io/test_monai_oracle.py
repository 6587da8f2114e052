"""MONAI's transforms as an independent oracle of the official preprocessing steps they reproduce.

On the real abdomen scan (stored RAS, so the reorientation is not the identity) MONAI recomputes
every step of :func:`visd.data.preprocess` that it can express: ``Orientation(axcodes="LPS")``,
``Resize`` (trilinear, and torch's legacy ``nearest`` for the labels, as the official
``data/resize.py``), ``ScaleIntensityRange(-1150, 350, 0, 1, clip=True)`` and
``SpatialPad(method="symmetric")``, and the window padding ``DivisiblePad(k=(16, 32, 32),
method="end")`` of the official ``eval.py``. Two steps MONAI does not reproduce are taken from visd and
checked elsewhere against the official output (tests/data_io/test_preprocess_parity.py): the target size
(``Spacing`` rounds differently and has no x/y spacing swap) and the crop box (``generate_spatial_bounding_box``
ends at max + margin + 1, the official crop at max + margin).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from monai.data import MetaTensor  # the oracle: in the "test" extra, a missing MONAI is a failure
from monai.transforms import DivisiblePad, Orientation, Resize, ScaleIntensityRange, SpatialPad

from visd.data import preprocess, read_ct, read_organ_mask
from visd.models.windows import TOKEN_MULTIPLE, pad_to_token_multiple

from ._helpers import data_file

RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))  # nibabel's axis codes, as visd's orientation names


@pytest.fixture(scope="module")
def scan(config):
    ct = read_ct(data_file("abdomen_3mm.nii.gz"))
    mask = read_organ_mask(data_file("abdomen_3mm_totalseg.nii.gz"), ct, config)
    return ct, mask, preprocess(ct, mask, config.preprocess)


def test_monai_reproduces_the_preprocessing(scan, config):
    ct, mask, case = scan
    p, g = config.preprocess, case.geometry
    assert not g.reorientation.is_identity  # the scan is RAS: Orientation really flips axes
    orient = Orientation(axcodes=p.orientation, labels=RAS_LABELS)
    image = orient(MetaTensor(torch.from_numpy(np.asarray(ct.array_hu, dtype=np.float32))[None], affine=ct.affine))
    labels = orient(MetaTensor(torch.from_numpy(mask.astype(np.float32))[None], affine=ct.affine))
    np.testing.assert_allclose(image.affine.numpy(), g.oriented_affine, atol=1e-6)

    image = Resize(g.resized_shape, mode="trilinear")(image)  # the official target size, from visd
    labels = Resize(g.resized_shape, mode="nearest")(labels)
    crop = (slice(None),) + tuple(slice(a, b) for a, b in zip(g.crop_start[::-1], g.crop_stop[::-1]))  # X, Y, Z
    image, labels = image[crop], labels[crop]
    image = ScaleIntensityRange(a_min=p.hu_window[0], a_max=p.hu_window[1], b_min=0.0, b_max=1.0, clip=True)(image)
    roi_xyz = p.roi[::-1]
    image = SpatialPad(roi_xyz, method="symmetric", value=p.pad_value)(image)
    labels = SpatialPad(roi_xyz, method="symmetric")(labels)

    expected_image = np.asarray(image[0]).T  # (X, Y, Z) -> (D, H, W)
    expected_mask = np.asarray(labels[0]).T
    assert case.image.shape == expected_image.shape
    np.testing.assert_array_equal(case.mask, expected_mask.astype(np.uint8))
    # interpolation then windowing, both float32: within a few float32 roundings of the HU values
    np.testing.assert_allclose(case.image, expected_image, rtol=0, atol=4 * np.finfo(np.float32).eps)
    assert 0.05 < float(case.image.mean()) < 0.95 and case.mask.any()  # a real scan, not an empty array


@pytest.mark.parametrize("shape", [(112, 256, 352), (113, 250, 353), (1, 31, 65)])
def test_monai_divisible_pad_matches_the_window_padding(shape):
    x = torch.rand((1, 1) + shape, generator=torch.Generator().manual_seed(sum(shape)))
    expected = DivisiblePad(k=TOKEN_MULTIPLE, method="end")(x[0])
    out = pad_to_token_multiple(x)[0]
    assert tuple(out.shape[1:]) == tuple(-(-n // m) * m for n, m in zip(shape, TOKEN_MULTIPLE))
    torch.testing.assert_close(out, torch.as_tensor(expected), rtol=0, atol=0)
