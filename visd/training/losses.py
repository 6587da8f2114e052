"""The three ViSD-Boost pre-training losses, as pure functions on tensors.

* :func:`anatomy_alignment_loss`: organ-level image-report alignment with soft targets (fVLM's rule).
* :func:`disease_contrastive_loss` and :func:`momentum_update`: disease-level vision contrastive
  learning between an online and a momentum encoder.
* :func:`normality_loss` and :func:`codebook_usage`: the normality VQ-VAE objective and codebook
  health statistics (the EMA codebook update lives in :class:`visd.models.normality.EMAQuantizer`).

Input layout shared by the two contrastive losses (``B`` scans on this process, ``O`` organs, ``D``
embedding size): embeddings ``(B, O, D)`` float, L2-normalised by the caller; ``valid`` ``(B, O)``
bool, True where the organ is present and does not touch the crop border (only those rows take
part); ``abnormal`` ``(B, O)`` bool, True where the report calls the organ abnormal.

Distributed scaling (open_clip's ``local_loss=True, gather_with_grad=True``). With a process group
of ``W`` processes, each process gathers the rows of all processes with gradients
(:func:`visd.training.distributed.gather_rows`) and computes the loss terms of its **own** rows
against **all** columns. For one organ with ``N`` valid rows in the global batch, the single-process
loss is ``(1/N) * sum_i l_i`` over all valid rows ``i``; each process returns
``(W/N) * sum_{i local} l_i``. Therefore:

* the **mean over processes** of the returned loss equals the single-process loss on the
  concatenated global batch (log ``all_reduce(loss) / W`` for the global value);
* the gradient with respect to a process's local embeddings (the gather's backward sums over
  processes) equals ``W`` times the single-process gradient of those rows, and DDP's gradient
  averaging (division by ``W``) makes every parameter gradient equal the single-process gradient.

With one process ``W = 1`` and everything reduces to the plain loss. All decisions (which organs are
skipped, which pairs are positives, ``N``) use the gathered global batch, so they agree on every
process. Every process must call the losses each step (they are collectives).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from visd.errors import ConfigError, InputError, did_you_mean
from visd.training.distributed import gather_rows, rank_and_world_size

__all__ = [
    "CodebookUsage",
    "NormalityLoss",
    "OrganLossOutput",
    "anatomy_alignment_loss",
    "codebook_usage",
    "disease_contrastive_loss",
    "hash_texts",
    "momentum_update",
    "normality_loss",
]

logger = logging.getLogger(__name__)

_REDUCTIONS = ("mean", "sum")


@dataclass
class OrganLossOutput:
    """Result of the organ-level contrastive losses.

    Attributes:
        loss: scalar, this process's share of the total (see the module docstring for scaling;
            with one process it is the loss itself).
        per_organ: organ index -> scalar, this process's share of that organ's loss (before the
            reduction over organs). Organs in ``skipped`` are absent.
        skipped: organ index -> reason (``"no_abnormal"``, ``"uniform_targets"``, ``"no_valid"``).
    """

    loss: torch.Tensor
    per_organ: dict[int, torch.Tensor] = field(default_factory=dict)
    skipped: dict[int, str] = field(default_factory=dict)


def hash_texts(texts: Sequence[Sequence[str]]) -> torch.Tensor:
    """Stable 63-bit ids of report sentences, equal exactly when the strings are equal.

    Args:
        texts: ``B`` rows of ``O`` strings (one sentence per scan and organ).

    Returns:
        ``(B, O)`` int64. Uses BLAKE2b, not Python's ``hash`` (salted per process), so the ids agree
        across processes, as :func:`anatomy_alignment_loss` needs.
    """
    rows = [list(r) for r in texts]
    if not rows or any(len(r) != len(rows[0]) for r in rows):
        raise InputError(
            f"texts must be B rows of O strings each: got row lengths {[len(r) for r in rows][:8]}. "
            "Give every scan one sentence per organ (use the normal template for organs not mentioned)."
        )
    ids = [
        [int.from_bytes(hashlib.blake2b(t.encode("utf-8"), digest_size=8).digest(), "little") >> 1 for t in r]
        for r in rows
    ]
    return torch.tensor(ids, dtype=torch.int64)


def _check_organ_inputs(a_name: str, a: torch.Tensor, b_name: str, b: torch.Tensor, **masks: torch.Tensor) -> None:
    if a.ndim != 3 or a.shape != b.shape:
        raise InputError(
            f"{a_name} and {b_name} must both be (B, O, D): got {a_name} {tuple(a.shape)}, "
            f"{b_name} {tuple(b.shape)}. Stack the organ embeddings as (batch, organ, dim)."
        )
    if not a.is_floating_point():
        raise InputError(f"{a_name} must be floating point: got {a.dtype}. Pass the embeddings, not ids.")
    for name, m in masks.items():
        if tuple(m.shape) != tuple(a.shape[:2]):
            raise InputError(
                f"{name} must be (B, O) = {tuple(a.shape[:2])} to match {a_name}: got {tuple(m.shape)}. "
                f"Pass one {name} entry per scan and organ."
            )
        if name == "text_ids":
            if m.dtype.is_floating_point or m.dtype == torch.bool:
                raise InputError(
                    f"text_ids must be an integer tensor: got {m.dtype}. Use hash_texts(...) to make ids."
                )
        elif m.dtype != torch.bool:
            raise InputError(f"{name} must be a bool tensor: got {m.dtype}. Pass a mask, e.g. labels > 0.")


def _check_temperature(temperature: float | torch.Tensor) -> None:
    if isinstance(temperature, torch.Tensor):
        if temperature.numel() != 1:
            raise ConfigError(
                f"temperature must be a scalar: got shape {tuple(temperature.shape)}. Pass one value."
            )
    elif not temperature > 0:
        raise ConfigError(f"temperature must be > 0: got {temperature!r}. fVLM/MoCo use 0.07.")


def _f32(x: torch.Tensor) -> torch.Tensor:
    """Upcast half precision to float32 for the softmax; float32/float64 stay as they are."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _meta(valid: torch.Tensor, abnormal: torch.Tensor, text_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Pack the masks (and ids) into one ``(B, O, k)`` int64 tensor, gathered in one collective."""
    parts = [valid.long(), abnormal.long()] + ([text_ids.long()] if text_ids is not None else [])
    return gather_rows(torch.stack(parts, dim=-1)).all


