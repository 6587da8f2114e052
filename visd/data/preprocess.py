"""The official ViSD-Boost / fVLM preprocessing, reproduced exactly, and its approximate inverse.

Steps (``docs/ct_conventions.md`` explains each; the spec is a :class:`~visd.config.PreprocessConfig`):

0. reorient the scan and its organ map to ``config.orientation`` (LPS) by flips/permutations only;
1. spacing = ``abs(diag(affine))`` (column norms for an oblique affine);
2. target size in float64 with ``int()`` truncation, x and y spacings swapped when
   ``config.swap_xy_spacing`` (the official quirk);
3. image: trilinear, ``align_corners=False``, float32; organ map: torch's legacy ``nearest``;
   nothing is interpolated when the size is unchanged;
4. transpose (X, Y, Z) -> (Z, Y, X) = (D, H, W);
5. HU window ``clip((x - lo) / (hi - lo), 0, 1)``;
6. crop to the organ box with ``config.crop_margin`` (exclusive end, as the official script);
7. pad with ``config.pad_value`` to at least ``config.roi``, symmetric, the odd voxel at the end.

:func:`to_input_grid` maps an array on the final grid back onto the input scan's voxel grid.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from visd.config import PreprocessConfig, ViSDConfig
from visd.data.io import CTSource, read_ct
from visd.data.masks import MaskSource, read_organ_mask
from visd.data.orientation import Reorientation, reorientation_to
from visd.data.volume import CTVolume
from visd.errors import InputError

__all__ = [
    "PreprocessGeometry",
    "PreprocessedCase",
    "preprocess",
    "load_case",
    "to_input_grid",
    "source_spacing",
    "target_size",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class PreprocessGeometry:
    """Everything needed to map a voxel of the final (D, H, W) arrays back to the input scan.

    Attributes:
        input_shape: (X, Y, Z) shape of the scan as stored.
        input_affine: (4, 4) RAS+ affine of the scan as stored.
        reorientation: the flips/permutation from the stored order to ``config.orientation`` (LPS).
        oriented_affine: RAS+ affine of the reoriented scan.
        spacing: (x, y, z) mm of the reoriented scan, as used for the resize.
        resized_shape: (X, Y, Z) after the resize (before the transpose).
        crop_start: (D, H, W) first voxel of the crop in the transposed resized grid.
        crop_stop: (D, H, W) exclusive end of the crop.
        pad: ((before, after), ...) per (D, H, W) axis.
        final_shape: (D, H, W) of the final arrays.
    """

    input_shape: tuple[int, int, int]
    input_affine: np.ndarray
    reorientation: Reorientation
    oriented_affine: np.ndarray
    spacing: tuple[float, float, float]
    resized_shape: tuple[int, int, int]
    crop_start: tuple[int, int, int]
    crop_stop: tuple[int, int, int]
    pad: tuple[tuple[int, int], tuple[int, int], tuple[int, int]]
    final_shape: tuple[int, int, int]


@dataclass(frozen=True, eq=False)
class PreprocessedCase:
    """Model input for one scan.

    Attributes:
        image: (D, H, W) float32 in [0, 1] (the HU window), D = slices, LPS, 3 x 1 x 1 mm by default.
        mask: (D, H, W) uint8 organ labels, ``organs[i]`` -> ``i + 1``, 0 = background.
        geometry: how the final grid relates to the input scan (see :func:`to_input_grid`).
    """

    image: np.ndarray
    mask: np.ndarray
    geometry: PreprocessGeometry


def source_spacing(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size (x, y, z) in mm: ``abs(diag(affine))`` as the official script, or the column norms
    when the affine is oblique (then the diagonal is not the voxel size)."""
    lin = np.asarray(affine, dtype=np.float64)[:3, :3]
    off = lin - np.diag(np.diag(lin))
    if np.abs(off).max() <= 1e-6 * np.abs(lin).max():
        return tuple(float(v) for v in np.abs(np.diag(lin)))  # type: ignore[return-value]
    logger.info("oblique affine: spacing taken from the column norms, not abs(diag(affine))")
    return tuple(float(v) for v in np.linalg.norm(lin, axis=0))  # type: ignore[return-value]


def target_size(
    shape: tuple[int, int, int], spacing: tuple[float, float, float], config: PreprocessConfig
) -> tuple[int, int, int]:
    """Resized (X, Y, Z) size, float64 and ``int()`` truncation in the official order of operations."""
    x, y, z = (int(n) for n in shape)
    sx, sy, sz = (float(s) for s in spacing)
    tz, ty, tx = (float(s) for s in config.spacing)  # config spacing is (D, H, W) = (z, y, x)
    if config.swap_xy_spacing:
        sx, sy = sy, sx  # the official resize multiplies X by the y spacing and Y by the x spacing
    size = (int(x * sx / tx), int(y * sy / ty), int(z * (sz / tz)))
    if min(size) < 1:
        raise InputError(
            f"the scan {shape} at spacing {spacing} mm resizes to {size} at {config.spacing} mm (D, H, W). "
            "Expected at least one voxel per axis; the scan is too small or its header spacing is wrong."
        )
    return size


