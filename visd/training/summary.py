"""A stage's running totals (steps, mean loss per objective, organs used) and the no-organ check.

A training step in which an objective used no (scan, organ) pair is a no-op for that objective
(:mod:`visd.training.usage` says why: absent organs, organs touching the crop border, ...). The
engine logs a warning for each such step, and stops the run with an
:class:`~visd.errors.InputError` when an objective has used no organ at all after
``organ_check_steps`` steps of a stage, or by the stage's end if it is shorter (the engine raises
:meth:`StageTally.failure`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from visd.config import ViSDConfig
from visd.errors import InputError
from visd.training.usage import OBJECTIVE_REASONS, OrganUsage

__all__ = ["StageTally", "format_summary"]


def _hints(reasons: set[str], config: ViSDConfig, scan_shapes: Sequence[tuple[int, ...]]) -> list[str]:
    p = config.preprocess
    shapes = ", ".join(str(tuple(s)) for s in scan_shapes[:4]) + (", ..." if len(scan_shapes) > 4 else "")
    seen = f"; here {shapes}" if scan_shapes else ""
    hints = {
        "organ_absent": (
            "organ_absent: the crops hold no voxel of these organs (a crop smaller than its scan misses some; a mask "
            "without them misses all): check that each mask is the organ label map of its scan, in the format "
            f"data.mask_format expects (visd ids 1..{len(config.organs)} in the order "
            f"{list(config.organs)}, or TotalSegmentator ids mapped by the model's totalsegmentator_map)"
        ),
        "touches_window_border": (
            "touches_window_border: an organ counts only when none of its voxels lies on the two outer planes of "
            f"the crop, and the crop (preprocess.roi {tuple(p.roi)}, (D, H, W) voxels of {tuple(p.spacing)} mm) is "
            "smaller than the organs; enlarge preprocess.roi to hold the preprocessed scans (their organ box plus "
            f"preprocess.crop_margin {tuple(p.crop_margin)}{seen}), or coarsen preprocess.spacing"
        ),
        "no_abnormal": (
            "no_abnormal: no scan of a batch was abnormal for the organ; check the manifest's label_<organ> and "
            "text_<organ> columns, or raise batch_size"
        ),
        "uniform_targets": (
            "uniform_targets: each organ was valid in one scan of a batch only, or all its reports were identical; "
            "raise batch_size or add scans"
        ),
        "no_negative": "no_negative: the disease objective needs each organ valid in two scans of a batch; raise batch_size",
        "abnormal": "abnormal: every organ in the crops was labelled abnormal, and normality trains on normal organs only",
    }
    return [text for reason, text in hints.items() if reason in reasons]


class StageTally:
    """Running totals of one stage: optimizer steps, loss sums per objective, organ usage.

    Args:
        label: the stage's name.
        objectives: the stage's objectives.
        organs: the model's organs (for messages).
        state: :meth:`to_state` of a checkpoint, to continue a resumed stage.
    """

    def __init__(
        self, label: str, objectives: Sequence[str], organs: Sequence[str], state: dict[str, Any] | None = None
    ) -> None:
        self.label, self.objectives, self.organs = label, tuple(objectives), tuple(organs)
        state = state or {}
        self.steps: int = int(state.get("steps", 0))
        self.loss_sums: dict[str, float] = {k: float(v) for k, v in state.get("loss_sums", {}).items()}
        self.usage = OrganUsage.from_state(state.get("usage", {}))

    def add(self, metrics: dict[str, float], usage: OrganUsage) -> None:
        """One optimizer step: its reduced metrics and its organ usage."""
        self.steps += 1
        for obj in self.objectives:
            if obj in metrics:
                self.loss_sums[obj] = self.loss_sums.get(obj, 0.0) + float(metrics[obj])
        self.usage = self.usage + usage

    def failure(self, config: ViSDConfig, scan_shapes: Sequence[tuple[int, ...]] = ()) -> InputError | None:
        """The error to raise when an objective has used no organ in the stage so far (else None).

        Args:
            config: the model's config (its preprocessing spec and organs go into the hint).
            scan_shapes: ``(D, H, W)`` of some preprocessed scans, to compare with the ROI.
        """
        empty = [obj for obj in self.objectives if obj in self.usage.counts and self.usage.used(obj) == 0]
        if not empty:
            return None
        reasons = {r for obj in empty for r, n in self._not_used(obj).items() if n}
        details = "; ".join(f"{obj} {self.usage.describe(obj, self.organs)}" for obj in empty)
        return InputError(
            f"stage {self.label!r}: the {' and '.join(empty)} objective{'s' if len(empty) > 1 else ''} used no organ "
            f"in {self.steps} step{'s' if self.steps != 1 else ''}, so {'they' if len(empty) > 1 else 'it'} trained "
            f"nothing: {details}. Expected at least one organ inside the crops, away from their border. Fix: "
            + "; ".join(_hints(reasons, config, scan_shapes))
            + "."
        )

    def _not_used(self, objective: str) -> dict[str, int]:
        counts = self.usage.counts[objective].sum(0)
        return {r: int(counts[1 + i]) for i, r in enumerate(OBJECTIVE_REASONS[objective])}

    def to_state(self) -> dict[str, Any]:
        return {"steps": self.steps, "loss_sums": dict(self.loss_sums), "usage": self.usage.to_state()}

    def summary(self) -> dict[str, Any]:
        """``{"stage", "steps", "loss": {objective: mean}, "organs": {objective: used}, "not_used": {...}}``."""
        objs = [o for o in self.objectives if o in self.usage.counts]
        return {
            "stage": self.label,
            "steps": self.steps,
            "loss": {o: self.loss_sums[o] / self.steps for o in self.objectives if o in self.loss_sums and self.steps},
            "organs": {o: self.usage.used(o) for o in objs},
            "pairs": {o: self.usage.pairs(o) for o in objs},
            "not_used": {o: {r: n for r, n in self._not_used(o).items() if n} for o in objs},
        }


def format_summary(stages: Sequence[dict[str, Any]]) -> str:
    """Readable lines of :meth:`StageTally.summary` dicts, one block per stage."""
    lines = []
    for s in stages:
        lines.append(f"stage {s['stage']}: {s['steps']} steps")
        for obj, used in s["organs"].items():
            loss = s["loss"].get(obj)
            not_used = ", ".join(f"{r} {n}" for r, n in s["not_used"].get(obj, {}).items())
            lines.append(
                f"  {obj:<10} mean loss {loss:.4f}  organs used {used} of {s['pairs'][obj]}"
                if loss is not None
                else f"  {obj:<10} organs used {used} of {s['pairs'][obj]}"
            )
            if not_used:
                lines[-1] += f" (not used: {not_used})"
    return "\n".join(lines)