def anatomy_alignment_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    valid: torch.Tensor,
    abnormal: torch.Tensor,
    text_ids: torch.Tensor,
    temperature: float | torch.Tensor,
) -> OrganLossOutput:
    """Organ-level image-report contrastive loss with soft targets (fVLM's released rule).

    Args:
        image_embeds: ``(B, O, D)`` float, L2-normalised organ image embeddings.
        text_embeds: ``(B, O, D)`` float, L2-normalised embeddings of each organ's report sentence.
        valid: ``(B, O)`` bool, organ present and not touching the crop border.
        abnormal: ``(B, O)`` bool, the organ's sentence describes an abnormality.
        text_ids: ``(B, O)`` integer; equal ids mean identical sentences (see :func:`hash_texts`).
        temperature: float or scalar tensor (may be learnable); logits are ``cos / temperature``.
            fVLM learns it from 0.07, clamped to [0.001, 0.5] before each step (the caller's job).

    Rules, per organ ``o``, over the valid rows of the **global** batch only (invalid rows are
    removed from both the rows and the columns of the logit matrix):

    1. Skip (reason ``"no_abnormal"``) when no valid row is abnormal in the global batch.
    2. Positives of row ``i``: itself; every other row whose sentence is normal when ``i``'s is
       normal (normal-normal pairs are positive in both directions); every row with an identical
       sentence (equal ``text_ids``). The positive matrix ``P`` is symmetric.
    3. Skip (reason ``"uniform_targets"``) when every pair is positive (e.g. one valid row), as fVLM
       does (``len(unique(targets)) == 1``).
    4. Targets ``T = P / P.sum(1)``; image->text loss ``-sum_j T_ij log softmax_j(img_i . txt_j / t)``
       and text->image loss the same with ``txt_i . img_j``, each averaged over the ``N`` valid rows;
       the organ loss is their mean. The total is the **sum** over organs (fVLM).

    Half-precision inputs are upcast to float32 for the softmax. Distributed scaling as in the module docstring.
    """
    _check_organ_inputs(
        "image_embeds", image_embeds, "text_embeds", text_embeds, valid=valid, abnormal=abnormal, text_ids=text_ids
    )
    _check_temperature(temperature)
    _, world = rank_and_world_size()
    d = image_embeds.shape[-1]
    # one differentiable gather for both towers, so each rank runs exactly one backward collective
    gathered = gather_rows(torch.cat([image_embeds, text_embeds], dim=-1))
    meta = _meta(valid, abnormal, text_ids)
    offset, b = gathered.offset, image_embeds.shape[0]
    # keeps the gather (and a learnable temperature) in the graph on every rank, even when this
    # rank contributes no rows, so the backward collectives always match across ranks
    total = gathered.all[:0].sum()
    if isinstance(temperature, torch.Tensor):
        total = total + 0.0 * temperature.sum()
    out = OrganLossOutput(loss=total)
    for o in range(image_embeds.shape[1]):
        rows_valid = meta[:, o, 0].bool()
        if not (meta[:, o, 1].bool() & rows_valid).any():
            out.skipped[o] = "no_abnormal"
            continue
        idx = rows_valid.nonzero().squeeze(1)
        n = idx.numel()
        normal = meta[idx, o, 1] == 0
        ids = meta[idx, o, 2]
        pos = torch.eye(n, dtype=torch.bool, device=idx.device)
        pos |= normal[:, None] & normal[None, :]
        pos |= ids[:, None] == ids[None, :]
        if bool(pos.all()):
            out.skipped[o] = "uniform_targets"
            continue
        cols = _f32(gathered.all[idx, o])
        targets = pos.to(cols.dtype)
        targets = targets / targets.sum(1, keepdim=True)
        mine = (idx >= offset) & (idx < offset + b)
        local_rows = idx[mine] - offset
        img_cols, txt_cols = cols[:, :d], cols[:, d:]
        img_rows = _f32(image_embeds[local_rows, o])
        txt_rows = _f32(text_embeds[local_rows, o])
        t = targets[mine]
        i2t = -(t * F.log_softmax(img_rows @ txt_cols.t() / temperature, dim=1)).sum()
        t2i = -(t * F.log_softmax(txt_rows @ img_cols.t() / temperature, dim=1)).sum()
        organ = (i2t + t2i) * (0.5 * world / n)
        out.per_organ[o] = organ
        total = total + organ
    if out.skipped:
        logger.debug("anatomy_alignment_loss skipped organs %s", out.skipped)
    out.loss = total
    return out


