"""fVLM's training augmentation: a random ROI crop (padded when the scan is smaller) and random flips.

Arrays are preprocessed ``(D, H, W)`` volumes (``docs/ct_conventions.md``). Every random choice comes
from the ``numpy.random.Generator`` passed in; :func:`view_rng` derives it from
``(seed, epoch, index, view)``, so a sample's crop does not depend on which process or DataLoader
worker loads it, nor on whether the run was resumed.
"""

from __future__ import annotations

import numpy as np

__all__ = ["view_rng", "pad_to_roi", "random_crop", "random_flip", "augment"]


def view_rng(seed: int, epoch: int, index: int, view: int) -> np.random.Generator:
    """The generator of one augmented view of one sample in one epoch."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(epoch), int(index), int(view)]))


def pad_to_roi(
    image: np.ndarray, mask: np.ndarray, roi: tuple[int, int, int], pad_value: float
) -> tuple[np.ndarray, np.ndarray]:
    """Pad each axis shorter than ``roi`` symmetrically (the odd voxel at the end), as the preprocessing."""
    pads = []
    for n, r in zip(image.shape, roi):
        total = max(r - n, 0)
        pads.append((total // 2, total - total // 2))
    if not any(a or b for a, b in pads):
        return image, mask
    return (
        np.pad(image, pads, mode="constant", constant_values=pad_value),
        np.pad(mask, pads, mode="constant", constant_values=0),
    )


def random_crop(
    image: np.ndarray, mask: np.ndarray, roi: tuple[int, int, int], rng: np.random.Generator, pad_value: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """A ``roi``-sized crop at a uniformly random position (after padding to at least ``roi``)."""
    image, mask = pad_to_roi(image, mask, roi, pad_value)
    starts = [int(rng.integers(0, n - r + 1)) for n, r in zip(image.shape, roi)]
    box = tuple(slice(s, s + r) for s, r in zip(starts, roi))
    return image[box], mask[box]


def random_flip(
    image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, prob: float
) -> tuple[np.ndarray, np.ndarray]:
    """Flip each axis independently with probability ``prob`` (image and mask together)."""
    flips = tuple(axis for axis in range(3) if rng.random() < prob)
    if flips:
        image, mask = np.flip(image, flips), np.flip(mask, flips)
    return image, mask


def augment(
    image: np.ndarray,
    mask: np.ndarray,
    roi: tuple[int, int, int],
    rng: np.random.Generator,
    flip_prob: float = 0.2,
    pad_value: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Random crop to ``roi``, then random flips; returns contiguous copies."""
    image, mask = random_crop(image, mask, roi, rng, pad_value)
    image, mask = random_flip(image, mask, rng, flip_prob)
    return np.ascontiguousarray(image), np.ascontiguousarray(mask)
