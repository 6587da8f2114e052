"""The two algebras of the image path behind one interface, chosen by :class:`~visd.models.numerics.Numerics`.

Both compute the same function from the same weights:

* :class:`OfficialPath`, the authors' operation order: every token projected, the hybrid tokens
  materialised and fused, the organ query attending over them with ``nn.MultiheadAttention``;
* :class:`FusedPath`, exact algebra with less work: BatchNorm folded and the backbone run with reused
  memory (inference) or channels-last (training) (:mod:`visd.models.fused`), organ tokens gathered
  from the backbone maps and projected only where needed, the fusion folded and the single-query
  attention in O(n d) (:mod:`visd.models.fused_pooling`).

Each path gives the window's level features (:meth:`levels`), one organ's tokens
(:meth:`organ_tokens`) and its attention output (:meth:`attend`); :class:`visd.ViSDModel` runs the
per-organ computation on top of them, the same for inference and training.
"""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass

import torch
from torch import nn

from visd.models.fused import FoldedBackbone, channels_last_features, cpu_autocast_dtype, inplace_convolutions
from visd.models.fused_pooling import FoldedQuery, SharedPart, fold_query, organ_features, pool_organ, project
from visd.models.numerics import Numerics
from visd.models.pooling import OrganPooling
from visd.models.vision import VisionEncoder

__all__ = ["FusedPath", "ImagePath", "OfficialPath", "OrganTokens", "image_path", "weights_fingerprint"]


@dataclass
class OrganTokens:
    """One organ's tokens in one window.

    Attributes:
        shared: the level 1-3 tokens (whose two hybrid halves are equal) as parts ``(x, proj)``:
            ``x`` backbone features ``(n, C)`` with the 1x1x1 ``proj`` that makes them tokens, or
            already projected tokens ``(n, E)`` with ``proj=None``.
        level4: ``(n4, E)`` the level-4 tokens, the normality model's input.
    """

    shared: list[SharedPart]
    level4: torch.Tensor


class ImagePath:
    """The interface (see the module docstring)."""

    #: run the normality model's attention through ``scaled_dot_product_attention``
    fused_attention = False

    def __init__(self, numerics: Numerics) -> None:
        self.numerics = numerics

    def levels(self, vision: VisionEncoder, images: torch.Tensor) -> list[torch.Tensor]:
        raise NotImplementedError

    def organ_tokens(self, vision: VisionEncoder, levels, flags, items: list[tuple[int, int]]) -> list[OrganTokens]:
        """The tokens of each ``(window, organ)`` of ``items``."""
        raise NotImplementedError

    def attend(self, pooling: OrganPooling, tokens: OrganTokens, normal4: torch.Tensor, o: int) -> torch.Tensor:
        raise NotImplementedError


class OfficialPath(ImagePath):
    """The authors' operation order; levels are projected tokens ``(B, L_k, E)``."""

    def levels(self, vision, images):
        return vision(images)

    def organ_tokens(self, vision, levels, flags, items):
        out = []
        for b, o in items:
            keys = [lv[b][fl[b, o]] for lv, fl in zip(levels, flags)]
            out.append(OrganTokens([(torch.cat(keys[:3], 0), None)], keys[3]))
        return out

    def attend(self, pooling, tokens, normal4, o):
        other = tokens.shared[0][0]
        return pooling.attend(torch.cat([other, tokens.level4], 0), torch.cat([other, normal4], 0), o)


def weights_fingerprint(*modules: nn.Module) -> tuple:
    """Changes whenever a parameter or buffer of ``modules`` is replaced, modified in place or cast
    (data pointer, autograd version counter, dtype): the key of anything computed from the weights."""
    tensors = itertools.chain.from_iterable(itertools.chain(m.parameters(), m.buffers()) for m in modules)
    return tuple((t.data_ptr(), t._version, t.dtype) for t in tensors)


class FusedPath(ImagePath):
    """Exact algebra with less work; levels are backbone maps ``(B, C_k, d, h, w)``.

    Without gradients and in eval mode the backbone runs folded (:class:`FoldedBackbone`) and the
    organs' folded queries are kept; both are rebuilt when the weights change. With gradients or
    in train mode the backbone runs the module's computation (BatchNorm in its mode), in channels-last
    3D unless the numerics say otherwise (:func:`channels_last_features`), and the queries are folded on
    every call, so autograd sees them.
    """

    fused_attention = True

    def __init__(self, numerics: Numerics) -> None:
        super().__init__(numerics)
        self._backbone: tuple[tuple, FoldedBackbone] | None = None
        self._queries: tuple[tuple, dict[int, FoldedQuery]] | None = None

    def _autocast(self, device: torch.device):
        if self.numerics.autocast is None:  # never switch off an autocast the caller entered (training)
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.numerics.autocast)

    def levels(self, vision, images):
        dtype = images.dtype
        if torch.is_grad_enabled() or vision.training:
            with self._autocast(images.device):
                if self.numerics.channels_last:
                    feats = channels_last_features(vision.backbone, images)
                else:
                    feats = vision.backbone(images)
            return [f.to(dtype) for f in feats] if self.numerics.autocast is not None else feats
        with torch.no_grad():
            key = weights_fingerprint(vision.backbone)
            if self._backbone is None or self._backbone[0] != key:
                self._backbone = (key, FoldedBackbone(vision.backbone))
            folded = self._backbone[1]
            if self._native_bf16(images):
                # the folded backbone in bfloat16 throughout, without autocast: it keeps the reused-memory
                # convolutions of float32, which autocast's casts and fresh outputs would cost; the maps
                # stay bfloat16 and only the organs' rows are converted (organ_tokens)
                with torch.autocast("cpu", enabled=False):
                    return folded(images.to(torch.bfloat16), channels_last=True)
            with self._autocast(images.device):
                feats = folded(images, channels_last=self.numerics.channels_last)
        return [f.to(dtype) for f in feats]

    def _native_bf16(self, images: torch.Tensor) -> bool:
        """bf16 asked for, by these numerics or by a CPU autocast the caller entered (a frozen backbone
        in a training stage with ``precision: bf16``), on a CPU whose oneDNN runs the folded backbone
        in bfloat16 (see :func:`fused.inplace_convolutions`)."""
        asked = torch.bfloat16 in (self.numerics.autocast, cpu_autocast_dtype())
        return asked and self.numerics.channels_last and inplace_convolutions(images.device, torch.bfloat16)

    def organ_tokens(self, vision, levels, flags, items):
        projs = vision.projections()
        return [
            OrganTokens(list(zip(feats[:3], projs[:3])), project(projs[3], feats[3]))
            for feats in organ_features(levels, flags, list(items), dtype=vision.proj1.weight.dtype)
        ]

    def attend(self, pooling, tokens, normal4, o):
        return pool_organ(pooling, self._query(pooling, o), tokens.shared, tokens.level4, normal4)

    def _query(self, pooling: OrganPooling, o: int) -> FoldedQuery:
        if torch.is_grad_enabled():
            return fold_query(pooling, o)
        key = weights_fingerprint(pooling)
        if self._queries is None or self._queries[0] != key:
            self._queries = (key, {})
        cache = self._queries[1]
        if o not in cache:
            cache[o] = fold_query(pooling, o)
        return cache[o]


def image_path(numerics: Numerics) -> ImagePath:
    """The path for ``numerics``."""
    return OfficialPath(numerics) if numerics.mode == "official" else FusedPath(numerics)