def disease_contrastive_loss(
    query: torch.Tensor,
    key: torch.Tensor,
    valid: torch.Tensor,
    abnormal: torch.Tensor,
    temperature: float = 0.07,
    reduction: str = "mean",
) -> OrganLossOutput:
    """Disease-level vision contrastive loss (supervised-contrastive, query vs momentum keys).

    Args:
        query: ``(B, O, D)`` float, L2-normalised online-encoder embeddings of view 1 (with grad).
        key: ``(B, O, D)`` float, L2-normalised momentum-encoder embeddings of view 2. Detached here:
            no gradient reaches it.
        valid: ``(B, O)`` bool, organ present and not touching the crop border (in both views).
        abnormal: ``(B, O)`` bool.
        temperature: logits are ``query . key / temperature``; default 0.07.
        reduction: over organs, ``"mean"`` (default; over organs with at least one valid row in the
            global batch, so the weight does not grow with the organ count) or ``"sum"``.

    Rules, per organ ``o``, over the valid rows of the **global** batch (invalid rows are neither
    anchors nor keys): anchor ``i`` (a query) is scored against the keys of all ``N`` valid rows;
    its positives ``P(i)`` are its own key, plus, when ``i`` is normal, the keys of every normal row;
    all other keys of that organ are negatives. Per-anchor loss
    ``-1/|P(i)| * sum_{p in P(i)} log softmax_p(q_i . k / t)``; the organ loss is the mean over the
    ``N`` valid anchors. Organs with no valid row are skipped (``"no_valid"``). Distributed scaling as
    in the module docstring (only the keys are gathered, without gradient).
    """
    _check_organ_inputs("query", query, "key", key, valid=valid, abnormal=abnormal)
    _check_temperature(temperature)
    if reduction not in _REDUCTIONS:
        raise ConfigError(
            f"unknown reduction over organs: {reduction!r}. Expected one of {list(_REDUCTIONS)}."
            f"{did_you_mean(reduction, _REDUCTIONS)}"
        )
    _, world = rank_and_world_size()
    keys = gather_rows(key.detach())
    meta = _meta(valid, abnormal)
    offset, b = keys.offset, query.shape[0]
    total = query[:0].sum()
    out = OrganLossOutput(loss=total)
    for o in range(query.shape[1]):
        rows_valid = meta[:, o, 0].bool()
        idx = rows_valid.nonzero().squeeze(1)
        n = idx.numel()
        if n == 0:
            out.skipped[o] = "no_valid"
            continue
        normal = meta[idx, o, 1] == 0
        pos = torch.eye(n, dtype=torch.bool, device=idx.device) | (normal[:, None] & normal[None, :])
        mine = (idx >= offset) & (idx < offset + b)
        anchors = _f32(query[idx[mine] - offset, o])
        logp = F.log_softmax(anchors @ _f32(keys.all[idx, o]).t() / temperature, dim=1)
        p = pos[mine].to(logp.dtype)
        per_anchor = -(p * logp).sum(1) / p.sum(1)
        organ = per_anchor.sum() * (world / n)
        out.per_organ[o] = organ
        total = total + organ
    if reduction == "mean" and out.per_organ:
        total = total / len(out.per_organ)
    out.loss = total
    return out


