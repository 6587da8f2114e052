"""The official per-volume procedure: one organ-centred window per organ, batched through the model.

Like a MONAI inferer, the procedure takes the network as an argument: it cuts the windows
(:func:`visd.inference.windows.organ_window`), groups equal-shape windows into backbone batches and
calls :meth:`visd.ViSDModel.embed_windows` on each batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from visd.inference.windows import OrganWindow, organ_window
from visd.models.inputs import as_image_and_mask
from visd.models.outputs import OrganDetail, OrganEmbeddings
from visd.models.windows import Status

__all__ = ["DEFAULT_WINDOW_BATCH", "encode_volume", "window_batches"]

#: equal-shape organ windows of a volume that share one backbone batch by default
DEFAULT_WINDOW_BATCH = 4


def window_batches(windows: Mapping[str, OrganWindow], batch_size: int) -> list[list[str]]:
    """Organs grouped into backbone batches of equal window shape, at most ``batch_size`` each."""
    by_shape: dict[tuple[int, ...], list[str]] = {}
    for name, w in windows.items():
        by_shape.setdefault(tuple(w.image.shape), []).append(name)
    step = max(1, batch_size)
    return [names[i : i + step] for names in by_shape.values() for i in range(0, len(names), step)]


@torch.no_grad()
def encode_volume(
    model: Any,
    image: Any,
    organ_mask: Any,
    *,
    organs: Sequence[str] | None = None,
    normalize: bool = True,
    window_batch_size: int = DEFAULT_WINDOW_BATCH,
) -> OrganEmbeddings:
    """Per-organ embeddings of a preprocessed volume by the official procedure.

    Each present organ gets one window centred on it (at least the model's ROI,
    ``config.preprocess.roi``), holding only that organ; absent organs get a NaN row and status
    ``"organ_absent"``.

    Args:
        model: a :class:`visd.ViSDModel`.
        image: ``(D, H, W)`` or ``(1, D, H, W)`` preprocessed volume, values in [0, 1].
        organ_mask: same shape, organ labels (``config.organs[i]`` has value ``i + 1``).
        organs: organs to embed (default: all of the model's).
        normalize: L2-normalise the embeddings.
        window_batch_size: how many equal-shape windows share one backbone batch (more uses more
            memory; the result is the same).
    """
    img, mask = as_image_and_mask(image, organ_mask, num_organs=len(model.organs), device=model.device)
    names = tuple(organs) if organs is not None else model.organs
    dtype = model.temperature.dtype  # float32, or float64 for a model in float64 (exact reference runs)
    emb = torch.full((len(names), model.config.embed_dim), float("nan"), device=model.device, dtype=dtype)
    status: dict[str, str] = {name: Status.ABSENT for name in names}
    details: dict[str, OrganDetail] = {}
    windows = {}
    for name in names:
        window = organ_window(img, mask, model.organ_index(name), model.config.preprocess.roi)
        if window is not None:
            windows[name] = window
    for group in window_batches(windows, window_batch_size):
        ws = [windows[n] for n in group]
        outs = model.embed_windows(
            ws[0].image if len(ws) == 1 else torch.cat([w.image for w in ws]),  # no copy for a lone window
            ws[0].mask[:, 0] if len(ws) == 1 else torch.cat([w.mask[:, 0] for w in ws]),
            sorted({w.organ_index for w in ws}),
            targets=[w.organ_index for w in ws],
            normalize=normalize,
        )
        for name, w, out in zip(group, ws, outs):
            emb[names.index(name)] = out[name]
            status[name] = out.status[name]
            details[name] = out.details[name]
            details[name].window_start = w.start
    return OrganEmbeddings(names, emb, status, details)
