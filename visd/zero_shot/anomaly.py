"""Anomaly maps: where the normality model could not reproduce an organ.

The normality VQ-VAE reconstructs each level-4 organ token from a codebook of normal anatomy;
:attr:`OrganDetail.deviation <visd.models.outputs.OrganDetail>` is the L2 distance between each
original and reconstructed token. :func:`anomaly_map` places those distances on the preprocessed
``(D, H, W)`` grid (each level-4 token covers a 16 x 32 x 32 block of its organ's window), restricted
to the organ's own voxels; :func:`write_anomaly_map` maps it onto the input scan's grid and writes a
NIfTI file that overlays the input in any viewer, plus a PNG of a few axial slices, each titled with
the input scan's slice number (:func:`input_slice`), its organ and that organ's finding.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from visd._io import atomic_path
from visd.data import PreprocessedCase, PreprocessGeometry, to_input_grid
from visd.errors import InputError
from visd.models.outputs import OrganEmbeddings
from visd.models.vision import LEVEL_STRIDES

__all__ = ["anomaly_map", "input_slice", "pick_slices", "render_overlay", "write_anomaly_map"]

logger = logging.getLogger(__name__)


def anomaly_map(embeddings: OrganEmbeddings, organ_mask: np.ndarray, organs: Sequence[str]) -> np.ndarray:
    """Per-voxel normality deviation on the preprocessed grid.

    Args:
        embeddings: ``result.embeddings`` of :meth:`ViSDModel.zero_shot_classify` or the output of
            :meth:`ViSDModel.encode_image` (organ windows: ``details[organ].window_start`` set).
        organ_mask: ``(D, H, W)`` organ labels of the preprocessed case (``organs[i]`` -> ``i + 1``).
        organs: the model's organs (``model.organs``), which fix the label values.

    Returns:
        ``(D, H, W)`` float32: at each voxel of a scored organ, the deviation of the level-4 token
        covering it in that organ's window; 0 elsewhere (background, organs not scored, organ voxels
        outside the organ's window).
    """
    mask = np.asarray(organ_mask)
    if mask.ndim != 3:
        raise InputError(f"organ_mask must be a (D, H, W) label map, got shape {mask.shape}.")
    out = np.zeros(mask.shape, dtype=np.float32)
    for name, detail in embeddings.details.items():
        if name not in organs:
            raise InputError(f"organ {name!r} of the embeddings is not one of the model's organs {list(organs)}.")
        organ = mask == organs.index(name) + 1
        grid = tuple(int(n) for n in detail.level4_grid)
        tokens = np.zeros(grid, dtype=np.float32)
        index = detail.level4_index.cpu().numpy()
        deviation = detail.deviation.detach().float().cpu().numpy()
        if index.shape != deviation.shape:
            raise InputError(f"organ {name!r}: {index.shape} token indices but {deviation.shape} deviations.")
        tokens.reshape(-1)[index] = deviation
        blocks = tokens
        for axis, stride in enumerate(LEVEL_STRIDES[-1]):  # level-4 token stride (16, 32, 32)
            blocks = np.repeat(blocks, stride, axis=axis)
        start = tuple(int(s) for s in (detail.window_start or (0, 0, 0)))
        # The window is padded at its end to the token multiple: clip the blocks to the volume.
        dst = tuple(slice(s, min(s + n, m)) for s, n, m in zip(start, blocks.shape, mask.shape))
        src = tuple(slice(0, d.stop - d.start) for d in dst)
        placed = np.zeros(mask.shape, dtype=np.float32)
        placed[dst] = blocks[src]
        out[organ] = placed[organ]
    return out


def pick_slices(volume: np.ndarray, n: int = 3, organ_mask: np.ndarray | None = None) -> list[int]:
    """``n`` axial (D) slice indices through the highest values of ``volume``, spread apart, ascending.

    With ``organ_mask``, first the slice of each organ's highest value (organs in order of that
    value), so every scored organ is shown; then non-zero slices greedily by their maximum (then
    their sum), each at least ``D // (2 n)`` slices from those taken; when fewer qualify, the next best.
    """
    volume = np.asarray(volume)
    depth = volume.shape[0]
    if depth <= n:
        return list(range(depth))
    chosen: list[int] = []
    if organ_mask is not None:
        peaks = sorted((-value, d) for _, value, d in _organ_peaks(volume, organ_mask))
        chosen = list(dict.fromkeys(d for _, d in peaks))[:n]
    flat = volume.reshape(depth, -1)
    order = [int(d) for d in np.lexsort((-flat.sum(axis=1), -flat.max(axis=1)))]  # last key is primary
    gap = max(1, depth // (2 * n))
    for d in order:
        if len(chosen) == n or flat[d].max() <= 0:
            break
        if all(abs(d - c) >= gap for c in chosen):
            chosen.append(d)
    for d in order:
        if len(chosen) == n:
            break
        if d not in chosen:
            chosen.append(d)
    return sorted(chosen)


def _organ_peaks(volume: np.ndarray, organ_mask: np.ndarray) -> list[tuple[int, float, int]]:
    """``(label, peak value, slice)`` of each organ whose highest value in ``volume`` is positive.

    The peak is the organ's first voxel (C order) holding its highest value, as ``argmax`` picks it; only
    the organ's own voxels are read (no copy of the volume per organ).
    """
    labels, flat_volume = np.asarray(organ_mask).reshape(-1), np.asarray(volume).reshape(-1)
    plane = int(np.prod(np.shape(volume)[1:]))
    peaks = []
    for label in np.unique(labels[labels != 0]):
        where = np.flatnonzero(labels == label)  # ascending: the first voxel of the peak, as argmax
        values = flat_volume[where]
        k = int(np.argmax(values))
        if float(values[k]) > 0:
            peaks.append((int(label), float(values[k]), int(where[k]) // plane))
    return peaks


def input_slice(geometry: PreprocessGeometry, d: int) -> tuple[int, int]:
    """The input scan's slice shown at axial slice ``d`` of the final grid: ``(array axis, index)``.

    The final grid's D axis runs inferior to superior along one axis of the stored array (axis 2 for
    axial scans); the index undoes the pad, the crop, the resize (the centre of the resized slice,
    ``align_corners=False``) and the reorientation's flip. 0-based, as nibabel and numpy count.
    """
    (before, _), start = geometry.pad[0], geometry.crop_start[0]
    resized = int(d) - before + start  # index along the reoriented, resized superior axis
    n_resized, n_oriented = geometry.resized_shape[2], geometry.reorientation.target_shape[2]
    oriented = int(np.floor((resized + 0.5) * n_oriented / n_resized))  # the input voxel holding the centre
    oriented = min(max(oriented, 0), n_oriented - 1)
    transform = geometry.reorientation.transform
    axis = int(np.flatnonzero(transform[:, 0].astype(int) == 2)[0])
    flipped = transform[axis, 1] < 0
    return axis, (geometry.input_shape[axis] - 1 - oriented) if flipped else oriented


def _inner(shape: Sequence[int], geometry: PreprocessGeometry | None) -> tuple[slice, slice, slice]:
    """The final grid without its padding (the whole grid without a geometry)."""
    if geometry is None:
        return tuple(slice(0, int(n)) for n in shape)  # type: ignore[return-value]
    return tuple(slice(b, int(n) - a) for (b, a), n in zip(geometry.pad, shape))  # type: ignore[return-value]


def _panel_title(
    d: int, amap: np.ndarray, labels: np.ndarray | None, organs: Sequence[str],
    geometry: PreprocessGeometry, scores: Mapping[str, tuple[str, float]], peak_of: Mapping[int, int],
) -> str:
    """Where final-grid slice ``d`` is in the input scan, the organ of its peak deviation, that organ's finding.

    ``amap`` and ``labels`` are the ``(H, W)`` slice. The organ is the one whose peak slice this is
    (``peak_of``: slice -> label), else the one of the slice's highest value.
    """
    peak = float(amap.max())
    organ = ""
    if labels is not None and peak > 0:
        label = peak_of.get(d) or int(labels.reshape(-1)[int(np.argmax(amap))])
        organ = organs[label - 1] if 0 < label <= len(organs) else f"label {label}"
        peak = float(amap[labels == label].max())
    axis, k = input_slice(geometry, d)
    where = f"input slice {k} of {geometry.input_shape[axis]}" + ("" if axis == 2 else f" (array axis {axis})")
    lines = [f"{organ}: {where}" if organ else where, f"deviation max {peak:.3g}"]
    if organ in scores:
        finding, probability = scores[organ]
        lines[1] += f"; {finding} {probability:.2f}"
    return "\n".join(lines)


def render_overlay(
    image: np.ndarray,
    amap: np.ndarray,
    organ_mask: np.ndarray | None = None,
    *,
    organs: Sequence[str] = (),
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    hu_window: Sequence[float] | None = None,
    title: str = "",
    n_slices: int = 3,
    geometry: PreprocessGeometry | None = None,
    scores: Mapping[str, tuple[str, float]] | None = None,
):
    """A matplotlib ``Figure`` of ``n_slices`` axial slices: the CT in grey, the map in colour.

    Args:
        image: ``(D, H, W)`` preprocessed image in [0, 1] (the HU window), LPS: rows run anterior to
            posterior, columns patient right to left (radiological view).
        amap: ``(D, H, W)`` anomaly map (:func:`anomaly_map`); zeros are transparent.
        organ_mask: ``(D, H, W)`` organ labels, drawn as outlines (``organs[i]`` -> ``i + 1``).
        organs: organ names, for the outline legend and the panel titles.
        spacing: ``(D, H, W)`` voxel size in mm, for the pixel aspect ratio.
        hu_window: the HU window the image was scaled with, for the caption.
        title: figure title (e.g. the scan id).
        n_slices: how many slices (through the highest deviations, :func:`pick_slices`).
        geometry: the case's :class:`~visd.data.PreprocessGeometry`. With it the padding is cut off and
            each panel names the input scan's slice (:func:`input_slice`), so a viewer finds it;
            without it, panels name the slice of the preprocessed grid.
        scores: per organ, the finding to name in its panels and its probability (e.g. the organ's
            most probable finding).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    image, amap = np.asarray(image), np.asarray(amap, dtype=np.float32)
    inner = _inner(image.shape, geometry)
    image, amap = image[inner], amap[inner]
    organ_mask = None if organ_mask is None else np.asarray(organ_mask)[inner]
    first = inner[0].start  # slice numbers of the final grid
    slices = pick_slices(amap, n_slices, organ_mask)
    peak_of: dict[int, int] = {}  # final-grid slice -> the label whose highest value lies there (the highest wins)
    if organ_mask is not None:
        best: dict[int, float] = {}
        for label, value, d in _organ_peaks(amap, organ_mask):
            if value > best.get(d, 0.0):
                best[d], peak_of[first + d] = value, label
    vmax = float(amap.max()) if float(amap.max()) > 0 else 1.0
    norm, cmap = Normalize(0.0, vmax), "inferno"
    fig = Figure(figsize=(3.6 * len(slices) + 1.2, 4.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(slices), squeeze=False)[0]
    aspect = float(spacing[1]) / float(spacing[2])
    colours = ["#4dd0e1", "#81c784", "#fff176", "#f06292", "#ba68c8", "#ffb74d"]
    drawn: dict[int, str] = {}
    for ax, d in zip(axes, slices):
        ax.imshow(image[d], cmap="gray", vmin=0.0, vmax=1.0, aspect=aspect, interpolation="nearest")
        ax.imshow(np.ma.masked_less_equal(amap[d], 0.0), cmap=cmap, norm=norm, alpha=0.6, aspect=aspect,
                  interpolation="nearest")
        if organ_mask is not None:
            for label in np.unique(organ_mask[d]):
                if label == 0:
                    continue
                colour = colours[(int(label) - 1) % len(colours)]
                ax.contour((organ_mask[d] == label).astype(np.float32), levels=[0.5], colors=[colour], linewidths=0.8)
                drawn[int(label)] = colour
        if geometry is None:
            ax.set_title(f"axial slice {first + d} of {image.shape[0]} (max {float(amap[d].max()):.3g})", fontsize=9)
        else:
            labels = None if organ_mask is None else organ_mask[d]
            ax.set_title(_panel_title(first + d, amap[d], labels, organs, geometry, scores or {}, peak_of), fontsize=9)
        ax.set_axis_off()
    if drawn:
        handles = [
            Line2D([], [], color=c, label=organs[k - 1] if k - 1 < len(organs) else f"label {k}")
            for k, c in sorted(drawn.items())
        ]
        axes[0].legend(handles=handles, loc="lower left", fontsize=7, framealpha=0.6)
    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=list(axes), shrink=0.85,
                 label="deviation from normal anatomy (L2, level-4 tokens)")
    window = f", CT window {tuple(float(v) for v in hu_window)} HU" if hu_window is not None else ""
    numbering = "; slices 0-based as in the input file" if geometry is not None else ""
    fig.suptitle(f"{title} - anomaly map{window}; R on the left{numbering}".strip(" -"), fontsize=10)
    return fig