def _upsample(mode: str, src: torch.Tensor, size: list[int], dst: torch.Tensor) -> None:
    """torch's 3D interpolation of ``src`` into ``dst`` (any strides), without scale factors."""
    if mode == "trilinear":
        torch.ops.aten.upsample_trilinear3d.out(src, size, False, None, None, None, out=dst)
    elif mode == "nearest":
        torch.ops.aten.upsample_nearest3d.out(src, size, None, None, None, out=dst)
    else:
        torch.ops.aten._upsample_nearest_exact3d.out(src, size, None, None, None, out=dst)


def _resize_fortran(array: np.ndarray, size: tuple[int, int, int], mode: str, dtype: type) -> np.ndarray:
    """``array`` (X, Y, Z) resized to ``size`` by torch's ``mode`` interpolation, as ``dtype``; Fortran-ordered.

    The interpolation is torch's on the (X, Y, Z) tensor (``align_corners=False`` for trilinear), as
    ``F.interpolate`` computes it: each output voxel is the same expression whatever the memory layout,
    only the axis order matters. Input and output stay Fortran-ordered, the layout NIfTI files store, so
    no step moves the ~100M voxels of a scan in transposed order.
    """
    source = np.asfortranarray(array, dtype=dtype)
    if tuple(source.shape) == tuple(size):
        return source
    out = torch.from_numpy(np.empty(tuple(size)[::-1], dtype=dtype))  # (Z, Y, X) C order = (X, Y, Z) Fortran order
    _upsample(mode, torch.from_numpy(source)[None, None], [int(n) for n in size], out.permute(2, 1, 0)[None, None])
    return out.numpy().T


def _resize_dhw(array: np.ndarray, size: tuple[int, int, int], mode: str) -> np.ndarray:
    """``array`` (X, Y, Z) resized to ``size`` (X, Y, Z), as the C-ordered (Z, Y, X) = (D, H, W) array.

    Images are interpolated as float32, organ maps as uint8 when they are uint8 (``nearest`` only selects).
    """
    dtype = np.uint8 if mode == "nearest" and array.dtype == np.uint8 else np.float32
    return _resize_fortran(array, size, mode, dtype).T


