"""Which organs each objective of a training step used, and why the others did not.

The unit is one (scan, organ) pair of the **global** batch (all processes). Whether an organ counts
in a crop is decided by :func:`visd.models.windows.window_status`, the rule of the model's forward
and of inference (its codes, 0 counts, 1 absent, 2 border, are the "crop codes" here): an organ absent from the crop (``organ_absent``) or with a voxel on the crop
border (``touches_window_border``) takes part in no objective. Each objective then adds its own:

* ``alignment`` skips an organ with no abnormal case in the batch (``no_abnormal``) or whose targets
  are all positive, e.g. one valid case or identical reports (``uniform_targets``): the skip reasons
  of :func:`visd.training.losses.anatomy_alignment_loss`;
* ``disease``: an organ valid (in both views) in one scan of the batch only has no negative and adds
  exactly 0 to the loss (``no_negative``); a pair counts only when it is valid in both views;
* ``normality`` trains on normal organs only (``abnormal``: the report calls the organ abnormal).

:class:`OrganUsage` holds the counts; :func:`reduce_usage` sums them over processes in one
collective, so every process takes the same decisions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from visd.models.windows import Status
from visd.training.distributed import rank_and_world_size

__all__ = [
    "OBJECTIVE_REASONS",
    "OrganUsage",
    "usage_columns",
    "alignment_counts",
    "disease_counts",
    "normality_counts",
    "reduce_usage",
]

#: Why a (scan, organ) pair did not take part in each objective, in column order.
OBJECTIVE_REASONS: dict[str, tuple[str, ...]] = {
    "alignment": (Status.ABSENT, Status.BORDER, "no_abnormal", "uniform_targets"),
    "disease": (Status.ABSENT, Status.BORDER, "no_negative"),
    "normality": (Status.ABSENT, Status.BORDER, "abnormal"),
}

def usage_columns() -> tuple[str, ...]:
    """``<objective>_organs`` (pairs used) and ``<objective>_<reason>`` for every objective and reason."""
    return tuple(
        c for obj, reasons in OBJECTIVE_REASONS.items() for c in (f"{obj}_organs", *(f"{obj}_{r}" for r in reasons))
    )


def _crop_columns(codes: torch.Tensor, width: int) -> torch.Tensor:
    """``(O, width)`` counts: column 0 the pairs that count in the crop, then absent and border."""
    counts = torch.zeros(codes.shape[1], width, dtype=torch.int64)
    for code in range(3):
        counts[:, code] = (codes == code).sum(0)
    return counts


def alignment_counts(codes: torch.Tensor, skipped: dict[int, str]) -> torch.Tensor:
    """Local ``(O, 5)`` counts of the alignment objective; ``skipped`` from the loss (global decisions)."""
    reasons = OBJECTIVE_REASONS["alignment"]
    counts = _crop_columns(codes, 1 + len(reasons))
    for o, reason in skipped.items():
        counts[o, 1 + reasons.index(reason)] += counts[o, 0]
        counts[o, 0] = 0
    return counts


def disease_counts(codes1: torch.Tensor, codes2: torch.Tensor) -> torch.Tensor:
    """Local ``(O, 4)`` counts of the disease objective from the crop codes of both views.

    A pair absent from either view is ``organ_absent``, else touching either border is
    ``touches_window_border``. ``no_negative`` is decided by :func:`reduce_usage` on the global counts.
    """
    absent = (codes1 == 1) | (codes2 == 1)
    codes = torch.where(absent, torch.ones_like(codes1), torch.maximum(codes1, codes2))
    return _crop_columns(codes, 1 + len(OBJECTIVE_REASONS["disease"]))


def normality_counts(codes: torch.Tensor, abnormal: torch.Tensor) -> torch.Tensor:
    """Local ``(O, 4)`` counts of the normality objective; ``abnormal`` ``(B, O)`` bool."""
    abnormal = abnormal.cpu().bool()
    counts = _crop_columns(codes, 1 + len(OBJECTIVE_REASONS["normality"]))
    counts[:, 0] = ((codes == 0) & ~abnormal).sum(0)
    counts[:, 3] = ((codes == 0) & abnormal).sum(0)
    return counts


@dataclass
class OrganUsage:
    """Per objective, ``(O, 1 + R)`` int64 counts over the global batch (CPU).

    Column 0 counts the (scan, organ) pairs the objective used, column ``1 + i`` those left out for
    ``OBJECTIVE_REASONS[objective][i]``. Adding two usages sums them (micro-batches, steps).
    """

    counts: dict[str, torch.Tensor] = field(default_factory=dict)

    def __add__(self, other: "OrganUsage") -> "OrganUsage":
        out = {k: v.clone() for k, v in self.counts.items()}
        for k, v in other.counts.items():
            out[k] = out[k] + v if k in out else v.clone()
        return OrganUsage(out)

    def used(self, objective: str) -> int:
        """(scan, organ) pairs the objective used."""
        return int(self.counts[objective][:, 0].sum())

    def pairs(self, objective: str) -> int:
        """All (scan, organ) pairs the objective saw."""
        return int(self.counts[objective].sum())

    def unused_objectives(self) -> list[str]:
        """The objectives that used no (scan, organ) pair."""
        return [obj for obj in self.counts if self.used(obj) == 0]

    def columns(self) -> dict[str, float]:
        """The ``metrics.csv`` columns (see :func:`usage_columns`) of the objectives present."""
        row: dict[str, float] = {}
        for obj, counts in self.counts.items():
            total = counts.sum(0)
            row[f"{obj}_organs"] = float(total[0])
            for i, reason in enumerate(OBJECTIVE_REASONS[obj]):
                row[f"{obj}_{reason}"] = float(total[1 + i])
        return row

    def describe(self, objective: str, organs: Sequence[str]) -> str:
        """``"used 0 of 8 (scan, organ) pairs; not used: organ_absent 4 (heart 2, esophagus 2), ..."``."""
        counts = self.counts[objective]
        parts = []
        for i, reason in enumerate(OBJECTIVE_REASONS[objective]):
            col = counts[:, 1 + i]
            if int(col.sum()):
                per = ", ".join(f"{organs[o]} {int(n)}" for o, n in enumerate(col.tolist()) if n)
                parts.append(f"{reason} {int(col.sum())} ({per})")
        text = f"used {self.used(objective)} of {self.pairs(objective)} (scan, organ) pairs"
        return text + ("; not used: " + ", ".join(parts) if parts else "")

    def to_state(self) -> dict[str, list[list[int]]]:
        """Plain lists, for a checkpoint."""
        return {k: v.tolist() for k, v in self.counts.items()}

    @classmethod
    def from_state(cls, state: dict[str, list[list[int]]]) -> "OrganUsage":
        return cls({k: torch.tensor(v, dtype=torch.int64).reshape(len(v), -1) for k, v in state.items()})


def reduce_usage(local: dict[str, torch.Tensor], device: torch.device) -> OrganUsage:
    """Sum local counts over the processes (one collective; every process must call it).

    Args:
        local: objective -> ``(O, 1 + R)`` local counts (:func:`alignment_counts`, ...).
        device: where the collective runs (the model's device; CUDA for nccl).
    """
    names = sorted(local)
    shapes = [local[n].shape for n in names]
    flat = torch.cat([local[n].reshape(-1) for n in names])
    _, world = rank_and_world_size()
    if world > 1:
        flat = flat.to(device)
        dist.all_reduce(flat)
        flat = flat.cpu()
    parts = flat.split([s.numel() for s in shapes])
    counts = {n: p.reshape(s).clone() for n, p, s in zip(names, parts, shapes)}
    if "disease" in counts:  # one valid case of an organ in the global batch: no negative, loss exactly 0
        c = counts["disease"]
        single = c[:, 0] == 1
        c[single, 1 + OBJECTIVE_REASONS["disease"].index("no_negative")] += 1
        c[single, 0] = 0
    return OrganUsage(counts)
