"""Training logs: a CSV file (always), TensorBoard events (optional) and a progress bar.

Only the process of rank 0 writes. ``metrics.csv`` has one row per logged optimizer step with a
fixed set of columns (empty where a stage has no such value), among them the organ counts of each
objective (:func:`visd.training.usage.usage_columns`: ``<objective>_organs`` used, then one column
per reason the others were not); floats are written with ``repr`` so
they read back bit-exact. On resume the rows after the checkpoint's step are dropped, so a resumed
run's file reads as if the run had never stopped.
"""

from __future__ import annotations

import csv
import logging
import os
import sys
from pathlib import Path
from typing import Any

from visd.errors import MissingDependencyError
from visd.training.usage import usage_columns

__all__ = ["COLUMNS", "MetricsLog", "read_metrics", "progress_bar"]

logger = logging.getLogger(__name__)

COLUMNS = (
    "step", "stage", "epoch", "batch", "lr", "loss", "alignment", "disease", "normality", "reconstruction",
    "commitment", "temperature", "perplexity", "unused_codes", "dead_codes", *usage_columns(), "elapsed_s",
)


def read_metrics(path: str | Path) -> list[dict[str, str]]:
    """The rows of a ``metrics.csv`` as dicts of strings."""
    with Path(path).open(newline="") as f:
        return list(csv.DictReader(f))


class MetricsLog:
    """Appends rows to ``<folder>/metrics.csv`` and, with ``tensorboard``, to ``<folder>/tensorboard``.

    Args:
        folder: the run's output folder.
        resume_step: when resuming, the checkpoint's step: later rows are dropped. None: a new file.
        tensorboard: also write TensorBoard scalars (needs the ``tensorboard`` package).
        enabled: False on processes other than rank 0 (every call is then a no-op).
    """

    def __init__(self, folder: str | Path, *, resume_step: int | None, tensorboard: bool, enabled: bool) -> None:
        self.enabled = enabled
        self.path = Path(folder) / "metrics.csv"
        self._file = None
        self._writer = None
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept: list[dict[str, str]] = []
        if resume_step is not None and self.path.is_file():
            kept = [r for r in read_metrics(self.path) if int(r["step"]) <= resume_step]
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        with tmp.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            w.writeheader()
            w.writerows(kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        self._file = self.path.open("a", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=COLUMNS)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise MissingDependencyError(
                    "tensorboard: true needs the tensorboard package: pip install 'visd[train]' (or set tensorboard: false)"
                ) from e
            purge = resume_step + 1 if resume_step else None  # drop events logged after the checkpoint
            self._tb = SummaryWriter(str(Path(folder) / "tensorboard"), purge_step=purge)

    def write(self, row: dict[str, Any]) -> None:
        """Log one step (unknown keys are errors; missing columns stay empty)."""
        if not self.enabled:
            return
        unknown = set(row) - set(COLUMNS)
        assert not unknown, f"unknown metric columns {sorted(unknown)}"
        cells = {k: (repr(float(v)) if isinstance(v, float) else v) for k, v in row.items()}
        assert self._writer is not None and self._file is not None
        self._writer.writerow(cells)
        self._file.flush()
        if self._tb is not None:
            for k, v in row.items():
                if isinstance(v, float) and k not in ("epoch", "batch", "elapsed_s"):
                    self._tb.add_scalar(f"{row.get('stage', 'train')}/{k}", v, int(row["step"]))
            self._tb.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def progress_bar(total: int, initial: int, desc: str, enabled: bool):
    """A tqdm bar on stderr, disabled unless ``enabled`` and stderr is a terminal."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=not (enabled and sys.stderr.isatty()), leave=False)
