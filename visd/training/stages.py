"""The three ViSD-Boost objectives on a :class:`~visd.ViSDModel`, one training step's loss at a time.

* ``alignment``: anatomy-level image-report alignment
  (:func:`visd.training.losses.anatomy_alignment_loss`) of the organ embeddings of view 1 and the
  organ report texts, with the model's learnable temperature (clamped to [0.001, 0.5] each step, as fVLM).
* ``disease``: disease-level vision contrastive learning
  (:func:`visd.training.losses.disease_contrastive_loss`): queries are the online model's organ
  embeddings of view 1, keys a momentum copy's embeddings of view 2 (the momentum copy of the image
  path: vision encoder, normality model, pooling; updated by
  :func:`visd.training.losses.momentum_update` after each optimizer step). An organ takes part when
  it is valid in both views.
* ``normality``: the VQ-VAE on the level-4 tokens of **normal** organs only (present, not touching
  the crop border, report normal), the vision encoder frozen. Loss per organ
  :func:`visd.training.losses.normality_loss` (reconstruction MSE / 0.5 + 0.25 commitment), averaged
  over the normal organs of the global batch. All normal organs of a step are quantised in one call,
  so the EMA codebook gets exactly one update per step (summed over processes by the quantiser).

:class:`StageObjective` is the module the engine wraps in DDP. Every trainable parameter that the
step's loss does not reach joins it with weight zero, so each one gets a gradient on every process and
DDP needs no unused-parameter search.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from visd.models.model import ViSDModel
from visd.models.vision import organ_token_flags
from visd.models.windows import window_status
from visd.training.config import MODULE_GROUPS, StageConfig
from visd.training.data import Batch
from visd.training.distributed import rank_and_world_size
from visd.training.losses import (
    anatomy_alignment_loss,
    codebook_usage,
    disease_contrastive_loss,
    hash_texts,
    momentum_update,
    normality_loss,
)
from visd.training.usage import (
    OrganUsage,
    alignment_counts,
    disease_counts,
    normality_counts,
    reduce_usage,
)

__all__ = [
    "StageLoss",
    "StageObjective",
    "group_modules",
    "configure_trainable",
    "set_train_modes",
    "make_momentum",
    "update_momentum",
    "momentum_keys",
    "unreached_parameters",
]

TEMPERATURE_RANGE = (0.001, 0.5)


@dataclass
class StageLoss:
    """One step's result.

    Attributes:
        loss: the scalar to backpropagate (this process's share, see :mod:`visd.training.losses`).
        metrics: detached scalars to log; averaging them over processes gives the global values.
        usage: which (scan, organ) pairs each objective used, over the global batch
            (:mod:`visd.training.usage`; the same on every process).
    """

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    usage: OrganUsage = field(default_factory=OrganUsage)


def group_modules(model: ViSDModel) -> dict[str, list[nn.Parameter]]:
    """The parameters of each module group (``vision``, ``normality``, ``pooling``, ``text``, ``temperature``)."""
    groups = {
        "vision": list(model.vision.parameters()),
        "normality": list(model.normality.parameters()),
        "pooling": list(model.pooling.parameters()),
        "text": list(model.text.parameters()) if model.text is not None else [],
        "temperature": [model.temperature],
    }
    assert set(groups) == set(MODULE_GROUPS)
    return groups


def configure_trainable(model: ViSDModel, stage: StageConfig) -> list[nn.Parameter]:
    """Set ``requires_grad`` for the stage; returns the trainable parameters."""
    trainable = set(stage.trainable_groups)
    out = []
    for name, params in group_modules(model).items():
        for p in params:
            p.requires_grad_(name in trainable)
            if name in trainable:
                out.append(p)
    return out


def set_train_modes(model: ViSDModel, stage: StageConfig, batchnorm: str = "batch") -> None:
    """Train mode for the trained groups; eval mode (no dropout, no BatchNorm or codebook updates)
    for frozen ones; with ``batchnorm="running"`` every BatchNorm uses its running statistics."""
    model.train()
    trainable = set(stage.trainable_groups)
    for name in ("vision", "normality", "pooling", "text"):
        module = getattr(model, name)
        if module is not None and name not in trainable:
            module.eval()
    if batchnorm == "running":
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                m.eval()


# -- momentum encoder ------------------------------------------------------------------------------
def _image_modules(model: ViSDModel) -> nn.ModuleDict:
    return nn.ModuleDict({"vision": model.vision, "normality": model.normality, "pooling": model.pooling})


def make_momentum(model: ViSDModel) -> ViSDModel:
    """A frozen deep copy of the model's image path (its text tower dropped)."""
    text, tokenizer = model.text, model.tokenizer
    try:
        model.text, model.tokenizer = None, None
        momentum = copy.deepcopy(model)
    finally:
        model.text, model.tokenizer = text, tokenizer
    momentum.requires_grad_(False)
    return momentum


def update_momentum(model: ViSDModel, momentum: ViSDModel, m: float) -> None:
    """``p_m <- m p_m + (1 - m) p``, buffers copied, over the image path."""
    momentum_update(_image_modules(model), _image_modules(momentum), m)


@torch.no_grad()
def momentum_keys(model: ViSDModel, momentum: ViSDModel, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Key embeddings ``(B, O, E)`` and organ status codes ``(B, O)`` (CPU, see
    :func:`visd.models.windows.window_status`) of view 2, with the online model's modes."""
    modes = dict(model.named_modules())
    for name, m in momentum.named_modules():
        if name in modes:
            m.train(modes[name].training)
    assert batch.image2 is not None and batch.mask2 is not None, "the disease objective needs two views"
    out = momentum(batch.image2, batch.mask2)
    return out.organ_embeddings.detach(), out.organ_status


# -- the objectives ---------------------------------------------------------------------------------
def unreached_parameters(loss: torch.Tensor, params: list[nn.Parameter]) -> list[nn.Parameter]:
    """The ``params`` that the autograd graph of ``loss`` does not reach (all of them when ``loss``
    has no graph)."""
    reached: set[int] = set()
    seen: set[torch.autograd.graph.Node] = set()
    stack = [loss.grad_fn] if loss.grad_fn is not None else []
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # an AccumulateGrad node holds its leaf
        if variable is not None:
            reached.add(id(variable))
        stack.extend(child for child, _ in node.next_functions if child is not None)
    return [p for p in params if id(p) not in reached]


class StageObjective(nn.Module):
    """The loss of one stage as a module (the unit DDP wraps).

    ``forward(batch, keys=None, key_status=None)``: ``batch`` on the model's device; ``keys`` and
    ``key_status`` are :func:`momentum_keys` (disease objective only).
    """

    def __init__(self, model: ViSDModel, stage: StageConfig) -> None:
        super().__init__()
        self.model = model
        self.stage = stage

    def _anchor(self, loss: torch.Tensor) -> torch.Tensor:
        """Zero times the trainable parameters that ``loss`` does not reach (an organ absent from the
        batch leaves its own parameters out, a step with no organ all of them), so that every one gets a
        gradient. Only those: anchoring a parameter the loss reaches too would cost a zero-filled
        gradient and an addition of its size (0.6 s of a 7.8 s step with the full-size model)."""
        params = unreached_parameters(loss, [p for p in self.model.parameters() if p.requires_grad])
        return sum((p.reshape(-1)[:1].sum() for p in params), torch.zeros((), device=self.model.device)) * 0.0

    def forward(
        self, batch: Batch, keys: torch.Tensor | None = None, key_status: torch.Tensor | None = None
    ) -> StageLoss:
        if self.stage.objectives == ("normality",):
            out = self._normality(batch)
        else:
            out = self._contrastive(batch, keys, key_status)
        out.loss = out.loss + self._anchor(out.loss)
        return out

    def _contrastive(self, batch: Batch, keys: torch.Tensor | None, key_status: torch.Tensor | None) -> StageLoss:
        model, stage = self.model, self.stage
        align = "alignment" in stage.objectives
        with torch.no_grad():
            model.temperature.clamp_(*TEMPERATURE_RANGE)
        out = model(
            batch.image,
            batch.mask,
            batch.input_ids if align else None,
            batch.attention_mask if align else None,
        )
        total = out.organ_embeddings.new_zeros(())
        metrics: dict[str, torch.Tensor] = {}
        codes = out.organ_status
        counts: dict[str, torch.Tensor] = {}
        if align:
            b, o = out.organ_embeddings.shape[:2]
            text = out.text_embeddings.reshape(b, o, -1)
            ids = hash_texts(batch.texts).to(out.organ_embeddings.device)
            a = anatomy_alignment_loss(out.organ_embeddings, text, out.organ_valid, batch.abnormal, ids, out.temperature)
            total = total + stage.weight("alignment") * a.loss
            counts["alignment"] = alignment_counts(codes, a.skipped)
            metrics["alignment"] = a.loss.detach().float()
            metrics["temperature"] = out.temperature.detach().float()
        if "disease" in stage.objectives:
            if keys is None or key_status is None:
                raise ValueError("the disease objective needs the momentum keys (visd.training.stages.momentum_keys)")
            valid = out.organ_valid & (key_status == 0).to(out.organ_embeddings.device)
            d = disease_contrastive_loss(
                out.organ_embeddings, keys.to(out.organ_embeddings.dtype), valid, batch.abnormal,
                temperature=stage.disease_temperature,
            )
            total = total + stage.weight("disease") * d.loss
            metrics["disease"] = d.loss.detach().float()
            counts["disease"] = disease_counts(codes, key_status)
        metrics["loss"] = total.detach().float()
        return StageLoss(total, metrics, reduce_usage(counts, out.organ_embeddings.device))

    def _normality(self, batch: Batch) -> StageLoss:
        model = self.model
        normality = model.normality
        n_organs = len(model.organs)
        mask = batch.mask[:, 0]
        codes = window_status(mask, n_organs)
        normal = (codes == 0) & ~batch.abnormal.cpu().bool()
        items = [(int(b), int(o)) for b, o in torch.nonzero(normal).tolist()]
        usage = reduce_usage({"normality": normality_counts(codes, batch.abnormal)}, mask.device)
        _, world = rank_and_world_size()
        n_global = usage.used("normality")
        zero = batch.image.new_zeros(()).float()
        if n_global == 0:  # the same decision on every process: no quantiser call, no codebook update
            return StageLoss(zero, {"loss": zero, "normality": zero}, usage)
        path = model.image_path
        with torch.no_grad():  # the vision encoder is frozen in this stage
            levels = path.levels(model.vision, batch.image)
            flags = organ_token_flags(mask, n_organs)
            tokens = [t.level4 for t in path.organ_tokens(model.vision, levels, flags, items)]
        # one quantiser call: one EMA update per step (train mode), summed over processes
        outs = normality(tokens, [o for _, o in items], fused_attention=path.fused_attention)
        recon_sum, commit_sum = zero, zero
        for out in outs:
            nl = normality_loss(
                out.decoded, out.scaled_input, out.encoded, out.quantized,
                data_variance=0.5, commitment_cost=normality.quantizer.commitment_cost,
            )
            recon_sum = recon_sum + nl.reconstruction.float()
            commit_sum = commit_sum + nl.commitment.float()
        scale = world / n_global
        loss = (recon_sum + commit_sum) * scale
        metrics = {
            "loss": loss.detach(),
            "normality": loss.detach(),
            "reconstruction": (recon_sum * scale).detach(),
            "commitment": (commit_sum * scale).detach(),
        }
        codes_used = torch.cat([out.codes for out in outs]) if outs else torch.zeros(0, dtype=torch.int64)
        metrics.update(_codebook_metrics(normality.quantizer, codes_used, world))
        return StageLoss(loss, metrics, usage)


@torch.no_grad()
def _codebook_metrics(quantizer: nn.Module, codes: torch.Tensor, world: int) -> dict[str, torch.Tensor]:
    """Perplexity, unused and dead codes of this step's global code histogram (same on every process)."""
    k = quantizer.embeddings.shape[0]
    counts = torch.bincount(codes.reshape(-1), minlength=k)
    if world > 1:
        dist.all_reduce(counts)
    steps = int(quantizer.ema_steps)
    cluster = quantizer.ema_cluster_size.hidden / (1.0 - quantizer.decay**max(steps, 1))
    usage = codebook_usage(torch.arange(k, device=counts.device).repeat_interleave(counts), k, ema_cluster_size=cluster)
    device = codes.device
    return {
        "perplexity": usage.perplexity.to(device).float(),
        "unused_codes": torch.tensor(float(usage.unused_codes), device=device),
        "dead_codes": torch.tensor(float(usage.dead_codes or 0), device=device),
    }

