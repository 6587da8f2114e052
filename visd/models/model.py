"""ViSDModel: the anatomy-aware CT vision-language model with its CLIP-style API."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from visd.config import ViSDConfig
from visd.errors import InputError, did_you_mean
from visd.models.image_path import ImagePath, OrganTokens, image_path
from visd.models.inputs import as_image_and_mask, check_window_shape
from visd.models.normality import NormalityModel, NormalityOutput
from visd.models.numerics import Numerics
from visd.models.outputs import OrganDetail, OrganEmbeddings, ViSDOutput, ZeroShotResult
from visd.models.pooling import OrganPooling
from visd.models.text import TextTower
from visd.models.vision import TOKEN_MULTIPLE, VisionEncoder, organ_token_flags
from visd.models.windows import STATUSES, window_status

__all__ = ["ViSDModel"]

logger = logging.getLogger(__name__)

# runtime options of earlier releases, and what replaced them
_RETIRED_OPTIONS = {
    "official_numerics": "use model.set_numerics('official') or model.set_numerics('fused')",
    "autocast_dtype": "use model.set_numerics('fused', autocast=torch.bfloat16)",
    "channels_last": "use model.set_numerics('fused', channels_last=...)",
    "window_batch_size": "pass window_batch_size= to visd.inference.encode_volume / zero_shot_classify",
}


class ViSDModel(nn.Module):
    """ViSD-Boost: per-organ CT embeddings sharpened by a normality model, and a BERT text tower.

    Load one with :meth:`from_pretrained` (a folder or Hub repo) or :meth:`from_official` (the
    authors' ``.pth`` release). Inputs are preprocessed volumes, see ``docs/ct_conventions.md``:
    ``image`` ``(D, H, W)`` float in [0, 1], ``organ_mask`` ``(D, H, W)`` integer labels where organ
    ``config.organs[i]`` has value ``i + 1``.

    The image path computes with the numerics of :meth:`set_numerics` (default: fused, exact
    algebra with less work). The per-volume procedure and zero-shot scoring live in
    :mod:`visd.inference`; :meth:`encode_image` and :meth:`zero_shot_classify` delegate to it.
    """

    def __init__(self, config: ViSDConfig, tokenizer: Any = None) -> None:
        super().__init__()
        self.config = config
        self.vision = VisionEncoder(config.vision)
        self.normality = NormalityModel(config.embed_dim, config.normality)
        self.pooling = OrganPooling(len(config.organs), config.embed_dim, config.attention_heads)
        self.text = TextTower(config.text, config.embed_dim)
        self.temperature = nn.Parameter(torch.tensor(config.temperature))
        self.tokenizer = tokenizer
        self.set_numerics(Numerics())

    # -- bookkeeping ------------------------------------------------------------------------
    def __setattr__(self, name: str, value: Any) -> None:
        if name in _RETIRED_OPTIONS:  # a silently ignored attribute would run other numerics than asked
            raise AttributeError(f"ViSDModel.{name} is gone: {_RETIRED_OPTIONS[name]} (see docs/performance.md)")
        super().__setattr__(name, value)

    @property
    def organs(self) -> tuple[str, ...]:
        return self.config.organs

    @property
    def device(self) -> torch.device:
        return self.temperature.device

    @property
    def image_path(self) -> ImagePath:
        """The algebra the numerics chose (:mod:`visd.models.image_path`); the training stages read organ
        tokens through it."""
        return self._image_path

    @property
    def numerics(self) -> Numerics:
        """The image path's numerics (see :meth:`set_numerics`)."""
        return self._image_path.numerics

    def set_numerics(
        self, mode: str | Numerics = "fused", *, autocast: torch.dtype | None = None, channels_last: bool = True
    ) -> Numerics:
        """Choose how the image path computes, for inference and training; returns the previous numerics.

        Args:
            mode: ``"fused"`` (default: exact algebra with less work, float rounding only, about
                1e-6 on probabilities) or ``"official"`` (the authors' operation order, bit for bit
                on the same CPU kind, slower and heavier), or a :class:`~visd.models.numerics.Numerics`
                (e.g. the one an earlier call returned, to restore it).
            autocast: ``torch.bfloat16`` (or ``torch.float16``) runs the fused backbone under
                autocast: faster where the hardware has it, about 1e-2 on probabilities.
            channels_last: the fused backbone in channels-last 3D (inference: its residual stages;
                training: all of it).
        """
        numerics = mode if isinstance(mode, Numerics) else Numerics(mode, autocast, channels_last)
        previous = getattr(self, "_image_path", None)
        self._image_path = image_path(numerics)
        return previous.numerics if previous is not None else numerics

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the backbone's four stages in the backward pass (less memory, one more forward).

        Outputs and gradients are unchanged; the state dict is unchanged. With BatchNorm in train
        mode, the recomputation updates the running statistics a second time (as in timm).
        """
        self.vision.backbone.grad_checkpointing = enable

    def organ_index(self, organ: str) -> int:
        if organ not in self.organs:
            raise InputError(
                f"unknown organ {organ!r}; this model has organs {list(self.organs)}.{did_you_mean(organ, self.organs)}"
            )
        return self.organs.index(organ)

    # -- text ---------------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str], padding: str = "longest") -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask ``(N, L)`` for ``texts``.

        ``padding="longest"`` pads to the longest text; ``"max_length"`` to ``config.text.max_length``
        as the official code does (identical embeddings up to ~1e-7, much slower).
        """
        if self.tokenizer is None:
            raise InputError(
                "this model has no tokenizer; load it with ViSDModel.from_pretrained or pass tokenizer= "
                "(visd.models.text.load_tokenizer(folder, config.text))"
            )
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise InputError(f"texts must be a list of strings, got {type(texts).__name__}: {texts!r:.80}")
        enc = self.tokenizer(
            list(texts), padding=padding, truncation=True, max_length=self.config.text.max_length, return_tensors="pt"
        )
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    def encode_text(self, texts: Sequence[str], normalize: bool = True, *, padding: str = "longest") -> torch.Tensor:
        """Text embeddings ``(N, E)`` (L2-normalised when ``normalize``)."""
        ids, mask = self.tokenize(texts, padding=padding)
        out = self.text(ids, mask)
        return F.normalize(out, dim=-1) if normalize else out

    # -- image: the per-organ computation ----------------------------------------------------------
    def _embed_organs(
        self, levels: list[torch.Tensor], flags: list[torch.Tensor], items: Sequence[tuple[int, int]]
    ) -> tuple[torch.Tensor, list[OrganTokens], list[NormalityOutput], list[torch.Tensor]]:
        """Unnormalised embeddings ``(N, E)`` of the (window, organ) ``items``, with the tokens,
        normality outputs and attention outputs behind them; one normality call for all items."""
        path = self._image_path
        tokens = path.organ_tokens(self.vision, levels, flags, list(items))
        organs = [o for _, o in items]
        normal = self.normality([t.level4 for t in tokens], organs, fused_attention=path.fused_attention)
        attention = [path.attend(self.pooling, t, n.reconstruction, o) for t, n, o in zip(tokens, normal, organs)]
        rows = [self.pooling.project[o](a) for a, o in zip(attention, organs)]
        proj = torch.stack(rows) if rows else self.temperature.new_zeros((0, self.config.embed_dim))
        return proj, tokens, normal, attention

    @torch.no_grad()
    def embed_windows(
        self,
        images: torch.Tensor,
        masks: torch.Tensor,
        organs: Sequence[int] | None = None,
        *,
        targets: Sequence[int | None] | None = None,
        whole_organ_sizes: Sequence[int | None] | None = None,
        normalize: bool = True,
    ) -> list[OrganEmbeddings]:
        """Embeddings of organs in a batch of equal-shape windows, with the official exclusion rules.

        No input checks (see :meth:`encode_window` for one checked window).

        Args:
            images: ``(B, 1, D, H, W)`` preprocessed windows, each axis a multiple of (16, 32, 32).
            masks: ``(B, D, H, W)`` organ labels of the windows.
            organs: organ indices to embed in every window (default: all).
            targets: per window, the organ it was cut for (only required to be present), or None.
            whole_organ_sizes: per organ of the model, its voxel count in the whole volume (None: no
                fraction rule for it), see :func:`visd.models.windows.window_status`.

        Returns:
            One :class:`OrganEmbeddings` per window, rows in the order of ``organs``.
        """
        indices = list(range(len(self.organs))) if organs is None else list(organs)
        names = tuple(self.organs[o] for o in indices)
        status = window_status(
            masks, len(self.organs), targets=targets, whole_sizes=whole_organ_sizes,
            min_fraction=self.config.min_organ_fraction,
        )
        levels = self._image_path.levels(self.vision, images.to(self.temperature.dtype))
        flags = organ_token_flags(masks, len(self.organs))
        items = [(b, o) for b in range(images.shape[0]) for o in indices if int(status[b, o]) == 0]
        proj, tokens, normal, attention = self._embed_organs(levels, flags, items)
        grid = tuple(n // s for n, s in zip(masks.shape[-3:], TOKEN_MULTIPLE))
        out = []
        for b in range(images.shape[0]):
            emb = torch.full((len(names), self.config.embed_dim), float("nan"), device=self.device, dtype=proj.dtype)
            details: dict[str, OrganDetail] = {}
            for (bi, o), p, t, n, a in zip(items, proj, tokens, normal, attention):
                if bi != b:
                    continue
                emb[indices.index(o)] = F.normalize(p, dim=-1) if normalize else p
                details[self.organs[o]] = OrganDetail(
                    level4_index=torch.nonzero(flags[3][b, o]).flatten(),
                    level4_grid=grid,
                    codes=n.codes,
                    deviation=(t.level4 - n.reconstruction).norm(dim=-1),
                    decoded=n.decoded,
                    attention_output=a,
                    projection=p,
                )
            codes = {name: STATUSES[int(status[b, o])] for name, o in zip(names, indices)}
            out.append(OrganEmbeddings(names, emb, codes, details))
        return out

    @torch.no_grad()
    def encode_window(
        self,
        image: Any,
        organ_mask: Any,
        *,
        organs: Sequence[str] | None = None,
        target: str | None = None,
        whole_organ_sizes: Mapping[str, int] | None = None,
        normalize: bool = True,
    ) -> OrganEmbeddings:
        """Embeddings of the organs in one window, with the official exclusion rules.

        An organ other than ``target`` is not scored when it touches the window border (a voxel at
        index 0, 1, n-2 or n-1 of an axis) or when less than ``config.min_organ_fraction`` of its
        ``whole_organ_sizes`` voxels lie in the window.

        Args:
            image: ``(D, H, W)`` preprocessed window, each axis a multiple of (16, 32, 32).
            organ_mask: ``(D, H, W)`` organ labels of the window.
            organs: organs to embed (default: all of the model's).
        """
        img, mask = as_image_and_mask(image, organ_mask, num_organs=len(self.organs), device=self.device)
        check_window_shape(img.shape)
        names = tuple(organs) if organs is not None else self.organs
        indices = [self.organ_index(n) for n in names]
        target_index = self.organ_index(target) if target is not None else None
        sizes = dict(whole_organ_sizes or {})
        whole = [sizes.get(name) for name in self.organs]
        return self.embed_windows(
            img[None, None], mask[None], indices, targets=[target_index], whole_organ_sizes=whole, normalize=normalize
        )[0]

    @torch.no_grad()
    def encode_image(
        self, image: Any, organ_mask: Any, organs: Sequence[str] | None = None, normalize: bool = True
    ) -> OrganEmbeddings:
        """Per-organ embeddings of a preprocessed volume, by the official per-volume procedure
        (:func:`visd.inference.encode_volume`).

        Each present organ gets one window centred on it (at least the model's ROI), holding only
        that organ; absent organs get a NaN row and status ``"organ_absent"``.

        Args:
            image: ``(D, H, W)`` or ``(1, D, H, W)`` preprocessed volume, values in [0, 1].
            organ_mask: same shape, organ labels (``config.organs[i]`` has value ``i + 1``).
            organs: organs to embed (default: all).
            normalize: L2-normalise the embeddings.
        """
        from visd.inference import encode_volume

        return encode_volume(self, image, organ_mask, organs=organs, normalize=normalize)

    # -- zero-shot ------------------------------------------------------------------------------
    def prompt_embeddings(self, findings: Sequence[Any]) -> torch.Tensor:
        """``(F, 2, E)`` normalised [negative, positive] text embeddings of ``FindingSpec`` s
        (:func:`visd.inference.prompt_embeddings`; cached while the text tower's weights are unchanged)."""
        from visd.inference import prompt_embeddings

        return prompt_embeddings(self, findings)

    @torch.no_grad()
    def zero_shot_classify(self, image: Any, organ_mask: Any, findings: Sequence[Any] | None = None) -> ZeroShotResult:
        """Zero-shot diagnosis of a preprocessed volume, by the official per-volume procedure
        (:func:`visd.inference.zero_shot_classify`).

        Args:
            image: ``(D, H, W)`` or ``(1, D, H, W)`` preprocessed volume, values in [0, 1].
            organ_mask: same shape, organ labels (``config.organs[i]`` has value ``i + 1``).
            findings: ``FindingSpec`` s, dicts or ``(organ, name, negative, positive)`` tuples
                (prompts a string or a list of phrasings); default: the model's catalogue.

        Returns:
            Per finding, the organ and the positive-class probability (NaN with the reason when the
            organ was not scored).
        """
        from visd.inference import zero_shot_classify

        return zero_shot_classify(self, image, organ_mask, findings)

    # -- training -------------------------------------------------------------------------------
    def forward(
        self,
        image: torch.Tensor,
        organ_mask: torch.Tensor,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> ViSDOutput:
        """Training forward pass over a batch of crops, with the numerics of :meth:`set_numerics`.

        Organs count by :func:`visd.models.windows.window_status` (present, not touching the crop
        border); the normality model is called once for all of them.

        Args:
            image: ``(B, 1, D, H, W)`` float crops, each axis a multiple of (16, 32, 32).
            organ_mask: ``(B, 1, D, H, W)`` or ``(B, D, H, W)`` organ labels.
            input_ids, attention_mask: ``(N, L)`` tokenised texts (see :meth:`tokenize`), optional.
        """
        if image.dim() != 5:
            raise InputError(f"image must be (B, 1, D, H, W), got {tuple(image.shape)}")
        mask = organ_mask[:, 0] if organ_mask.dim() == 5 else organ_mask
        check_window_shape(image.shape[-3:])
        n_org = len(self.organs)
        status = window_status(mask, n_org)
        levels = self._image_path.levels(self.vision, image)
        flags = organ_token_flags(mask, n_org)
        items = [(int(b), int(o)) for b, o in torch.nonzero(status == 0).tolist()]
        proj, _, _, _ = self._embed_organs(levels, flags, items)
        embeddings = image.new_zeros(image.shape[0], n_org, self.config.embed_dim, dtype=proj.dtype)
        if items:
            rows = torch.tensor(items, device=image.device)
            embeddings = embeddings.index_put((rows[:, 0], rows[:, 1]), F.normalize(proj, dim=-1))
        text = None
        if input_ids is not None:
            text = F.normalize(self.text(input_ids, attention_mask), dim=-1)
        return ViSDOutput(
            organ_embeddings=embeddings, organ_status=status, text_embeddings=text, temperature=self.temperature
        )

    # -- weights ------------------------------------------------------------------------------
    def save_pretrained(self, folder: str | Path) -> Path:
        """Write ``config.json``, ``model.safetensors``, tokenizer files and a model card to ``folder``."""
        from visd.hub import save_pretrained

        return save_pretrained(self, folder)

    @classmethod
    def from_pretrained(
        cls,
        source: str | Path,
        *,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool = False,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> "ViSDModel":
        """Load a model in eval mode from a local folder, a registered name or a Hub repo id (``org/name``).

        An existing folder wins over a registered name (:func:`visd.list_pretrained`, e.g.
        ``"visd-boost-ctrate"``), which is downloaded, verified and converted once into the visd cache
        (``cache_dir`` then names the visd cache root; see :func:`visd.pretrained.fetch_pretrained`); any
        other ``org/name`` is a Hugging Face Hub repo (``cache_dir``: the HF cache).
        """
        from visd.hub import from_pretrained

        return from_pretrained(
            cls,
            source,
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            device=device,
            dtype=dtype,
        )

    @classmethod
    def from_official(
        cls, checkpoints: Sequence[str | Path], text_encoder: str | Path, *, config: ViSDConfig | None = None
    ) -> "ViSDModel":
        """Load the authors' release: ``[checkpoint_vqvae.pth, checkpoint.pth]`` and the CXR-BERT folder."""
        from visd.hub import load_state_dict_strict
        from visd.models.official import convert_official_release

        config, state, tokenizer = convert_official_release(checkpoints, text_encoder, config=config)
        model = cls(config, tokenizer=tokenizer)
        load_state_dict_strict(model, state, source=", ".join(map(str, checkpoints)))
        return model.eval()

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> str:
        """Upload the :meth:`save_pretrained` folder to a Hub repository; returns the commit URL."""
        from visd.hub import push_to_hub

        return push_to_hub(self, repo_id, **kwargs)