@torch.no_grad()
def momentum_update(online: nn.Module, momentum: nn.Module, m: float = 0.995) -> None:
    """Move ``momentum`` towards ``online``: parameters ``p_m <- m * p_m + (1 - m) * p_o``; buffers copied.

    Pass the unwrapped online module (``ddp_model.module``), not the DDP wrapper.

    Raises:
        ConfigError: ``m`` outside [0, 1].
        InputError: the two modules differ in parameter/buffer names or shapes.
    """
    if not 0.0 <= m <= 1.0:
        raise ConfigError(f"momentum m must be in [0, 1]: got {m!r}. MoCo uses 0.999; the default is 0.995.")
    for kind, src, dst in (
        ("parameters", dict(online.named_parameters()), dict(momentum.named_parameters())),
        ("buffers", dict(online.named_buffers()), dict(momentum.named_buffers())),
    ):
        missing, unexpected = sorted(set(src) - set(dst)), sorted(set(dst) - set(src))
        if missing or unexpected:
            hint = " Pass ddp_model.module, not the DDP wrapper." if any(k.startswith("module.") for k in src) else ""
            raise InputError(
                f"online and momentum modules have different {kind}: only in online {missing[:5]}, "
                f"only in momentum {unexpected[:5]}. Build the momentum encoder as a deepcopy of the "
                f"online one.{hint}"
            )
        for name, s in src.items():
            t = dst[name]
            if s.shape != t.shape:
                raise InputError(
                    f"{kind[:-1]} {name!r} differs in shape: online {tuple(s.shape)}, momentum "
                    f"{tuple(t.shape)}. Build the momentum encoder as a deepcopy of the online one."
                )
            if kind == "buffers" or not t.is_floating_point():
                t.copy_(s)
            else:
                t.mul_(m).add_(s.detach().to(t.dtype), alpha=1.0 - m)


@dataclass
class NormalityLoss:
    """Result of :func:`normality_loss` (all scalars).

    Attributes:
        loss: ``reconstruction + commitment``.
        reconstruction: ``mse(reconstruction, target) / data_variance``.
        commitment: ``commitment_cost * mse(encoded, sg(quantized))``.
    """

    loss: torch.Tensor
    reconstruction: torch.Tensor
    commitment: torch.Tensor