def write_anomaly_map(
    amap: np.ndarray,
    case: PreprocessedCase,
    out_dir: str | os.PathLike,
    scan: str,
    *,
    organs: Sequence[str] = (),
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    hu_window: Sequence[float] | None = None,
    scores: Mapping[str, tuple[str, float]] | None = None,
) -> tuple[Path, Path]:
    """Write ``<scan>_anomaly.nii.gz`` (on the input scan's grid) and ``<scan>_anomaly.png``, atomically.

    Args:
        amap: ``(D, H, W)`` map on the case's preprocessed grid (:func:`anomaly_map`).
        case: the preprocessed case (its geometry maps the map back to the input grid).
        out_dir: output folder (created when missing).
        scan: scan id, the file name stem.
        organs, spacing, hu_window, scores: passed to :func:`render_overlay`, which cuts off the
            padding and names the input scan's slices (the case's geometry).

    Returns:
        The NIfTI and PNG paths. The NIfTI is float32 with the input scan's shape and affine.
    """
    import nibabel as nib

    out_dir = Path(out_dir)
    volume = to_input_grid(np.asarray(amap, dtype=np.float32), case.geometry, mode="linear")  # float32
    img = nib.Nifti1Image(volume, case.geometry.input_affine)
    img.header.set_qform(case.geometry.input_affine, code=1)
    img.header.set_sform(case.geometry.input_affine, code=1)
    img.header.set_xyzt_units("mm")
    img.header["descrip"] = b"visd anomaly map (normality deviation)"
    nifti = out_dir / f"{scan}_anomaly.nii.gz"
    with atomic_path(nifti) as tmp:
        nib.save(img, tmp)
    fig = render_overlay(
        case.image, amap, case.mask, organs=organs, spacing=spacing, hu_window=hu_window, title=scan,
        geometry=case.geometry, scores=scores,
    )
    png = out_dir / f"{scan}_anomaly.png"
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    logger.info("wrote anomaly map %s and %s", nifti, png)
    return nifti, png
