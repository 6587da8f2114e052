"""Process-group helpers for the contrastive losses.

The losses follow open_clip's ``ClipLoss(local_loss=True, gather_with_grad=True)`` pattern: every
process gathers the embeddings of all processes (keeping the autograd graph) and computes the loss of
its *own* rows against *all* gathered columns. :func:`gather_rows` is that gather. It differs from
``open_clip.loss.gather_features`` in three ways that the organ-level losses need:

* it gathers any number of trailing dimensions and any dtype (embeddings, masks, text ids);
* the first dimension may differ between processes (a short last batch), by padding to the
  largest size and cutting the padding off again;
* it uses no deprecated ``torch.distributed.nn`` call, and its backward is one ``all_reduce``, which
  every backend (gloo, NCCL) supports.

Backward semantics: the gradient that reaches a process's local rows is the **sum** over all
processes of the gradient of their losses with respect to those rows, exactly like
``torch.distributed.nn.all_gather`` (a reduce-scatter). See :mod:`visd.training.losses` for how the
losses scale themselves so that this sum, after DDP's gradient averaging, equals the single-process
gradient over the whole global batch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist

from visd.errors import InputError

__all__ = ["GatheredRows", "gather_rows", "is_distributed", "rank_and_world_size"]

logger = logging.getLogger(__name__)


def is_distributed() -> bool:
    """True when a default process group with more than one process is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world_size() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` when there is none."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@dataclass
class GatheredRows:
    """Result of :func:`gather_rows`.

    Attributes:
        all: ``(N, *rest)`` the rows of every process concatenated in rank order,
            ``N = sum(sizes)``.
        offset: index in ``all`` of this process's first row.
        sizes: number of rows each process contributed, in rank order.
    """

    all: torch.Tensor
    offset: int
    sizes: tuple[int, ...]


class _GatherRows(torch.autograd.Function):
    """All-gather along dim 0 with per-rank sizes; backward sums the gradients of every rank."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: tuple[int, ...], rank: int) -> torch.Tensor:  # type: ignore[override]
        ctx.sizes, ctx.rank = sizes, rank
        longest = max(sizes)
        padded = x.new_zeros((longest, *x.shape[1:]))
        padded[: x.shape[0]] = x
        buffers = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(buffers, padded)
        return torch.cat([buf[:n] for buf, n in zip(buffers, sizes)], dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        sizes, rank = ctx.sizes, ctx.rank
        longest = max(sizes)
        padded = grad.new_zeros((len(sizes), longest, *grad.shape[1:]))
        for r, chunk in enumerate(grad.split(list(sizes), dim=0)):
            padded[r, : sizes[r]] = chunk
        # Every rank holds d(its loss)/d(all rows); summing over ranks and keeping our slice is a
        # reduce-scatter. all_reduce is used because gloo has no reduce-scatter; the tensors are
        # embeddings, small next to DDP's own gradient all-reduce.
        dist.all_reduce(padded, op=dist.ReduceOp.SUM)
        return padded[rank, : sizes[rank]].contiguous(), None, None


def gather_rows(x: torch.Tensor) -> GatheredRows:
    """Concatenate ``x`` of every process along dim 0, keeping gradients.

    Args:
        x: ``(n, *rest)`` any dtype; ``n`` may differ between processes, ``rest`` may not. Every
            process of the default group must call this (it is a collective).

    Returns:
        :class:`GatheredRows`. Without an initialised process group (or with one process) ``all``
        is ``x`` itself, ``offset`` 0. Gradients flowing into ``all`` reach ``x`` summed over
        processes (see the module docstring).

    Raises:
        InputError: ``x`` is a scalar, or the trailing shapes differ between processes.
    """
    if x.ndim == 0:
        raise InputError(
            f"gather_rows needs a tensor with a batch dimension: got a scalar {tuple(x.shape)}. "
            "Pass an (n, ...) tensor."
        )
    if not is_distributed():
        return GatheredRows(all=x, offset=0, sizes=(x.shape[0],))
    rank, world = rank_and_world_size()
    shape = torch.tensor([x.ndim, *x.shape], dtype=torch.int64, device=x.device)
    # every rank must send the same number of elements; pad the shape record to a fixed length
    record = torch.full((9,), -1, dtype=torch.int64, device=x.device)
    if shape.numel() > record.numel():
        raise InputError(
            f"gather_rows supports at most 8 dimensions: got shape {tuple(x.shape)}. "
            "Flatten the trailing dimensions first."
        )
    record[: shape.numel()] = shape
    records = [torch.empty_like(record) for _ in range(world)]
    dist.all_gather(records, record)
    shapes = [tuple(int(v) for v in r[1 : 1 + int(r[0])].tolist()) for r in records]
    if any(s[1:] != shapes[0][1:] for s in shapes):
        raise InputError(
            f"gather_rows got tensors whose shapes differ beyond the batch dimension across "
            f"processes: {shapes} (rank order). Expected only the first dimension to differ. "
            "Give every process the same organ list and embedding size."
        )
    sizes = tuple(s[0] for s in shapes)
    gathered = _GatherRows.apply(x.contiguous(), sizes, rank)
    offset = sum(sizes[:rank])
    return GatheredRows(all=gathered, offset=offset, sizes=sizes)