def normality_loss(
    reconstruction: torch.Tensor,
    target: torch.Tensor,
    encoded: torch.Tensor,
    quantized: torch.Tensor,
    data_variance: float = 0.5,
    commitment_cost: float = 0.25,
) -> NormalityLoss:
    """Objective of the normality VQ-VAE with an EMA codebook (no codebook loss term).

    Args:
        reconstruction: decoder output, same shape as ``target``.
        target: what the decoder should reproduce (the min-max scaled organ tokens, in [-0.5, 0.5]).
        encoded: ``(..., dim)`` encoder output ``z`` (gradient flows here from the commitment term).
        quantized: ``(..., dim)`` codebook rows ``q`` chosen for ``z`` (or the straight-through
            output, which has the same value); detached here.
        data_variance: the reconstruction MSE is divided by it (0.5, the data-variance convention).
        commitment_cost: weight of ``mse(z, sg(q))``; 0.25.
    """
    if reconstruction.shape != target.shape or encoded.shape != quantized.shape:
        raise InputError(
            f"normality_loss needs reconstruction/target and encoded/quantized of equal shapes: got "
            f"{tuple(reconstruction.shape)} vs {tuple(target.shape)} and {tuple(encoded.shape)} vs "
            f"{tuple(quantized.shape)}. Pass the decoder output with its scaled input, and z with its codes' rows."
        )
    if not data_variance > 0 or not commitment_cost >= 0:
        raise ConfigError(
            f"data_variance must be > 0 and commitment_cost >= 0: got {data_variance!r}, {commitment_cost!r}. "
            "Use 0.5 and 0.25."
        )
    recon = F.mse_loss(reconstruction, target) / data_variance
    commit = commitment_cost * F.mse_loss(encoded, quantized.detach())
    return NormalityLoss(loss=recon + commit, reconstruction=recon, commitment=commit)


@dataclass
class CodebookUsage:
    """Result of :func:`codebook_usage`.

    Attributes:
        counts: ``(K,)`` int64, how often each code was chosen.
        perplexity: float scalar tensor, ``exp(entropy)`` of the code histogram (1 = one code used,
            ``K`` = all codes equally).
        unused_codes: number of codes with zero count.
        dead_codes: number of codes whose EMA cluster size is below the threshold; ``None`` when no
            EMA cluster sizes were given.
    """

    counts: torch.Tensor
    perplexity: torch.Tensor
    unused_codes: int
    dead_codes: int | None


@torch.no_grad()
def codebook_usage(
    codes: torch.Tensor,
    codebook_size: int,
    ema_cluster_size: torch.Tensor | None = None,
    dead_threshold: float = 1.0,
) -> CodebookUsage:
    """Codebook health statistics from the chosen code indices.

    Args:
        codes: integer tensor of any shape, values in ``[0, codebook_size)``.
        codebook_size: ``K``.
        ema_cluster_size: optional ``(K,)`` EMA cluster sizes; codes below ``dead_threshold`` count as dead.
        dead_threshold: default 1.0 (Jukebox's code-reset threshold).
    """
    if codes.dtype.is_floating_point or codes.dtype == torch.bool or codes.numel() == 0:
        raise InputError(
            f"codes must be a non-empty integer tensor: got dtype {codes.dtype}, {codes.numel()} elements. "
            "Pass the quantizer's code indices."
        )
    lo, hi = int(codes.min()), int(codes.max())
    if lo < 0 or hi >= codebook_size:
        raise InputError(
            f"code indices out of range: min {lo}, max {hi}, expected [0, {codebook_size}). "
            "Pass the codebook size the quantizer was built with."
        )
    counts = torch.bincount(codes.reshape(-1).long(), minlength=codebook_size)
    p = counts.double() / counts.sum()
    entropy = -torch.where(p > 0, p * p.log(), torch.zeros_like(p)).sum()
    dead = None
    if ema_cluster_size is not None:
        if tuple(ema_cluster_size.shape) != (codebook_size,):
            raise InputError(
                f"ema_cluster_size must be ({codebook_size},): got {tuple(ema_cluster_size.shape)}. "
                "Pass the quantizer's per-code EMA cluster sizes."
            )
        dead = int((ema_cluster_size < dead_threshold).sum())
    return CodebookUsage(
        counts=counts,
        perplexity=entropy.exp().float(),
        unused_codes=int((counts == 0).sum()),
        dead_codes=dead,
    )