def _box(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """First and last index per axis of the non-zero voxels of ``labels`` (``None`` when there are none)."""
    inside = labels > 0
    if not inside.any():
        return None
    first, last = [], []
    for axis in range(inside.ndim):
        hit = np.flatnonzero(inside.any(axis=tuple(a for a in range(inside.ndim) if a != axis)))
        first.append(hit[0])
        last.append(hit[-1])
    return np.asarray(first), np.asarray(last)


def preprocess(ct: CTVolume, organ_mask: np.ndarray, config: PreprocessConfig) -> PreprocessedCase:
    """Apply the official preprocessing to a CT and its organ label map.

    Args:
        ct: the scan as read (:func:`~visd.data.io.read_ct`), any orientation.
        organ_mask: (X, Y, Z) integer organ ids on the CT's grid (:func:`~visd.data.masks.read_organ_mask`).
        config: the preprocessing spec of the model.

    Returns:
        A :class:`PreprocessedCase` with (D, H, W) image in [0, 1], uint8 mask and the geometry.

    Raises:
        InputError: the mask is not on the CT's grid, or holds no organ voxel (no crop box).
    """
    organ_mask = np.asarray(organ_mask)
    if organ_mask.shape != ct.shape:
        raise InputError(
            f"organ mask and CT differ in shape: mask {organ_mask.shape}, CT {ct.shape}. "
            "Pass the label map that was computed on this CT."
        )
    plan = reorientation_to(ct.affine, ct.shape, config.orientation)
    image = plan.apply(ct.array_hu)
    labels = plan.apply(organ_mask)
    affine = plan.apply_affine(ct.affine)
    spacing = source_spacing(affine)
    size = target_size(plan.target_shape, spacing, config)

    image = _resize_dhw(image, size, "trilinear")  # (D, H, W) from here on
    labels = _resize_dhw(labels, size, "nearest")  # torch's legacy nearest: src = floor(dst * in / out)

    box = _box(labels)
    if box is None:
        raise InputError(
            f"no organ voxels left in {ct.source} after resizing to {size} (X, Y, Z): the organ box is empty. "
            "Expected a mask with organs of this model; the official script would skip this scan silently."
        )
    margin = np.asarray(config.crop_margin)
    start = np.maximum(box[0] - margin, 0)
    stop = np.minimum(box[1] + margin, labels.shape)  # exclusive, as the official script
    crop = tuple(slice(int(a), int(b)) for a, b in zip(start, stop))
    lo, hi = config.hu_window
    image = np.subtract(image[crop], np.float32(lo), dtype=np.float32)  # a new array: the input is never written
    np.divide(image, np.float32(hi - lo), out=image)
    np.clip(image, 0.0, 1.0, out=image)
    labels = labels[crop].astype(np.uint8)

    pad = []
    for n, r in zip(image.shape, config.roi):
        total = max(int(r) - int(n), 0)
        pad.append((total // 2, total - total // 2))
    if any(any(p) for p in pad):
        image = np.pad(image, pad, mode="constant", constant_values=np.float32(config.pad_value))
        labels = np.pad(labels, pad, mode="constant", constant_values=0)

    geometry = PreprocessGeometry(
        input_shape=ct.shape,
        input_affine=ct.affine.copy(),
        reorientation=plan,
        oriented_affine=affine,
        spacing=spacing,
        resized_shape=size,
        crop_start=tuple(int(v) for v in start),  # type: ignore[arg-type]
        crop_stop=tuple(int(v) for v in stop),  # type: ignore[arg-type]
        pad=tuple(pad),  # type: ignore[arg-type]
        final_shape=tuple(int(n) for n in image.shape),  # type: ignore[arg-type]
    )
    logger.debug("preprocessed %s: %s -> %s, crop %s:%s, pad %s", ct.source, ct.shape, size, start, stop, pad)
    return PreprocessedCase(
        image=np.ascontiguousarray(image, dtype=np.float32), mask=np.ascontiguousarray(labels), geometry=geometry
    )


def to_input_grid(
    volume_dhw: np.ndarray, geometry: PreprocessGeometry, mode: Literal["linear", "nearest"] = "linear"
) -> np.ndarray:
    """Map an array on the final (D, H, W) grid back onto the input scan's (X, Y, Z) grid.

    The inverse undoes the pad and the crop exactly (voxels outside the crop become 0), the
    transpose and the reorientation exactly, and the resize approximately: the array is resized
    from ``resized_shape`` back to the scan's shape (trilinear, ``align_corners=False`` for
    ``"linear"``; ``nearest-exact`` for ``"nearest"``, for labels). Because the official sizes are
    truncated with ``int()``, a voxel can be shifted by up to one final-grid voxel; with
    ``"linear"`` values at the crop border blend with the zeros outside.

    Args:
        volume_dhw: (D, H, W) array with the shape of the preprocessed image (e.g. an anomaly map).
        geometry: :attr:`PreprocessedCase.geometry` of that case.
        mode: ``"linear"`` (returns float32) or ``"nearest"`` (keeps the dtype).

    Returns:
        (X, Y, Z) array in the input file's array order, Fortran-ordered in memory as NIfTI stores it;
        save it with ``geometry.input_affine``.
    """
    if mode not in ("linear", "nearest"):
        raise InputError(f"unknown mode {mode!r} for to_input_grid. Expected 'linear' or 'nearest'.")
    volume = np.asarray(volume_dhw)
    if volume.shape != geometry.final_shape:
        raise InputError(
            f"array to map back has shape {volume.shape}, the preprocessed case has {geometry.final_shape} (D, H, W). "
            "Pass an array on the final grid of this case."
        )
    inner = tuple(slice(b, b + (e - s)) for (b, _), s, e in zip(geometry.pad, geometry.crop_start, geometry.crop_stop))
    dtype = volume.dtype if mode == "nearest" else np.float32
    work = np.float64 if mode == "nearest" else np.float32  # float64 keeps integer labels exact
    full = np.zeros(geometry.resized_shape[::-1], dtype=work)  # (D, H, W) before the crop
    full[tuple(slice(s, e) for s, e in zip(geometry.crop_start, geometry.crop_stop))] = volume[inner]
    back = "trilinear" if mode == "linear" else "nearest-exact"
    xyz = _resize_fortran(full.T, geometry.reorientation.target_shape, back, work)  # full.T: (X, Y, Z), Fortran
    return geometry.reorientation.invert(xyz).astype(dtype, order="F", copy=False)


def load_case(
    image: CTSource | CTVolume, mask: MaskSource, config: ViSDConfig, mask_format: str = "auto"
) -> PreprocessedCase:
    """Read a CT and its organ map and preprocess them for ``config``'s model in one call.

    The one read -> organ mask -> preprocess sequence (batch runs use it through
    :func:`visd.zero_shot.loading.load_scan`).

    Args:
        image: anything :func:`~visd.data.io.read_ct` accepts (NIfTI, DICOM folder, nibabel image), or a
            :class:`~visd.data.volume.CTVolume` already read (used as is).
        mask: anything :func:`~visd.data.masks.read_organ_mask` accepts (visd ids or TotalSegmentator).
        config: the model config; its ``preprocess`` spec, ``organs`` and ``totalsegmentator_map`` are used.
        mask_format: ``"auto"``, ``"visd"`` or ``"totalsegmentator"``.
    """
    ct = image if isinstance(image, CTVolume) else read_ct(image)
    organ_mask = read_organ_mask(mask, ct, config, mask_format=mask_format)
    return preprocess(ct, organ_mask, config.preprocess)
