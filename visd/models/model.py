"""ViSDModel: the anatomy-aware CT vision-language model with its CLIP-style API."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from visd.config import FindingSpec, ViSDConfig
from visd.errors import InputError, did_you_mean
from visd.models.fast import backbone_features, organ_features, pool_organ, project
from visd.models.inputs import as_volume, check_window_shape
from visd.models.normality import NormalityModel
from visd.models.outputs import (
    FindingScore,
    OrganDetail,
    OrganEmbeddings,
    ViSDOutput,
    ZeroShotResult,
)
from visd.models.pooling import OrganPooling
from visd.models.text import TextTower
from visd.models.vision import TOKEN_MULTIPLE, VisionEncoder, organ_token_flags
from visd.models.windows import Status, _touches_border, exclusion_reason, organ_window
from visd.zero_shot.findings import FindingLike, as_findings

__all__ = ["ViSDModel"]

logger = logging.getLogger(__name__)


class ViSDModel(nn.Module):
    """ViSD-Boost: per-organ CT embeddings sharpened by a normality model, and a BERT text tower.

    Load one with :meth:`from_pretrained` (a folder or Hub repo) or :meth:`from_official` (the
    authors' ``.pth`` release). Inputs are preprocessed volumes, see ``docs/ct_conventions.md``:
    ``image`` ``(D, H, W)`` float in [0, 1], ``organ_mask`` ``(D, H, W)`` integer labels where organ
    ``config.organs[i]`` has value ``i + 1``.
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
        self._prompt_cache: dict[tuple[str, ...], torch.Tensor] = {}
        #: Inference numerics. False (default): the fast path of :mod:`visd.models.fast`, equal to
        #: the official computation up to float rounding (~1e-6). True: the official operation
        #: order, bit-exact with the authors' code, slower and heavier.
        self.official_numerics = False
        #: Fast-path options (see ``docs/performance.md``): autocast dtype for the backbone (e.g.
        #: ``torch.bfloat16``), channels-last 3D memory format, and how many equal-shape windows of a
        #: volume share one backbone batch (more uses more memory).
        self.autocast_dtype: torch.dtype | None = None
        self.channels_last = True
        self.window_batch_size = 4

    # -- bookkeeping ------------------------------------------------------------------------
    @property
    def organs(self) -> tuple[str, ...]:
        return self.config.organs

    @property
    def device(self) -> torch.device:
        return self.temperature.device

    def train(self, mode: bool = True) -> "ViSDModel":
        self._prompt_cache.clear()
        return super().train(mode)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        self._prompt_cache.clear()
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

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

    # -- image --------------------------------------------------------------------------------
    def _volume(self, x: Any, name: str, *, is_mask: bool) -> torch.Tensor:
        return as_volume(x, name, num_organs=len(self.organs) if is_mask else None, device=self.device)

    def _organ_embedding(
        self, shared: list[tuple[torch.Tensor, Any]], roi: torch.Tensor, o: int, *, fast: bool
    ) -> tuple[torch.Tensor, OrganDetail, Any]:
        """Embedding (unnormalised) of organ ``o``.

        Args:
            shared: the organ's level 1-3 tokens as ``(x, proj)`` parts (see :func:`fast.pool_organ`);
                the plain path takes one part of projected tokens, ``(tokens, None)``.
            roi: ``(n4, E)`` the organ's level-4 tokens.
        """
        normality = self.normality(roi, o, fused_attention=fast)
        if fast:
            attn = pool_organ(self.pooling, shared, roi, normality.reconstruction, o)
        else:
            other = torch.cat([x for x, _ in shared], 0)
            original = torch.cat([other, roi], 0)
            normal = torch.cat([other, normality.reconstruction], 0)
            attn = self.pooling.attend(original, normal, o)
        proj = self.pooling.project[o](attn)
        detail = OrganDetail(
            level4_index=torch.zeros(0, dtype=torch.int64),
            level4_grid=(0, 0, 0),
            codes=normality.codes,
            deviation=(roi - normality.reconstruction).norm(dim=-1).detach(),
            decoded=normality.decoded.detach(),
            attention_output=attn.detach(),
            projection=proj.detach(),
        )
        return proj, detail, normality

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
        img, mask = self._volume(image, "image", is_mask=False), self._volume(organ_mask, "organ_mask", is_mask=True)
        if img.shape != mask.shape:
            raise InputError(f"image and organ_mask differ in shape: image {tuple(img.shape)}, mask {tuple(mask.shape)}")
        check_window_shape(img.shape)
        names = tuple(organs) if organs is not None else self.organs
        target_index = self.organ_index(target) if target is not None else None
        levels, flags = self._window_levels(img[None, None], mask[None])
        return self._window_organs(levels, flags, mask, 0, names, target_index, dict(whole_organ_sizes or {}), normalize)

    def _window_levels(self, images: torch.Tensor, masks: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Level features (fast path: backbone maps; plain path: projected tokens) and organ flags."""
        x = images.to(self.temperature.dtype)
        flags = organ_token_flags(masks, len(self.organs))
        if self.official_numerics:
            return self.vision(x), flags
        with torch.autocast(x.device.type, dtype=self.autocast_dtype or torch.bfloat16, enabled=self.autocast_dtype is not None):
            feats = backbone_features(self.vision.backbone, x, channels_last=self.channels_last)
        return [f.to(self.temperature.dtype) for f in feats], flags

    def _window_organs(
        self,
        levels: list[torch.Tensor],
        flags: list[torch.Tensor],
        mask: torch.Tensor,
        b: int,
        names: Sequence[str],
        target_index: int | None,
        whole: Mapping[str, int],
        normalize: bool,
    ) -> OrganEmbeddings:
        """Embeddings of ``names`` in batch item ``b`` of a window batch, with the exclusion rules."""
        grid = tuple(n // s for n, s in zip(mask.shape, TOKEN_MULTIPLE))
        emb = torch.full((len(names), self.config.embed_dim), float("nan"), device=self.device)
        status: dict[str, str] = {}
        details: dict[str, OrganDetail] = {}
        for row, name in enumerate(names):
            o = self.organ_index(name)
            organ = mask == o + 1
            if o == target_index:
                reason = None if bool(organ.any()) else Status.ABSENT
            else:
                reason = exclusion_reason(organ, whole.get(name), self.config.min_organ_fraction)
            if reason is not None:
                status[name] = reason
                continue
            if self.official_numerics:
                keys = [lv[b][fl[b, o]] for lv, fl in zip(levels, flags)]
                shared, roi = [(torch.cat(keys[:3], 0), None)], keys[3]
            else:
                feats = organ_features(levels, flags, b, o)
                projs = self.vision.projections()
                shared, roi = list(zip(feats[:3], projs[:3])), project(projs[3], feats[3])
            proj, detail, _ = self._organ_embedding(shared, roi, o, fast=not self.official_numerics)
            detail.level4_grid = grid
            detail.level4_index = torch.nonzero(flags[3][b, o]).flatten()
            emb[row] = F.normalize(proj, dim=-1) if normalize else proj
            status[name] = Status.SCORED
            details[name] = detail
        return OrganEmbeddings(tuple(names), emb.float(), status, details)

    @torch.no_grad()
    def encode_image(
        self, image: Any, organ_mask: Any, organs: Sequence[str] | None = None, normalize: bool = True
    ) -> OrganEmbeddings:
        """Per-organ embeddings of a preprocessed volume, by the official per-volume procedure.

        Each present organ gets one window centred on it (at least the model's ROI), holding only
        that organ; absent organs get a NaN row and status ``"organ_absent"``.

        Args:
            image: ``(D, H, W)`` or ``(1, D, H, W)`` preprocessed volume, values in [0, 1].
            organ_mask: same shape, organ labels (``config.organs[i]`` has value ``i + 1``).
            organs: organs to embed (default: all).
            normalize: L2-normalise the embeddings.
        """
        img, mask = self._volume(image, "image", is_mask=False), self._volume(organ_mask, "organ_mask", is_mask=True)
        if img.shape != mask.shape:
            raise InputError(
                f"organ mask and image differ in shape: mask {tuple(mask.shape)}, image {tuple(img.shape)}. "
                "Pass the label map that was computed on this CT."
            )
        names = tuple(organs) if organs is not None else self.organs
        emb = torch.full((len(names), self.config.embed_dim), float("nan"), device=self.device)
        status: dict[str, str] = {name: Status.ABSENT for name in names}
        details: dict[str, OrganDetail] = {}
        windows = {}
        for name in names:
            window = organ_window(img, mask, self.organ_index(name), self.config.preprocess.roi)
            if window is not None:
                windows[name] = window
        for group in self._window_batches(windows):
            levels, flags = self._window_levels(
                torch.cat([windows[n].image for n in group]), torch.cat([windows[n].mask[:, 0] for n in group])
            )
            for b, name in enumerate(group):
                w = windows[name]
                out = self._window_organs(levels, flags, w.mask[0, 0], b, [name], w.organ_index, {}, normalize)
                emb[names.index(name)] = out.embeddings[0]
                status[name] = out.status[name]
                details[name] = out.details[name]
                details[name].window_start = w.start
            del levels, flags
        return OrganEmbeddings(names, emb, status, details)

    def _window_batches(self, windows: Mapping[str, Any]) -> list[list[str]]:
        """Organs grouped into backbone batches of equal window shape, at most ``window_batch_size`` each."""
        by_shape: dict[tuple[int, ...], list[str]] = {}
        for name, w in windows.items():
            by_shape.setdefault(tuple(w.image.shape), []).append(name)
        step = max(1, self.window_batch_size)
        return [names[i : i + step] for names in by_shape.values() for i in range(0, len(names), step)]

    # -- zero-shot ------------------------------------------------------------------------------
    def _findings(self, findings: Sequence[FindingLike] | None) -> list[FindingSpec]:
        return list(self.config.findings) if findings is None else as_findings(findings, self.organs)

    def prompt_embeddings(self, findings: Sequence[FindingSpec]) -> torch.Tensor:
        """``(F, 2, E)`` normalised [negative, positive] text embeddings; several phrasings are averaged.

        Results are cached per prompt set while the model is in eval mode.
        """
        prompts = tuple(p for f in findings for p in (*f.negative, *f.positive))
        cached = self._prompt_cache.get(prompts)
        if cached is None:
            with torch.no_grad():
                cached = self.encode_text(list(prompts))
            if not self.training:
                self._prompt_cache[prompts] = cached
        rows, i = [], 0
        for f in findings:
            pair = []
            for n in (len(f.negative), len(f.positive)):
                e = cached[i : i + n]
                pair.append(e[0] if n == 1 else F.normalize(e.mean(0), dim=-1))
                i += n
            rows.append(torch.stack(pair))
        return torch.stack(rows)

    @torch.no_grad()
    def zero_shot_classify(
        self, image: Any, organ_mask: Any, findings: Sequence[FindingLike] | None = None
    ) -> ZeroShotResult:
        """Zero-shot diagnosis of a preprocessed volume, by the official per-volume procedure.

        Args:
            image: ``(D, H, W)`` or ``(1, D, H, W)`` preprocessed volume, values in [0, 1].
            organ_mask: same shape, organ labels (``config.organs[i]`` has value ``i + 1``).
            findings: ``FindingSpec`` s, dicts or ``(organ, name, negative, positive)`` tuples
                (prompts a string or a list of phrasings); default: the model's catalogue.

        Returns:
            Per finding, the organ and the positive-class probability (NaN with the reason when the
            organ was not scored).
        """
        specs = self._findings(findings)
        organs = tuple(dict.fromkeys(f.organ for f in specs))
        emb = self.encode_image(image, organ_mask, organs=organs)
        text = self.prompt_embeddings(specs)
        scores = []
        for spec, pair in zip(specs, text):
            status = emb.status[spec.organ]
            prob = float("nan")
            if status == Status.SCORED:
                logits = emb[spec.organ] @ pair.t() / self.temperature
                prob = float(torch.softmax(logits, dim=-1)[1])
            scores.append(FindingScore(spec.organ, spec.name, prob, status))
        return ZeroShotResult(scores, emb)

    # -- training -------------------------------------------------------------------------------
    def forward(
        self,
        image: torch.Tensor,
        organ_mask: torch.Tensor,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> ViSDOutput:
        """Training forward pass over a batch of crops.

        Args:
            image: ``(B, 1, D, H, W)`` float crops, each axis a multiple of (16, 32, 32).
            organ_mask: ``(B, 1, D, H, W)`` or ``(B, D, H, W)`` organ labels.
            input_ids, attention_mask: ``(N, L)`` tokenised texts (see :meth:`tokenize`), optional.
        """
        if image.dim() != 5:
            raise InputError(f"image must be (B, 1, D, H, W), got {tuple(image.shape)}")
        mask = organ_mask[:, 0] if organ_mask.dim() == 5 else organ_mask
        check_window_shape(image.shape[-3:])
        levels = self.vision(image)
        flags = organ_token_flags(mask, len(self.organs))
        b_size, n_org = image.shape[0], len(self.organs)
        embeddings = image.new_zeros(b_size, n_org, self.config.embed_dim)
        valid = torch.zeros(b_size, n_org, dtype=torch.bool, device=image.device)
        commit, recon, codes = [], [], {}
        for b in range(b_size):
            for o in range(n_org):
                organ = mask[b] == o + 1
                if not bool(organ.any()) or _touches_border(organ):
                    continue
                keys = [lv[b][fl[b, o]] for lv, fl in zip(levels, flags)]
                proj, _, normality = self._organ_embedding([(torch.cat(keys[:3], 0), None)], keys[3], o, fast=False)
                embeddings[b, o] = F.normalize(proj, dim=-1)
                valid[b, o] = True
                commit.append(normality.commitment_loss)
                recon.append(F.mse_loss(normality.decoded, normality.scaled_input) / 0.5)
                codes[(b, o)] = normality.codes
        zero = image.new_zeros(())
        text = None
        if input_ids is not None:
            text = F.normalize(self.text(input_ids, attention_mask), dim=-1)
        return ViSDOutput(
            organ_embeddings=embeddings,
            organ_valid=valid,
            text_embeddings=text,
            temperature=self.temperature,
            commitment_loss=torch.stack(commit).mean() if commit else zero,
            reconstruction_loss=torch.stack(recon).mean() if recon else zero,
            codes=codes,
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
